"""Atomic outputs: whole or nothing, and (when durable) on the disk before they appear."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_tools.io import atomic
from lora_tools.io.atomic import atomic_dir, atomic_file

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths os.fsync is called on, in order (resolved through /proc/self/fd)."""
    calls: list[Path] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    return calls


def test_durable_file_is_flushed_before_the_rename_and_its_folder_after(
    tmp_path: Path, synced: list[Path]
) -> None:
    target = tmp_path / "out.bin"
    with atomic_file(target) as fh:
        fh.write(b"data")
    assert target.read_bytes() == b"data"
    assert len(synced) == 2
    assert synced[0].parent == tmp_path and synced[0].name.startswith(".out.bin.tmp-")
    assert synced[1] == tmp_path


def test_file_without_durable_is_not_flushed(tmp_path: Path, synced: list[Path]) -> None:
    with atomic_file(tmp_path / "out.bin", durable=False) as fh:
        fh.write(b"data")
    assert (tmp_path / "out.bin").read_bytes() == b"data"
    assert synced == []


def test_durable_folder_flushes_every_file_and_folder(tmp_path: Path, synced: list[Path]) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert (out / "sub" / "b.txt").read_text() == "b"
    names = [p.relative_to(tmp_path).parts for p in synced]
    temp = names[0][0]
    assert temp.startswith(".out.partial-")
    # files before the folder holding them, the new folder's parent last
    assert names == [(temp, "sub", "b.txt"), (temp, "sub"), (temp, "a.txt"), (temp,), ()]


def test_folder_without_durable_is_not_flushed(tmp_path: Path, synced: list[Path]) -> None:
    with atomic_dir(tmp_path / "out", durable=False) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert synced == []


@pytest.mark.parametrize("durable", [True, False])
def test_a_failure_leaves_nothing(tmp_path: Path, durable: bool) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "out", durable=durable) as tmp:
        (tmp / "a.txt").write_text("a")
        raise KeyboardInterrupt
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "f.bin", durable=durable) as fh:
        fh.write(b"partial")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
