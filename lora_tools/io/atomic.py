"""Outputs that appear whole or not at all.

Files and folders are written under a hidden temporary name beside their destination and renamed
into place only when complete. An exception (including KeyboardInterrupt) removes the temporary.

A process stopped by SIGKILL cannot remove its temporary; the next write of the same
destination on the same machine removes it (:func:`remove_stale_temporaries`). The CLI turns
SIGTERM and SIGHUP into an exception, so ``kill`` cleans up like Ctrl-C.

Two strengths:

- atomic: a failed, interrupted or killed process leaves nothing at the destination. The data
  may still sit in the page cache when the call returns, as after ``cp`` or ``save_pretrained``.
- durable (``durable=True``): also survives a power loss or kernel crash. Every file is flushed
  to the disk (``fsync``) before the rename, and the folder holding the new name after it, so the
  name never points at data the disk does not have. This costs the time to write everything to
  the disk before returning.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from lora_tools.errors import OutputError


def _host() -> str:
    """This machine's name as it goes into temporary names (no dashes, no dots)."""
    return "".join(c for c in socket.gethostname() if c.isalnum()) or "host"


def _temp_sibling(path: Path, tag: str) -> Path:
    """``.NAME.TAG-HOST-PID-RANDOM`` beside ``path``: hidden, and traceable to its writer."""
    return path.with_name(f".{path.name}.{tag}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its files
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove what killed writers left beside ``path``; return what was removed.

    A writer stopped by SIGKILL (or a power loss) cannot clean up, so its hidden temporary
    (``.NAME.tmp-...`` / ``.NAME.partial-...``) stays. Before writing ``path`` again, those made
    on this machine by processes that no longer run are removed. Temporaries of running
    processes, and of other machines sharing the folder, are left alone.
    """
    removed = []
    prefixes = tuple(f".{path.name}.{tag}-{_host()}-" for tag in ("tmp", "partial", "old"))
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        if not sibling.name.startswith(prefixes):
            continue
        pid_text = sibling.name.rsplit("-", 2)[-2]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
            _remove(sibling)
            removed.append(sibling)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk (folders: POSIX only)."""
    is_dir = path.is_dir()
    if is_dir and not hasattr(os, "O_DIRECTORY"):
        return  # Windows cannot open a folder to flush it; NTFS journals the rename itself
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if is_dir else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (files first, then their folders)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder, name))
        fsync_path(Path(folder))


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], mode: str = "wb", *, durable: bool = True
) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; rename it to ``path`` when the block succeeds.

    With ``durable`` (the default: the files loratool writes this way are small) the data is
    flushed to the disk before the rename and the folder's entry after it.

    Example:
        >>> with atomic_file("/tmp/doc-atomic.bin") as fh:
        ...     _ = fh.write(b"ok")
    """
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = _temp_sibling(path, "tmp")
    try:
        fh = open(tmp, mode)  # noqa: SIM115 - closed below before the rename
    except OSError as exc:
        raise OutputError(f"cannot create output: {exc.strerror}", path=path) from None
    try:
        with fh:
            yield fh  # type: ignore[misc]
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if durable:
        fsync_path(path.parent)


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike[str], *, force: bool = False, durable: bool = True
) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; move it to ``path`` when the block succeeds.

    With ``force`` an existing ``path`` is replaced only after the new folder is complete. With
    ``durable`` (the default) every file and folder in it is flushed to the disk before the
    rename, and the parent folder after it.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputError("output already exists", path=path, hint="pass --force to replace it")
    remove_stale_temporaries(path)
    tmp = _temp_sibling(path, "partial")
    try:
        tmp.mkdir(parents=False)
    except OSError as exc:
        raise OutputError(f"cannot create output folder: {exc.strerror}", path=path) from None
    try:
        yield tmp
        if durable:
            _fsync_tree(tmp)
        if path.exists():
            old = _temp_sibling(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if durable:
        fsync_path(path.parent)


#: What to do about a full disk (every "no space" error says it).
NO_SPACE_HINT = "free some space or write the output elsewhere (-o)"


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def _no_space(
    path: str | os.PathLike[str], what: str, nbytes: int, free: int, detail: str = ""
) -> OutputError:
    return OutputError(
        f"not enough disk space: {what} needs {_gb(nbytes)}, {_gb(free)} free{detail}",
        path=path,
        hint=NO_SPACE_HINT,
    )


def require_space(folder: str | os.PathLike[str], nbytes: int, *, what: str) -> None:
    """Raise OutputError now when ``folder``'s file system has less than ``nbytes`` free.

    The check is made before anything is written, so that a full disk is a clear error at the
    start rather than a failed write halfway.
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # no such folder: creating the output there reports it
    if nbytes > free:
        raise _no_space(folder, what, nbytes, free)


_fallocate = None


def _fallocate_call():  # type: ignore[no-untyped-def]
    """libc's fallocate(2) through ctypes, or None where there is none (not Linux)."""
    global _fallocate
    if _fallocate is None and sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        call = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
        if call is not None:
            call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            call.restype = ctypes.c_int
            _fallocate = call
    return _fallocate


def preallocate(fd: int, nbytes: int, path: str | os.PathLike[str]) -> None:
    """Reserve ``nbytes`` for an open output file before writing it.

    The file system allocates the blocks in one call instead of page by page as the data
    arrives (measured: about 5% less CPU time for a 1.67 GB merge on ext4), and a full disk
    is found before the first byte is written. Skipped where fallocate(2) is missing or the
    file system does not support it (no emulation: glibc's posix_fallocate would write the
    whole file once more).

    Raises:
        OutputError: the file system has no room (ENOSPC) or the quota is exhausted.
    """
    call = _fallocate_call()
    if call is None or nbytes <= 0:
        return
    import ctypes

    if call(fd, 0, 0, nbytes) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(Path(path).parent).free
        raise _no_space(path, "the file", nbytes, free, f" ({os.strerror(err)})")


def check_output(
    out: str | os.PathLike[str],
    inputs: list[str | os.PathLike[str]],
    *,
    force: bool = False,
) -> Path:
    """Refuse an output that exists (without force), equals an input, or lies inside one."""
    out_path = Path(out).resolve()
    for item in inputs:
        src = Path(item).resolve()
        if out_path == src:
            raise OutputError(
                "output is the same path as an input", path=out, hint="choose another -o path"
            )
        if src.is_dir() and src in out_path.parents:
            raise OutputError(
                f"output lies inside the input folder {item}",
                path=out,
                hint="write the output beside the input, not inside it",
            )
    if out_path.exists() and not force:
        raise OutputError("output already exists", path=out, hint="pass --force to replace it")
    if not out_path.parent.is_dir():
        raise OutputError("the folder the output goes in does not exist", path=out)
    return out_path
