"""A spool: tensors a long job produces, kept in an anonymous temporary file until written.

``extract`` makes a few small factors per layer and writes them all at the end (the header
needs every shape first, and ranks are chosen as it goes). Held as arrays they grow with the
model (about 84 MB at rank 16 for an 8B model); spooled, the process holds none of them, and
the writer streams them back one tensor at a time like any :class:`FileTensor`.

The file is unlinked from the start (``tempfile.TemporaryFile``), so nothing is left behind
whatever happens to the process; it lives until the spool and every tensor in it are gone.

Example:
    >>> import numpy as np
    >>> spool = Spool()
    >>> t = spool.put(np.arange(6, dtype=np.float32).reshape(2, 3))
    >>> t, t.numpy().tolist()
    (SpooledTensor(F32, [2, 3]), [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterable, Iterator

import numpy as np

from lora_tools.io.safetensors.dtypes import numpy_dtype, unpack_f4
from lora_tools.io.safetensors.tensors import ArrayTensor, Tensor


class Spool:
    """Appends tensors' bytes to one anonymous temporary file (in ``dir``, default the
    system's temporary directory) and hands back lazy :class:`SpooledTensor` views."""

    def __init__(self, dir: str | os.PathLike[str] | None = None) -> None:
        # no context manager: the file lives as long as the spool (closed with it, or collected)
        self._file = tempfile.TemporaryFile(prefix="loratool-spool-", dir=dir)  # noqa: SIM115
        self._end = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes spooled so far."""
        return self._end

    def put(self, array: np.ndarray, dtype: str | None = None) -> SpooledTensor:
        """Spool ``array`` (cast to safetensors dtype ``dtype`` when given); the array is not
        kept."""
        tensor = ArrayTensor(array, dtype)
        data = tensor.tobytes()
        with self._lock:
            offset, self._end = self._end, self._end + len(data)
            _pwrite_all(self._file.fileno(), data, offset)
        return SpooledTensor(self, tensor.dtype, tensor.shape, offset, len(data))

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the spooled bytes from ``offset`` on."""
        done = 0
        while done < len(out):
            n = os.preadv(self._file.fileno(), [out[done:]], offset + done)
            if n == 0:  # pragma: no cover - the file is private to this process
                raise OSError(f"spool ended at byte {offset + done}")
            done += n

    def close(self) -> None:
        self._file.close()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class SpooledTensor(Tensor):
    """A tensor whose bytes lie in a :class:`Spool`, read back on demand."""

    def __init__(
        self, spool: Spool, dtype: str, shape: tuple[int, ...], offset: int, length: int
    ) -> None:
        self.spool = spool
        self.dtype = dtype
        self.shape = shape
        self.offset = offset
        self.length = length

    def _raw(self) -> np.ndarray:
        raw = np.empty(self.length, np.uint8)
        self.spool.read_into(self.offset, memoryview(raw))
        return raw

    def tobytes(self) -> bytes:
        return self._raw().tobytes()

    def iter_bytes(self, chunk_bytes: int = 16 << 20) -> Iterable[bytes | memoryview]:
        return _chunks(self, chunk_bytes)

    def numpy(self) -> np.ndarray:
        """A new, writable array (as a :class:`FileTensor` read is)."""
        raw = self._raw()
        out = unpack_f4(raw) if self.dtype == "F4" else raw.view(numpy_dtype(self.dtype))
        return out.reshape(self.shape)


def _chunks(tensor: SpooledTensor, chunk_bytes: int) -> Iterator[memoryview]:
    buf = memoryview(bytearray(min(max(chunk_bytes, 1), max(tensor.length, 1))))
    for start in range(0, tensor.length, len(buf)):
        n = min(len(buf), tensor.length - start)
        tensor.spool.read_into(tensor.offset + start, buf[:n])
        yield buf[:n]
