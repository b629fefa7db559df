"""Where ``merge -o`` writes, which side files it copies, and how a full disk is reported."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from lora_tools.errors import OutputError, UsageError
from lora_tools.io import atomic
from lora_tools.ops.merge import merge

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
FLUX = FIXTURES / "bases" / "tiny-flux.safetensors"
FLUX_LORA = FIXTURES / "kohya" / "flux-lora.safetensors"
LLAMA = FIXTURES / "bases" / "tiny-llama"
LLAMA_LORA = FIXTURES / "peft" / "llama-lora"


def test_single_file_base_into_a_folder_keeps_the_base_name(tmp_path: Path) -> None:
    folder = tmp_path / "flux-out"
    folder.mkdir()
    direct = tmp_path / "direct.safetensors"
    merge(FLUX, [FLUX_LORA], direct, device="cpu")
    for out in (f"{folder}/", folder):  # ending in "/", or naming an existing folder
        summary = merge(FLUX, [FLUX_LORA], out, device="cpu", force=True)
        written = folder / FLUX.name
        assert summary.output == str(written)
        assert [p.name for p in folder.iterdir()] == [FLUX.name]
        assert written.read_bytes() == direct.read_bytes()  # the same file, under the base's name


def test_single_file_base_output_names_that_cannot_work_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        merge(FLUX, [FLUX_LORA], f"{tmp_path}/missing/", device="cpu")
    with pytest.raises(UsageError, match=r"does not end in \.safetensors"):
        merge(FLUX, [FLUX_LORA], tmp_path / "flux-out", device="cpu")
    with pytest.raises(OutputError, match="same path as the input"):
        merge(FLUX, [FLUX_LORA], f"{FLUX.parent}/", device="cpu", force=True)
    assert list(tmp_path.iterdir()) == []


def test_folder_base_refuses_a_safetensors_output_name(tmp_path: Path) -> None:
    for out in (tmp_path / "x.safetensors", f"{tmp_path}/x.safetensors/"):
        with pytest.raises(UsageError, match="the base is a folder") as err:
            merge(LLAMA, [LLAMA_LORA], out, device="cpu")
        assert "-o" in (err.value.hint or "")
    assert list(tmp_path.iterdir()) == []


def _base_with_links(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base"
    shutil.copytree(LLAMA, base)
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "token").write_text("hf_secret")
    os.mkfifo(outside / "pipe")
    os.symlink(outside / "token", base / "notes.txt")  # leaves the folder
    os.symlink("/dev/null", base / "tokenizer.model")  # a device
    os.symlink(outside / "pipe", base / "vocab.txt")  # a FIFO outside
    os.mkfifo(base / "fifo")  # a FIFO inside
    os.symlink(outside, base / "extras")  # a folder outside
    os.symlink("config.json", base / "config-link.json")  # stays inside: copied as a file
    os.symlink("missing.txt", base / "broken.txt")
    return base, outside


def test_side_files_are_plain_files_only(tmp_path: Path) -> None:
    base, _outside = _base_with_links(tmp_path)
    out = tmp_path / "out"
    summary = merge(base, [LLAMA_LORA], out, device="cpu")
    skipped = {item["path"]: item["reason"] for item in summary.skipped_files}
    assert set(skipped) == {
        "notes.txt",
        "tokenizer.model",
        "vocab.txt",
        "fifo",
        "extras",
        "broken.txt",
    }
    assert "outside the folder" in skipped["notes.txt"]
    assert "FIFO" in skipped["fifo"] and "broken" in skipped["broken.txt"]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "README.md",
            "config-link.json",
            "config.json",
            "generation_config.json",
            "loratool_merge.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    link_copy = out / "config-link.json"
    assert (
        not link_copy.is_symlink() and link_copy.read_bytes() == (base / "config.json").read_bytes()
    )
    assert all(not p.is_symlink() for p in out.iterdir())
    assert "hf_secret" not in "".join(p.read_text(errors="replace") for p in out.iterdir())
    record = json.loads((out / "loratool_merge.json").read_text())
    assert record["skipped_files"] == list(summary.skipped_files)
    assert record["files"] == sorted(n for n in names if n != "loratool_merge.json")


def test_hub_cache_snapshot_links_are_followed(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--me--tiny-llama"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, src in enumerate(sorted(LLAMA.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(src, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / src.name)
    out = tmp_path / "out"
    summary = merge(snapshot, [LLAMA_LORA], out, device="cpu")
    assert summary.skipped_files == ()
    assert "tokenizer.json" in summary.copied_files
    assert (out / "tokenizer.json").read_bytes() == (LLAMA / "tokenizer.json").read_bytes()


def test_a_full_disk_names_the_output_and_readable_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "merged"
    usage = namedtuple("usage", "total used free")
    needed = sum(p.stat().st_size for p in LLAMA.glob("*.safetensors"))
    with monkeypatch.context() as m:  # checked before writing: a few kB short
        m.setattr(
            shutil, "disk_usage", lambda p: usage(10**9, 10**9 - needed + 4000, needed - 4000)
        )
        with pytest.raises(OutputError, match="not enough disk space") as err:
            merge(LLAMA, [LLAMA_LORA], out, device="cpu")
    assert err.value.path == str(out)
    text = str(err.value)
    needs, free = text.split(" needs ")[1].split(" free")[0].split(", ")
    assert needs != free and "0.00 GB" not in text

    def no_space(fd: int, mode: int, offset: int, length: int) -> int:
        import ctypes

        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(atomic, "_fallocate_call", lambda: no_space)  # found at the first file
    with pytest.raises(OutputError, match="not enough disk space") as err:
        merge(LLAMA, [LLAMA_LORA], out, device="cpu")
    assert err.value.path == str(out / "model.safetensors")
    assert ".partial-" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_side_file_copy_names_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(src: object, dst: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))

    monkeypatch.setattr(shutil, "copyfile", full)
    out = tmp_path / "merged"
    with pytest.raises(OutputError, match="No space left on device") as err:
        merge(LLAMA, [LLAMA_LORA], out, device="cpu")
    assert err.value.path == str(out / "config.json") and "free some space" in err.value.hint
    assert list(tmp_path.iterdir()) == []
