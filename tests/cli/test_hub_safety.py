"""Hub lookups that must not happen, hang or leak (issue 10, items 12, 20, 21, 24).

Every Hub here is on loopback: tests/hub_server.py, a closed port, or a socket that accepts
connections and never answers. Commands run in child processes bounded by ``timeout=``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_tools.errors import FormatError, HubError
from lora_tools.io.hub import resolve_input
from tests.hub_server import TEST_TOKEN, TEST_USER, HubServer

pytest_plugins = ["tests.conftest_hub"]

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
ADAPTER = FIX / "peft/llama-lora"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 60, **env: str):
    """``loratool ARGS`` in a child process (the environment the fixtures set, plus ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "lora_tools", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def one_error_line(result: subprocess.CompletedProcess, code: int = 3) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1, result.stderr
    assert lines[0].startswith("loratool: error: ")
    return lines[0]


# --- item 12: local-looking paths are never Hub lookups ----------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "out/llama-lorx",  # out/ exists
        "./llama/lora",
        "~/llama-lora",
        "a/b/c",
        "user/adapter.safetensors",
        "user/adapter_config.json",
    ],
)
def test_local_looking_path_is_no_such_file_without_a_hub_request(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str
) -> None:
    from lora_tools.io.hub import local_reason

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert local_reason(spec) is not None
    with pytest.raises(FormatError, match="no such file or folder"):
        resolve_input(spec)
    assert hub_server.log == []


def test_hub_ids_still_look_like_hub_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_tools.io.hub import local_reason

    monkeypatch.chdir(tmp_path)
    for spec in ("user/llama-lora", "org/sd-loras@refs/pr/2:styles/ink.safetensors", "u/n@v2"):
        assert local_reason(spec) is None, spec


