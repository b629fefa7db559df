"""What ``push`` (and ``push --dry-run``) uploads: plain files, never what a link smuggles in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lora_tools.errors import FormatError
from lora_tools.ops.merge import merge
from lora_tools.ops.push import plan_push

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA_LORA = FIXTURES / "peft" / "llama-lora"


def _secret(tmp_path: Path) -> Path:
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "token").write_text("hf_secret_token_value")
    os.mkfifo(outside / "pipe")
    return outside


def _add_hostile_entries(folder: Path, outside: Path) -> None:
    os.symlink(outside / "token", folder / "notes.txt")
    os.symlink("/dev/null", folder / "device.txt")
    os.symlink(outside / "pipe", folder / "pipe-link.txt")
    os.mkfifo(folder / "fifo")
    os.symlink("missing.txt", folder / "broken.txt")


def _uploaded(plan) -> list[str]:
    return [f.path_in_repo for f in plan.files]


def test_adapter_push_uploads_plain_files_only(tmp_path: Path) -> None:
    outside = _secret(tmp_path)
    adapter = tmp_path / "adapter"
    shutil.copytree(LLAMA_LORA, adapter)
    (adapter / "README.md").unlink()
    os.symlink(outside / "token", adapter / "README.md")  # would put the token into the card
    _add_hostile_entries(adapter, outside)
    os.symlink("adapter_config.json", adapter / "config-copy.txt")  # stays inside: fine
    plan = plan_push(adapter, "me/adapter", validator=None)
    assert _uploaded(plan) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config-copy.txt",
        "README.md",
    ]
    assert "hf_secret_token_value" not in plan.card
    for name in ("notes.txt", "device.txt", "pipe-link.txt", "fifo", "broken.txt", "README.md"):
        assert any(
            note.startswith(("skipped " + name, "did not use " + name)) for note in plan.notes
        ), name
    assert "hf_secret_token_value" not in " ".join(plan.notes)


def test_an_escaping_weights_link_is_refused(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(LLAMA_LORA, adapter)
    elsewhere = tmp_path / "elsewhere.safetensors"
    (adapter / "adapter_model.safetensors").rename(elsewhere)
    os.symlink(elsewhere, adapter / "adapter_model.safetensors")
    with pytest.raises(FormatError, match="adapter_model.safetensors is a symbolic link to"):
        plan_push(adapter, "me/adapter", validator=None)


def test_merged_model_push_skips_links_that_leave_the_folder(tmp_path: Path) -> None:
    outside = _secret(tmp_path)
    out = tmp_path / "merged"
    merge(FIXTURES / "bases" / "tiny-llama", [LLAMA_LORA], out, device="cpu")
    written = sorted(p.name for p in out.iterdir() if p.name != "README.md")
    _add_hostile_entries(out, outside)
    os.symlink(outside, out / "extras")  # a folder outside
    plan = plan_push(out, "me/merged")
    assert _uploaded(plan) == [*written, "README.md"]
    assert any(n.startswith("skipped extras") for n in plan.notes)
    assert any(n.startswith("skipped fifo (a FIFO") for n in plan.notes)


def test_hub_cache_snapshot_links_go_up(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--me--llama-lora"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, src in enumerate(sorted(LLAMA_LORA.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(src, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / src.name)
    plan = plan_push(snapshot, "me/adapter", validator=None)
    assert _uploaded(plan) == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    assert not any(n.startswith(("skipped", "did not use")) for n in plan.notes)
