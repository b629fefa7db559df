"""Read safetensors files: the header from a path, and lazy tensor reads with positioned I/O."""

from __future__ import annotations

import math
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lora_tools.errors import FormatError, UnsafeFileError
from lora_tools.io.safetensors.dtypes import DTYPES, numpy_dtype, unpack_f4
from lora_tools.io.safetensors.header import Header, Problem, check_header
from lora_tools.io.safetensors.tensors import Tensor, TensorInfo

if TYPE_CHECKING:
    import numpy.typing as npt

#: The reference reader refuses headers longer than this many bytes.
MAX_HEADER_BYTES = 100_000_000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _raise(problem: Problem, path: str | os.PathLike[str]) -> None:
    raise FormatError(problem.message, path=path, hint=problem.hint, kind=problem.kind)


def file_kind(mode: int) -> str:
    """``FIFO``, ``character device``...: what a file that is not a regular file is."""
    for test, name in (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def read_header_bytes(path: str | os.PathLike[str]) -> tuple[bytes, int, int]:
    """Read the raw header of a file: (json bytes, header length N, file size).

    Checks the length field before allocating anything.
    """
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFileError(
            "pickle-based checkpoint; loratool never unpickles files (they can run code)",
            path=path,
            hint="convert it to .safetensors in a trusted environment",
            kind="pickle",
        )
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore the flag
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        with open(os.open(path, flags), "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(
                    f"not a regular file (a {file_kind(st.st_mode)}); reading it would block "
                    "or never end",
                    path=path,
                    hint="pass the .safetensors file itself",
                    kind="not-regular",
                )
            file_bytes = st.st_size
            if file_bytes < 8:
                raise FormatError(
                    f"file is {file_bytes} bytes, too short for a safetensors header",
                    path=path,
                    kind="file-too-small",
                )
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER_BYTES:
                raise FormatError(
                    f"header length field says {n} bytes, more than the {MAX_HEADER_BYTES} "
                    "the reference reader accepts",
                    path=path,
                    hint="this is not a safetensors file, or its first 8 bytes are corrupt",
                    kind="header-too-large",
                )
            if 8 + n > file_bytes:
                raise FormatError(
                    f"header length field says {n} bytes but the file has only "
                    f"{file_bytes - 8} after it",
                    path=path,
                    hint="the file is truncated or not a safetensors file",
                    kind="header-length",
                )
            return fh.read(n), n, file_bytes
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror}", path=path, kind="io") from None


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check the header of a safetensors file without reading tensor data.

    Raises:
        FormatError: naming the first problem found (see :func:`check_header`).
    """
    raw, n, size = read_header_bytes(path)
    header, problems = check_header(raw, n, size)
    if problems:
        _raise(problems[0], path)
    assert header is not None
    return header


class SafetensorsFile:
    """Lazy, read-only access to one safetensors file.

    Only the header is read on open. :meth:`read` reads one tensor (or a row range of it) with
    positioned reads; :meth:`iter_raw` yields a tensor's raw bytes in chunks for copying.
    Thread-safe for concurrent reads (``os.pread`` carries its own offset).

    Example:
        >>> with SafetensorsFile("/tmp/doc-example.safetensors") as f:
        ...     f.info("w").shape
        (2, 2)
    """

    def __init__(self, path: str | os.PathLike[str], header: Header | None = None) -> None:
        self._fd: int | None = None  # set first: __del__ runs even when the header is bad
        self.path = Path(path)
        self.header = header if header is not None else read_header(self.path)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.header.metadata or {})

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.header.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.header.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise FormatError(f"no tensor named {name!r}", path=self.path) from None

    def fileno(self) -> int:
        """The OS file descriptor (opened on first use), for kernel-side copies."""
        return self._fileno()

    def _fileno(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as exc:
                raise FormatError(f"cannot open: {exc.strerror}", path=self.path) from None
        return self._fd

    def _pread_into(self, buffer: memoryview, offset: int) -> None:
        fd = self._fileno()
        done = 0
        while done < len(buffer):
            n = os.preadv(fd, [buffer[done:]], offset + done)
            if n == 0:
                raise FormatError(
                    f"file ended while reading at byte {offset + done}",
                    path=self.path,
                    hint="the file changed or was truncated while loratool read it",
                    kind="truncated",
                )
            done += n

    def read_bytes(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        """Raw bytes of a tensor (or of a byte range within it), without decoding."""
        info = self.info(name)
        if length is None:
            length = info.nbytes - start
        if start < 0 or length < 0 or start + length > info.nbytes:
            raise FormatError(f"byte range outside tensor {name!r}", path=self.path)
        buf = bytearray(length)
        self._pread_into(memoryview(buf), self.header.data_start + info.begin + start)
        return bytes(buf)

    def iter_raw(self, name: str, chunk_bytes: int = 16 << 20) -> Iterator[memoryview]:
        """Yield a tensor's raw bytes in chunks of at most ``chunk_bytes`` (buffer is reused)."""
        info = self.info(name)
        buf = bytearray(min(chunk_bytes, max(info.nbytes, 1)))
        view = memoryview(buf)
        pos = 0
        while pos < info.nbytes:
            n = min(len(buf), info.nbytes - pos)
            self._pread_into(view[:n], self.header.data_start + info.begin + pos)
            yield view[:n]
            pos += n

    def read_into(self, name: str, out: np.ndarray, row_start: int = 0) -> np.ndarray:
        """Fill ``out`` with the raw bytes of tensor ``name`` from row ``row_start`` on.

        ``out`` is any C-contiguous array (usually a reused buffer of the tensor's dtype); it
        receives ``out.nbytes`` bytes, which must be whole rows inside the tensor.

        Example:
            >>> buf = np.empty((1, 2), np.float32)
            >>> with SafetensorsFile("/tmp/doc-example.safetensors") as f:
            ...     f.read_into("w", buf, row_start=1).tolist()
            [[0.0, 1.0]]
        """
        info = self.info(name)
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes
        start = row_start * row_bytes
        if not out.flags.c_contiguous or row_start < 0 or start + out.nbytes > info.nbytes:
            raise FormatError(f"rows outside tensor {name!r} (or a strided buffer)", path=self.path)
        if out.nbytes:
            self._pread_into(
                memoryview(out.reshape(-1).view(np.uint8)),
                self.header.data_start + info.begin + start,
            )
        return out

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Read one tensor, or rows ``rows`` of its first dimension, as a numpy array."""
        info = self.info(name)
        dt = numpy_dtype(info.dtype)
        bits = DTYPES[info.dtype].bits
        shape = list(info.shape)
        first, count = 0, info.numel
        if rows is not None:
            if not shape:
                raise FormatError(f"tensor {name!r} is a scalar; it has no rows", path=self.path)
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("row slices must be contiguous")
            row_elems = math.prod(shape[1:])
            if row_elems * bits % 8:
                raise FormatError(
                    f"rows of {info.dtype} tensor {name!r} do not start on byte boundaries",
                    path=self.path,
                    hint="read the whole tensor",
                )
            first = start * row_elems
            shape[0] = max(stop, start) - start
            count = shape[0] * row_elems
        raw = np.empty(count * bits // 8, np.uint8)
        if count:
            self._pread_into(
                memoryview(raw), self.header.data_start + info.begin + first * bits // 8
            )
        out = unpack_f4(raw) if info.dtype == "F4" else raw.view(dt)
        return out.reshape(shape)

    def tensor(self, name: str) -> FileTensor:
        return FileTensor(self, self.info(name))


class FileTensor(Tensor):
    """A tensor inside a :class:`SafetensorsFile`, read on demand."""

    def __init__(self, file: SafetensorsFile, info: TensorInfo) -> None:
        self.file = file
        self.info = info
        self.dtype = info.dtype
        self.shape = info.shape

    def numpy(self) -> np.ndarray:
        return self.file.read(self.info.name)

    def tobytes(self) -> bytes:
        return self.file.read_bytes(self.info.name)

    def iter_bytes(self, chunk_bytes: int = 16 << 20) -> Iterable[bytes | memoryview]:
        return self.file.iter_raw(self.info.name, chunk_bytes)

    def __array__(self, dtype: npt.DTypeLike = None, copy: bool | None = None) -> np.ndarray:
        # each read is a new array that nothing else holds: copy=True needs no second copy
        return np.array(self.numpy(), dtype=dtype, copy=False if copy is False else None)