def test_cli_missing_local_path_is_one_line_with_no_hub_request(
    hub_server: HubServer, tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    for command in (["inspect"], ["merge", str(FIX / "bases/tiny-llama")]):
        args = [*command, "out/llama-lorx"] + (["-o", "merged"] if command[0] == "merge" else [])
        line = one_error_line(run_cli(*args, cwd=tmp_path))
        assert "out/llama-lorx: no such file or folder" in line
        assert "HF_HUB_OFFLINE" not in line
    report = run_cli("validate", "out/llama-lorx", "--output-format", "json", cwd=tmp_path)
    assert report.returncode == 1, report.stderr
    finding = json.loads(report.stdout)["files"][0]["findings"][0]
    assert finding["rule"] == "LT017" and "no such file" in finding["message"]
    assert hub_server.log == []


def test_unreachable_hub_fails_in_one_line_without_retries(tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens: every connection is refused
    env = {
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": "127.0.0.1",
    }
    # huggingface_hub's own retries take 23 s of back-off: the bound proves there are none
    line = one_error_line(run_cli("inspect", "someone/llama-lora", timeout=15, **env))
    assert "cannot be reached" in line and "ConnectError" in line
    assert "HF_HUB_OFFLINE" not in line  # it is not set: the hint must not blame it
    offline = one_error_line(
        run_cli("inspect", "someone/llama-lora", timeout=15, **{**env, "HF_HUB_OFFLINE": "1"})
    )
    assert "HF_HUB_OFFLINE is set" in offline


# --- item 21: hangs -------------------------------------------------------------------------------


@pytest.fixture
def silent_hub(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Hub endpoint that accepts connections and never answers; the environment to use it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)  # the kernel completes the handshakes; nothing ever reads or answers
    try:
        yield {
            "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}",
            "HF_HOME": str(tmp_path / "hf"),
            "HF_TOKEN": TEST_TOKEN,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DOWNLOAD_TIMEOUT": "1",
            "HF_HUB_ETAG_TIMEOUT": "1",
            "NO_PROXY": "127.0.0.1",
        }
    finally:
        server.close()


def test_silent_hub_times_out_inspect_and_push(silent_hub: dict[str, str], tmp_path) -> None:
    line = one_error_line(run_cli("inspect", f"{TEST_USER}/llama-lora", timeout=40, **silent_hub))
    assert "did not answer within 1 s" in line
    push = run_cli("push", str(ADAPTER), f"{TEST_USER}/llama-lora", timeout=40, **silent_hub)
    errors = [x for x in push.stderr.splitlines() if x.startswith("loratool: error:")]
    assert push.returncode == 3 and len(errors) == 1, push.stderr
    assert "ReadTimeout" in errors[0] and "did not answer within 1 s" in errors[0]


def test_fifo_and_devices_are_refused_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "adapter.safetensors"
    os.mkfifo(fifo)
    base = str(FIX / "bases/tiny-llama")
    for args in (
        ["inspect", str(fifo)],
        ["rescale", str(fifo), "--alpha", "2", "-o", str(tmp_path / "r")],
        ["merge", base, str(fifo), "-o", str(tmp_path / "m")],
        ["merge", base, "/dev/zero", "-o", str(tmp_path / "z")],
        ["push", str(fifo), f"{TEST_USER}/x", "--dry-run", "--no-validate"],
    ):
        line = one_error_line(run_cli(*args, timeout=30, HF_HUB_OFFLINE="1"))
        assert "not a regular file" in line, args
        assert "FIFO" in line or "character device" in line
    report = run_cli("validate", str(fifo), "/dev/zero", "--output-format", "json", timeout=30)
    found = [f["findings"][0]["message"] for f in json.loads(report.stdout)["files"]]
    assert found == [
        "not a regular file or folder (a FIFO)",
        "not a regular file or folder (a character device)",
    ]


def test_library_reader_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "a.safetensors"
    os.mkfifo(fifo)
    code = (
        "from lora_tools.formats import load_adapter\n"
        f"try:\n    load_adapter({str(fifo)!r})\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.stdout.startswith("FormatError") and "not a regular file (a FIFO)" in out.stdout


# --- item 20: the token never reaches the terminal --------------------------------------------------


def test_echoed_token_is_redacted_in_inspect_merge_and_push(
    hub_server: HubServer, tmp_path: Path
) -> None:
    echo = f"invalid credentials in header Authorization: Bearer {TEST_TOKEN} (copy: {TEST_TOKEN})"
    repo = f"{TEST_USER}/llama-lora"
    runs = []
    hub_server.fail_next("/api/models/", 401, count=100, message=echo)
    runs.append(run_cli("inspect", repo))
    runs.append(run_cli("merge", str(FIX / "bases/tiny-llama"), repo, "-o", str(tmp_path / "m")))
    hub_server._faults.clear()
    hub_server.fail_next("/api/models/", 500, count=100, message=echo)
    runs.append(run_cli("push", str(ADAPTER), repo, "--token", TEST_TOKEN))
    for result in runs:
        assert result.returncode == 3, result.stderr
        assert "HTTP 401" in result.stderr or "HTTP 500" in result.stderr, result.stderr
        assert TEST_TOKEN not in result.stderr + result.stdout
        assert "Bearer ***" in result.stderr
        assert "Bearer hf_" not in result.stderr


def test_redaction_of_any_hub_token_in_library_errors(
    hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = "hf_" + "Q" * 34  # not this session's token: redacted by its shape
    hub_server.fail_next("/api/models/", 401, message=f"token {other} rejected")
    with pytest.raises(HubError) as exc:
        resolve_input(f"{TEST_USER}/llama-lora")
    assert other not in str(exc.value) and "hf_***" in str(exc.value)


# --- item 24: repo ids the Hub refuses --------------------------------------------------------------


def test_repo_ids_over_96_characters_are_refused(hub_server: HubServer) -> None:
    from lora_tools.io.hub import repo_id_problem

    long_name = "a" * 97
    assert "97 characters" in repo_id_problem(f"user/{long_name}")
    assert repo_id_problem(f"user/{'a' * 96}") is None
    assert "97 characters" in repo_id_problem(f"{long_name}/x")
    line = one_error_line(run_cli("push", str(ADAPTER), f"me/{long_name}", "--dry-run"), 2)
    assert "at most 96" in line
    with pytest.raises(HubError, match="at most 96"):
        resolve_input(f"me/{long_name}")
    assert hub_server.log == []
