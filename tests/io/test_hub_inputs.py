"""Hub ids as inputs (``user/name[@rev][:path]``): file selection, downloads through the real
huggingface_hub client against tests/hub_server.py, offline mode, and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants

from lora_tools.errors import FormatError, HubError, UsageError
from lora_tools.io.checkpoint import open_checkpoint
from lora_tools.io.hub import parse_hub_id, resolve_input, select_files
from lora_tools.ops.inspect import inspect_adapter
from tests.hub_server import TEST_USER, HubServer

pytest_plugins = ["tests.conftest_hub"]

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
ADAPTER = f"{TEST_USER}/llama-lora"


@pytest.fixture
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client sleeps 1-8 s between retries; tests don't need to wait."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {
        prefix + p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def downloaded(server: HubServer, repo_id: str) -> list[str]:
    """Paths fetched with GET .../resolve/<rev>/<path> from one repo, in order."""
    out = []
    for r in server.requests(f"/{repo_id}/resolve/", "GET"):
        out.append(r.path.split("/resolve/", 1)[1].split("/", 1)[1])
    return sorted(out)


def seed_adapter(server: HubServer) -> None:
    files = folder_files(FIX / "peft/llama-lora")
    files |= {
        "checkpoint-10/adapter_model.safetensors": b"not needed",
        "training_args.bin": b"\x80\x04pickle",
        "notes/samples.txt": b"hello",
    }
    server.add_repo(ADAPTER, files=files)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_tools", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


# -- parsing and selection (no network) ----------------------------------------------------------


def test_parse_hub_id() -> None:
    assert parse_hub_id("user/name") == ("user/name", None, None)
    assert parse_hub_id("user/name@v1.0") == ("user/name", "v1.0", None)
    assert parse_hub_id("org/x@refs/pr/3:sub/a.safetensors") == (
        "org/x",
        "refs/pr/3",
        "sub/a.safetensors",
    )
    assert parse_hub_id("user/name:lora.safetensors") == ("user/name", None, "lora.safetensors")
    for not_an_id in ("a.safetensors", "./user/name", "/abs/path", "a/b/c", "user/", "@x/y"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_select_adapter_files() -> None:
    peft = ["adapter_model.safetensors", "adapter_config.json", "README.md", "optimizer.pt"]
    assert select_files(peft, "adapter") == ["adapter_model.safetensors", "adapter_config.json"]
    diffusers = ["pytorch_lora_weights.safetensors", "image.png", "sub/x.safetensors"]
    assert select_files(diffusers, "adapter") == ["pytorch_lora_weights.safetensors"]
    assert select_files(["style.safetensors", "README.md"], "adapter") == ["style.safetensors"]
    several = ["a.safetensors", "b.safetensors"]
    with pytest.raises(UsageError, match=r"2 \.safetensors files") as exc:
        select_files(several, "adapter", spec="u/r")
    assert "u/r:a.safetensors" in str(exc.value)
    assert select_files(several, "adapter", "b.safetensors") == ["b.safetensors"]
    nested = ["v2/adapter_model.safetensors", "v2/adapter_config.json", "adapter_config.json"]
    assert select_files(nested, "adapter", "v2/adapter_model.safetensors") == [
        "v2/adapter_model.safetensors",
        "v2/adapter_config.json",
    ]
    with pytest.raises(HubError, match="no adapter weights"):
        select_files(["adapter_model.bin", "adapter_config.json"], "adapter")
    with pytest.raises(HubError, match="no file 'c.safetensors'"):
        select_files(several, "adapter", "c.safetensors")
    with pytest.raises(UsageError, match="unknown input role"):
        select_files(several, "lora")


def test_select_base_files() -> None:
    hf = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.fp16.safetensors",
        "pytorch_model.bin",
        "tokenizer.json",
        "tokenizer.model",
        "README.md",
        ".gitattributes",
        "original/consolidated.safetensors",
        "original/params.json",
    ]
    assert select_files(hf, "base") == [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer.model",
    ]
    sharded = [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "consolidated.safetensors",  # Mistral repos ship this beside the shards
        "config.json",
    ]
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    picked = select_files(sharded, "base", read_index=lambda path: shards)
    assert picked == ["model.safetensors.index.json", *shards, "config.json"]
    pipeline = [
        "model_index.json",
        "v1-5.safetensors",  # a single-file checkpoint beside the pipeline folders
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    ]
    assert select_files(pipeline, "base") == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/model.safetensors",
        "text_encoder/config.json",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/config.json",
    ]
    with pytest.raises(UsageError, match="2 checkpoints"):
        select_files(["a.safetensors", "b.safetensors"], "base", spec="u/r")
    with pytest.raises(HubError, match="no safetensors weights"):
        select_files(["pytorch_model.bin", "config.json"], "base")
    assert select_files(["a.safetensors", "b.safetensors"], "base", "b.safetensors") == [
        "b.safetensors"
    ]


# -- through the fake Hub ------------------------------------------------------------------------


def test_adapter_download_fetches_only_adapter_files(hub_server: HubServer) -> None:
    seed_adapter(hub_server)
    folder = resolve_input(ADAPTER, role="adapter")
    assert folder.is_relative_to(constants.HF_HUB_CACHE)
    assert downloaded(hub_server, ADAPTER) == ["adapter_config.json", "adapter_model.safetensors"]
    local = FIX / "peft/llama-lora"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).read_bytes() == (local / name).read_bytes()
    assert not (folder / "checkpoint-10").exists() and not (folder / "training_args.bin").exists()
    ours, theirs = inspect_adapter(folder).to_json(), inspect_adapter(local).to_json()
    for report in (ours, theirs):
        report.pop("path"), report.pop("inputs")
    assert ours == theirs


def test_revision_and_file_in_repo(hub_server: HubServer) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    seed_adapter(hub_server)
    api = HfApi()
    api.create_branch(ADAPTER, branch="v2")
    patterns = FIX / "peft/llama-patterns"
    ops = [CommitOperationAdd(p.name, str(p)) for p in sorted(patterns.iterdir()) if p.is_file()]
    api.create_commit(ADAPTER, ops, commit_message="v2", revision="v2")
    first = hub_server.repos[ADAPTER].branches["main"][-1].oid

    assert inspect_adapter(resolve_input(f"{ADAPTER}@v2")).rank["max"] == 6
    assert inspect_adapter(resolve_input(f"{ADAPTER}@{first}")).rank["max"] == 4
    assert inspect_adapter(resolve_input(ADAPTER)).rank["max"] == 4
    kohya = (FIX / "kohya/sd-lora.safetensors").read_bytes()
    hub_server.add_repo("org/styles", files={"a.safetensors": kohya, "b.safetensors": b"x"})
    with pytest.raises(UsageError, match="which is the adapter"):
        resolve_input("org/styles")
    path = resolve_input("org/styles:a.safetensors")
    assert path.name == "a.safetensors" and path.read_bytes() == kohya
    assert downloaded(hub_server, "org/styles") == ["a.safetensors"]


def test_local_path_wins(hub_server: HubServer, tmp_path: Path, monkeypatch) -> None:
    seed_adapter(hub_server)
    monkeypatch.chdir(tmp_path)
    local = tmp_path / ADAPTER
    local.mkdir(parents=True)
    for p in (FIX / "peft/llama-patterns").iterdir():
        (local / p.name).write_bytes(p.read_bytes())
    assert resolve_input(ADAPTER) == Path(ADAPTER)
    assert hub_server.log == []


def test_offline_uses_the_cache_and_fails_cleanly_when_not_cached(
    hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_adapter(hub_server)
    online = resolve_input(ADAPTER)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub_server.log)
    assert resolve_input(ADAPTER) == online
    assert len(hub_server.log) == before  # no request at all
    hub_server.add_repo("org/never-downloaded", files=folder_files(FIX / "peft/llama-lora"))
    with pytest.raises(HubError, match="not \\(completely\\) in the local cache"):
        resolve_input("org/never-downloaded")
    assert len(hub_server.log) == before

    # The CLI in a child process: cached works, not cached is one line and exit code 3.
    ok = run_cli("inspect", ADAPTER, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["counts"]["modules"] == 8
    bad = run_cli("inspect", "org/never-downloaded")
    assert bad.returncode == 3 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0], bad.stderr
    assert len(hub_server.log) == before


def test_base_download_and_merge_from_hub_ids(hub_server: HubServer, tmp_path: Path) -> None:
    from lora_tools.constants import MERGE_RECORD_NAME
    from lora_tools.ops.merge import merge

    sharded = FIX / "bases/tiny-llama-sharded"
    files = folder_files(sharded) | {
        "original/consolidated.safetensors": b"big and unused",
        "pytorch_model.bin": b"\x80\x04pickle",
        "README.md": b"# tiny\n",
    }
    hub_server.add_repo(f"{TEST_USER}/tiny-llama", files=files)
    seed_adapter(hub_server)
    base = resolve_input(f"{TEST_USER}/tiny-llama", role="base")
    want = sorted(p.name for p in sharded.iterdir())
    assert downloaded(hub_server, f"{TEST_USER}/tiny-llama") == want
    assert set(open_checkpoint(base).components[""].keys()) == set(
        open_checkpoint(sharded).components[""].keys()
    )

    merge(f"{TEST_USER}/tiny-llama", [ADAPTER], tmp_path / "from-hub", device="cpu")
    merge(sharded, [FIX / "peft/llama-lora"], tmp_path / "local", device="cpu")
    for shard in sorted(p.name for p in sharded.glob("*.safetensors")):
        hub_bytes = (tmp_path / "from-hub" / shard).read_bytes()
        assert hub_bytes == (tmp_path / "local" / shard).read_bytes()
    provenance = json.loads((tmp_path / "from-hub" / MERGE_RECORD_NAME).read_text())
    assert provenance["base"]["spec"] == f"{TEST_USER}/tiny-llama"


def test_diffusers_base_downloads_components_only(hub_server: HubServer) -> None:
    sd = FIX / "bases/tiny-sd"
    unet = (sd / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    files = folder_files(sd) | {
        "tiny-sd.safetensors": b"single-file checkpoint",
        "unet/diffusion_pytorch_model.fp16.safetensors": unet,
    }
    hub_server.add_repo("org/tiny-sd", files=files)
    folder = resolve_input("org/tiny-sd", role="base")
    assert downloaded(hub_server, "org/tiny-sd") == sorted(folder_files(sd))
    ckpt = open_checkpoint(folder)
    assert ckpt.kind == "diffusers"
    assert set(ckpt.components) == set(open_checkpoint(sd).components)


def test_hub_errors_are_one_line(
    hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, no_backoff_sleep: None
) -> None:
    with pytest.raises(HubError, match="no Hub repo 'tester/missing'"):
        resolve_input(f"{TEST_USER}/missing")
    seed_adapter(hub_server)
    with pytest.raises(HubError, match="revision 'nope' not found"):
        resolve_input(f"{ADAPTER}@nope")
    hub_server.add_repo("org/private", private=True, files=folder_files(FIX / "peft/llama-lora"))
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="or no access to it") as exc:
        resolve_input("org/private")
    assert "hf auth login" in str(exc.value)

    hub_server.fail_next("/tree/", 429, count=10)
    with pytest.raises(HubError, match="HTTP 429") as exc:
        resolve_input(ADAPTER)
    assert "rate limited" in str(exc.value) and "\n" not in str(exc.value)

    with pytest.raises(FormatError, match="no such file or folder"):
        resolve_input("definitely/not/a/path")


def test_hub_down_is_a_clean_error(hub_server: HubServer, no_backoff_sleep: None) -> None:
    hub_server.stop()
    with pytest.raises(HubError, match="cannot be reached") as exc:
        resolve_input(ADAPTER)
    assert "\n" not in str(exc.value)
