"""Atomic outputs: whole or nothing, and (when durable) on the disk before they appear."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_tools.io import atomic
from lora_tools.io.atomic import atomic_dir, atomic_file

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


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


def test_preallocate_reserves_the_file_and_reports_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from lora_tools.errors import OutputError
    from lora_tools.io.atomic import preallocate

    path = tmp_path / "f.bin"
    with open(path, "wb") as fh:
        preallocate(fh.fileno(), 1 << 20, path)
        assert os.fstat(fh.fileno()).st_size == 1 << 20  # fallocate mode 0 extends the file

    def failing(code: int):  # a fallocate(2) that fails with errno ``code``
        def call(fd: int, mode: int, offset: int, length: int) -> int:
            import ctypes

            ctypes.set_errno(code)
            return -1

        return lambda: call

    monkeypatch.setattr(atomic, "_fallocate_call", failing(errno.ENOSPC))
    with open(path, "wb") as fh, pytest.raises(OutputError, match="not enough disk space") as err:
        preallocate(fh.fileno(), 5 * 10**9, path)
    assert "needs 5.00 GB" in str(err.value) and str(path) in str(err.value)

    monkeypatch.setattr(atomic, "_fallocate_call", failing(errno.EOPNOTSUPP))
    with open(path, "wb") as fh:
        preallocate(fh.fileno(), 1 << 20, path)  # skipped: the writes allocate as they go


def test_require_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    from lora_tools.errors import OutputError
    from lora_tools.io.atomic import require_space

    require_space(tmp_path, 1, what="x")
    require_space(tmp_path / "missing", 1, what="x")  # left to the code that creates it
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**10, 10**10 - 10**6, 10**6))
    with pytest.raises(OutputError, match=r"the model needs 2.00 GB, 1.00 MB free"):
        require_space(tmp_path, 2 * 10**9, what="the model")


def test_temporaries_of_dead_writers_on_this_machine_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from lora_tools.io.atomic import _host

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [
            tmp_path / f".out.partial-{_host()}-{dead_pid}-0123abcd",
            tmp_path / f".out.old-{_host()}-{dead_pid}-0123abce",
        ]
        kept = [
            tmp_path / f".out.partial-{_host()}-{live.pid}-0123abcf",  # still being written
            tmp_path / f".out.partial-otherhost-{dead_pid}-0123abd0",  # another machine's
            tmp_path / f".outer.partial-{_host()}-{dead_pid}-0123abd1",  # another output's
        ]
        for folder in stale + kept:
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"partial")
        (tmp_path / f".out.tmp-{_host()}-{dead_pid}-0123abd2").write_bytes(b"partial")
        with atomic_dir(tmp_path / "out", durable=False) as tmp:
            (tmp / "a.txt").write_text("a")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["out", *(p.name for p in kept)]
        )
    finally:
        live.kill()
        live.wait()
