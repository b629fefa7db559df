"""Outputs that appear whole or not at all.

Files and folders are written under a hidden temporary name beside their destination and renamed
into place only when complete. An exception (including KeyboardInterrupt) removes the temporary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from lora_tools.errors import OutputError


def _temp_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; rename it to ``path`` when the block succeeds.

    Example:
        >>> with atomic_file("/tmp/doc-atomic.bin") as fh:
        ...     _ = fh.write(b"ok")
    """
    path = Path(path)
    tmp = _temp_sibling(path, "tmp")
    try:
        fh = open(tmp, mode)  # noqa: SIM115 - closed below before the rename
    except OSError as exc:
        raise OutputError(f"cannot create output: {exc.strerror}", path=path) from None
    try:
        with fh:
            yield fh  # type: ignore[misc]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; move it to ``path`` when the block succeeds.

    With ``force`` an existing ``path`` is replaced only after the new folder is complete.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputError("output already exists", path=path, hint="pass --force to replace it")
    tmp = _temp_sibling(path, "partial")
    try:
        tmp.mkdir(parents=False)
    except OSError as exc:
        raise OutputError(f"cannot create output folder: {exc.strerror}", path=path) from None
    try:
        yield tmp
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
