"""``loratool push`` and ``loratool hf-extension`` from the command line (child processes, so
exit codes and stdout/stderr are exactly what a shell sees)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.ops.card import split_card
from tests.hub_server import TEST_USER, HubServer

pytest_plugins = ["tests.conftest_hub"]

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
BIN = Path(sys.executable).parent
REPO = f"{TEST_USER}/llama-lora"


def run(*args: str, env: dict[str, str] | None = None, exe: list[str] | None = None):
    return subprocess.run(
        [*(exe or [sys.executable, "-m", "lora_tools"]), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_dry_run_prints_files_sizes_and_card_without_network(hub_server: HubServer) -> None:
    args = ["push", "fixtures/peft/llama-lora", REPO, "--dry-run", "--base-model", "org/base"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "would push adapter fixtures/peft/llama-lora to tester/llama-lora" in out
    assert "adapter_model.safetensors   9.2 kB" in out and "README.md" in out
    assert "base_model: org/base" in out and "<!-- loratool:begin" in out

    doc = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)
    assert doc["dry_run"] is True and doc["kind"] == "adapter"
    sizes = {f["path"]: f["size_bytes"] for f in doc["files"]}
    assert sizes["adapter_model.safetensors"] == 9176
    assert sizes["README.md"] == len(doc["card"].encode())
    assert split_card(doc["card"])[0]["base_model"] == "org/base"
    assert hub_server.log == []  # no request of any kind
    assert hub_server.repos == {}


def test_push_prints_the_url_and_never_the_token(hub_server: HubServer, tmp_path: Path) -> None:
    secret = "hf_cli_secret_token_DO_NOT_LEAK_42"
    hub_server.tokens[secret] = TEST_USER
    hub_server.require_token = True
    env = {"HF_TOKEN": ""}  # only --token authenticates
    push = run("push", "fixtures/peft/llama-lora", REPO, "--token", secret, "--private", env=env)
    assert push.returncode == 0, push.stderr
    commit = hub_server.repos[REPO].branches["main"][-1]
    assert push.stdout == f"{hub_server.url}/{REPO}/commit/{commit.oid}\n"
    assert hub_server.repos[REPO].private is True
    want = (FIX / "peft/llama-lora/adapter_model.safetensors").read_bytes()
    assert commit.files["adapter_model.safetensors"] == want

    same = run("push", "fixtures/peft/llama-lora", REPO, "--token", secret, "--json")
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["changed"] is False and "no commit was made" in same.stderr
    assert len(hub_server.repos[REPO].branches["main"]) == 2

    pr = run("push", "fixtures/peft/llama-rslora", REPO, "--token", secret, "--create-pr", "--json")
    assert pr.returncode == 0, pr.stderr
    doc = json.loads(pr.stdout)
    assert doc["url"] == doc["pr_url"] == f"{hub_server.url}/{REPO}/discussions/1"
    assert doc["changed"] is True

    denied = run("push", "fixtures/peft/llama-lora", REPO, "--token", "hf_wrong", env=env)
    assert denied.returncode == 3 and denied.stdout == ""
    lines = denied.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("loratool: error: ")
    assert "HTTP 401" in lines[-1] and "Traceback" not in denied.stderr
    assert "pass --token" in lines[-1]  # push adds its option to the library's hint
    assert len(hub_server.repos[REPO].branches["main"]) == 2

    outputs = [push.stdout, push.stderr, same.stdout, same.stderr, pr.stdout, pr.stderr]
    outputs += [denied.stdout, denied.stderr]
    assert not any(secret in text for text in outputs)
    assert not any(secret in f"{r}" for r in hub_server.log)
    for path in tmp_path.rglob("*"):  # HF_HOME (cache, token path) lives under tmp_path
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_exit_codes(hub_server: HubServer) -> None:
    invalid = run("push", "fixtures/broken/nan-weights", REPO)
    assert (
        invalid.returncode == 1 and "LT201" in invalid.stderr and "--no-validate" in invalid.stderr
    )
    assert hub_server.log == []
    skipped = run("push", "fixtures/broken/nan-weights", REPO, "--no-validate", "--dry-run")
    assert skipped.returncode == 0, skipped.stderr
    bad_id = run("push", "fixtures/peft/llama-lora", "not-a-repo-id", "--dry-run")
    assert bad_id.returncode == 2 and "not a Hub repo id" in bad_id.stderr
    hub_server.stop()
    down = run("push", "fixtures/peft/llama-lora", REPO)
    assert down.returncode == 3 and down.stderr.strip().splitlines()[-1].startswith(
        "loratool: error: checking the repo failed"
    )


@pytest.fixture
def hf_home(tmp_path: Path) -> dict[str, str]:
    """A HOME of its own, so the hf CLI's extension folder is the test's."""
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"}


def test_hf_lora_runs_loratool(hf_home: dict[str, str]) -> None:
    hf = [str(BIN / "hf")]
    before = run("lora", "inspect", "fixtures/peft/llama-lora", env=hf_home, exe=hf)
    assert before.returncode != 0  # a console script named hf-lora alone is not enough

    installed = run("hf-extension", "install", env=hf_home)
    assert installed.returncode == 0, installed.stderr
    manifest_path = Path(hf_home["HOME"]) / ".local/share/hf/extensions/hf-lora/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["executable_path"] == str((BIN / "hf-lora").resolve())

    via_hf = run("lora", "inspect", "fixtures/peft/llama-lora", "--json", env=hf_home, exe=hf)
    direct = run("inspect", "fixtures/peft/llama-lora", "--json", env=hf_home)
    assert via_hf.returncode == 0, via_hf.stderr
    assert json.loads(via_hf.stdout) == json.loads(direct.stdout)
    missing = run("lora", "inspect", "no/such/path", env=hf_home, exe=hf)
    assert missing.returncode == 3 and "no such file or folder" in missing.stderr
    listed = run("extensions", "list", "--format", "json", env=hf_home, exe=hf)
    assert "loratool.local/hf-lora" in listed.stdout

    assert run("hf-extension", "status", env=hf_home).stdout.startswith("installed")
    assert run("hf-extension", "remove", env=hf_home).stdout == "removed\n"
    assert not manifest_path.exists()
    assert run("lora", "--help", env=hf_home, exe=hf).returncode != 0


def test_hf_extension_does_not_replace_another_extension(hf_home: dict[str, str]) -> None:
    folder = Path(hf_home["HOME"]) / ".local/share/hf/extensions/hf-lora"
    folder.mkdir(parents=True)
    other = {"owner": "someone", "repo_id": "someone/hf-lora", "executable_path": "/bin/true"}
    (folder / "manifest.json").write_text(json.dumps(other))
    refused = run("hf-extension", "install", env=hf_home)
    assert refused.returncode == 3 and "someone/hf-lora" in refused.stderr
    assert run("hf-extension", "remove", env=hf_home).stdout.startswith("not installed by loratool")
    assert json.loads((folder / "manifest.json").read_text()) == other
    assert run("hf-extension", "install", "--force", env=hf_home).returncode == 0
    assert json.loads((folder / "manifest.json").read_text())["owner"] == "loratool.local"
