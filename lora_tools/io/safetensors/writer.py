"""Write safetensors files: the reference layout, streamed tensor by tensor, atomically."""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_tools.errors import FormatError, LoraToolError, OutputError
from lora_tools.io.atomic import NO_SPACE_HINT, atomic_file, preallocate
from lora_tools.io.safetensors.dtypes import _DTYPE_RANK, dtype_of, tensor_nbytes
from lora_tools.io.safetensors.header import METADATA_KEY
from lora_tools.io.safetensors.tensors import Tensor, as_tensor


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to know about a tensor before its data exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def reference_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """Sort as the reference writer does: by dtype descending, then by name."""
    return sorted(specs, key=lambda s: (-_DTYPE_RANK[s.dtype], s.name))


def encode_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length plus JSON header for tensors laid out in the given order.

    The JSON is compact, metadata first, padded with spaces to a multiple of 8 bytes: the same
    bytes the reference writer produces for the same order.
    """
    doc: dict[str, object] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise FormatError(
                    f"metadata {key!r} must map a string to a string, found {type(value).__name__}"
                )
        doc[METADATA_KEY] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.name == METADATA_KEY or spec.name in doc:
            raise FormatError(f"tensor name {spec.name!r} is reserved or repeated")
        size = spec.nbytes
        doc[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, header first, atomically.

    The header is computed from the specs, so every shape and dtype must be known up front.
    Two ways to fill it in, not mixed in one file:

    - sequential: :meth:`write` (and :meth:`copy_range` without ``at``) in :attr:`order`, a
      tensor possibly in several chunks (row blocks);
    - positional: :meth:`write_at` and ``copy_range(..., at=...)`` put bytes at an offset inside
      a tensor, in any order and from several threads at once (``os.pwrite``); every byte must be
      written exactly once. With ``stream_to_disk`` each positional write is handed to the disk
      at once and dropped from the page cache (``posix_fadvise(DONTNEED)``), so the closing
      fsync has little left to wait for and a file larger than RAM does not push everything
      else out of the cache.

    The file appears under its final name only when every byte has been written; on any
    exception the temporary file is removed. With ``durable`` (the default) the data is on the
    disk before the rename (:func:`lora_tools.io.atomic.atomic_file`).

    Example:
        >>> spec = TensorSpec("w", "F32", (2, 2))
        >>> with SafetensorsWriter("/tmp/doc-writer.safetensors", [spec]) as w:
        ...     w.write("w", np.ones((1, 2), np.float32))
        ...     w.write("w", np.zeros((1, 2), np.float32))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Iterable[TensorSpec],
        metadata: Mapping[str, str] | None = None,
        *,
        keep_order: bool = False,
        stream_to_disk: bool = False,
        durable: bool = True,
    ) -> None:
        specs = list(specs)
        self.stream_to_disk = stream_to_disk and hasattr(os, "posix_fadvise")
        self.order = specs if keep_order else reference_order(specs)
        self._specs = {s.name: s for s in self.order}
        self.path = Path(path)
        self._header = encode_header(self.order, metadata)
        self._starts: dict[str, int] = {}
        pos = len(self._header)
        for spec in self.order:
            self._starts[spec.name] = pos
            pos += spec.nbytes
        self._index = 0
        self._written = 0
        self._positional: dict[str, int] | None = None
        self._lock = threading.Lock()
        self._atomic = atomic_file(self.path, durable=durable)
        self._fh = None

    def _spec_for(self, name: str) -> TensorSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise LoraToolError(f"tensor {name!r} is not in the header", path=self.path) from None

    @property
    def total_bytes(self) -> int:
        return len(self._header) + sum(s.nbytes for s in self.order)

    def __enter__(self) -> SafetensorsWriter:
        self._fh = self._atomic.__enter__()
        try:
            preallocate(self._fh.fileno(), self.total_bytes, self.path)
            self._fh.write(self._header)
        except BaseException as exc:
            self._atomic.__exit__(type(exc), exc, exc.__traceback__)
            if isinstance(exc, OSError):
                raise self._write_error(exc) from None
            raise
        return self

    def _write_error(self, exc: OSError, what: str = "the output") -> OutputError:
        """A failed write (a full disk, an I/O error) as one error naming the output."""
        return OutputError(
            f"cannot write {what}: {exc.strerror or exc}",
            path=self.path,
            hint=NO_SPACE_HINT if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None,
        )

    def _advance(self) -> None:
        while self._index < len(self.order) and self._written == self.order[self._index].nbytes:
            self._index += 1
            self._written = 0

    @staticmethod
    def _as_bytes(data: np.ndarray | bytes | memoryview) -> memoryview:
        if isinstance(data, np.ndarray):
            # A uint8 view, not memoryview(array): ml_dtypes types (bfloat16, float8) have no
            # buffer-protocol format code.
            return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        return memoryview(data).cast("B")

    def _check_dtype(self, name: str, data: np.ndarray | bytes | memoryview) -> None:
        if isinstance(data, np.ndarray) and dtype_of(data) != self._spec_for(name).dtype:
            raise LoraToolError(
                f"tensor {name!r}: data has dtype {dtype_of(data)}, "
                f"header says {self._spec_for(name).dtype}"
            )

    def _sequential_slot(self, name: str, size: int) -> None:
        """Check that ``size`` bytes of ``name`` come next in sequential order."""
        if self._positional is not None:
            raise LoraToolError("sequential write after positional writes", path=self.path)
        self._advance()
        if self._index >= len(self.order):
            raise LoraToolError(f"tensor {name!r} written after all tensors were complete")
        spec = self.order[self._index]
        if spec.name != name:
            raise LoraToolError(f"tensor {name!r} written out of order; expected {spec.name!r}")
        if self._written + size > spec.nbytes:
            raise LoraToolError(
                f"tensor {name!r}: {self._written + size} bytes written, header says {spec.nbytes}"
            )

    def write(self, name: str, data: np.ndarray | bytes | memoryview) -> None:
        """Append data (whole tensor or the next chunk of it) for tensor ``name``."""
        assert self._fh is not None, "use SafetensorsWriter as a context manager"
        self._check_dtype(name, data)
        view = self._as_bytes(data)
        if view.nbytes == 0:
            return
        self._sequential_slot(name, view.nbytes)
        try:
            self._fh.write(view)
        except OSError as exc:
            raise self._write_error(exc) from None
        self._written += view.nbytes

    def _claim(self, name: str, at: int, size: int) -> int:
        """Record a positional write of ``size`` bytes at ``at`` in ``name``; its file offset."""
        spec = self._spec_for(name)
        if at < 0 or at + size > spec.nbytes:
            raise LoraToolError(
                f"tensor {name!r}: bytes {at}..{at + size} lie outside its {spec.nbytes}",
                path=self.path,
            )
        with self._lock:
            if self._positional is None:
                if self._index or self._written:
                    raise LoraToolError("positional write after sequential writes", path=self.path)
                assert self._fh is not None, "use SafetensorsWriter as a context manager"
                self._fh.flush()
                self._positional = {}
            self._positional[name] = self._positional.get(name, 0) + size
        return self._starts[name] + at

    def write_at(self, name: str, at: int, data: np.ndarray | bytes | memoryview) -> None:
        """Write ``data`` at byte ``at`` of tensor ``name`` (positional mode; thread-safe).

        Example:
            >>> spec = TensorSpec("w", "F32", (2, 2))
            >>> with SafetensorsWriter("/tmp/doc-writer.safetensors", [spec]) as w:
            ...     w.write_at("w", 8, np.zeros((1, 2), np.float32))
            ...     w.write_at("w", 0, np.ones((1, 2), np.float32))
        """
        assert self._fh is not None, "use SafetensorsWriter as a context manager"
        self._check_dtype(name, data)
        view = self._as_bytes(data)
        pos = self._claim(name, at, view.nbytes)
        fd = self._fh.fileno()
        done = 0
        try:
            while done < view.nbytes:
                done += os.pwrite(fd, view[done:], pos + done)
        except OSError as exc:
            raise self._write_error(exc) from None
        self._written_out(pos, view.nbytes)

    def _written_out(self, pos: int, nbytes: int) -> None:
        if self.stream_to_disk and nbytes:
            assert self._fh is not None
            # starts writeback of the range now (and drops the pages once they are clean)
            os.posix_fadvise(self._fh.fileno(), pos, nbytes, os.POSIX_FADV_DONTNEED)

    def copy_range(
        self,
        name: str,
        fd: int,
        offset: int,
        nbytes: int,
        *,
        at: int | None = None,
        on_chunk: Callable[[int], None] | None = None,
        chunk_bytes: int = 64 << 20,
    ) -> None:
        """Copy ``nbytes`` bytes of tensor ``name`` from ``fd`` at ``offset``.

        Appended in sequential mode (``at`` None), or placed at byte ``at`` of the tensor in
        positional mode. The copy runs in the kernel (``os.copy_file_range``: no Python buffers,
        no GIL) and falls back to positioned reads and writes where that call is missing or
        refused (another file system, an old kernel). ``on_chunk`` is called with the bytes of
        each chunk copied.

        Example:
            >>> spec = TensorSpec("w", "F32", (2, 2))
            >>> with SafetensorsFile("/tmp/doc-example.safetensors") as src:
            ...     with SafetensorsWriter("/tmp/doc-copy.safetensors", [spec]) as w:
            ...         w.copy_range("w", src.fileno(), src.header.data_start, 16)
        """
        assert self._fh is not None, "use SafetensorsWriter as a context manager"
        if nbytes == 0:
            return
        if at is None:
            self._sequential_slot(name, nbytes)
            self._fh.flush()
            pos = self._fh.tell()
        else:
            pos = self._claim(name, at, nbytes)
        out_fd = self._fh.fileno()
        done = 0
        while done < nbytes:
            n = min(chunk_bytes, nbytes - done)
            try:
                copied = _copy_chunk(fd, out_fd, offset + done, pos + done, n)
            except OSError as exc:
                raise self._write_error(exc, f"tensor {name!r}") from None
            if copied == 0:
                raise FormatError(
                    f"source ended while copying tensor {name!r}",
                    hint="the input file changed or was truncated while loratool read it",
                    kind="truncated",
                )
            done += copied
            if on_chunk is not None:
                on_chunk(copied)
        if at is None:
            # the buffered file object must continue after the bytes the kernel wrote
            self._fh.seek(pos + nbytes)
            self._written += nbytes
        else:
            self._written_out(pos, nbytes)

    def _missing(self) -> str | None:
        """The first tensor not completely written, or None."""
        if self._positional is not None:
            for spec in self.order:
                if self._positional.get(spec.name, 0) != spec.nbytes:
                    return spec.name
            return None
        self._advance()
        return self.order[self._index].name if self._index < len(self.order) else None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and (missing := self._missing()) is not None:
            err = LoraToolError(f"tensor {missing!r} was never written", path=self.path)
            self._atomic.__exit__(type(err), err, None)
            raise err
        try:
            self._atomic.__exit__(exc_type, exc, tb)
        except OSError as error:  # flushing, fsync or the rename failed; the temporary is gone
            if exc_type is not None:
                raise
            raise self._write_error(error) from None


_COPY_REFUSED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


def _copy_chunk(src: int, dst: int, src_pos: int, dst_pos: int, nbytes: int) -> int:
    """Copy up to ``nbytes`` between file positions in the kernel; returns bytes copied."""
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(src, dst, nbytes, src_pos, dst_pos)
        except OSError as exc:
            if exc.errno not in _COPY_REFUSED:
                raise
    data = os.pread(src, nbytes, src_pos)
    return os.pwrite(dst, data, dst_pos) if data else 0


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor | np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors (numpy arrays or lazy Tensors) to a new safetensors file, atomically.

    Lazy :class:`FileTensor` values are copied as raw bytes without decoding.
    """
    items = {name: as_tensor(value) for name, value in tensors.items()}
    specs = [TensorSpec(name, t.dtype, t.shape) for name, t in items.items()]
    with SafetensorsWriter(path, specs, metadata) as writer:
        for spec in writer.order:
            for chunk in items[spec.name].iter_bytes():
                writer.write(spec.name, chunk)
