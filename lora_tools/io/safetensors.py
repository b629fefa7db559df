"""The safetensors container: a header parser that trusts nothing, lazy reads, a streaming writer.

Layout (see docs/formats.md and shared/FORMATS.md section 1): 8-byte little-endian header length
N, N bytes of UTF-8 JSON, then the data buffer. The JSON maps tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional ``__metadata__`` object of
strings. Every number in the header is checked before it is used to allocate or seek.

Example:
    >>> import numpy as np
    >>> from lora_tools.io.safetensors import SafetensorsFile, save_tensors
    >>> save_tensors("/tmp/doc-example.safetensors", {"w": np.eye(2, dtype=np.float32)})
    >>> with SafetensorsFile("/tmp/doc-example.safetensors") as f:
    ...     f.read("w").tolist()
    [[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import json
import math
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_tools.errors import FormatError, LoraToolError, OutputError, UnsafeFileError
from lora_tools.io.atomic import NO_SPACE_HINT, atomic_file, preallocate

#: The reference reader refuses headers longer than this many bytes.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its name, width in bits and numpy equivalent.

    ``numpy_name`` names the numpy type: a numpy attribute (``"float16"``), an ``ml_dtypes``
    one (``"ml_dtypes.bfloat16"``), or None for the F6 types, whose packing of 4 elements into
    3 bytes no reference defines. ml_dtypes is imported only when :attr:`numpy` is first asked
    for one of its types: importing it takes about 1 s (ml_dtypes 0.7), and header-only work
    never needs it.
    """

    name: str
    bits: int
    numpy_name: str | None

    @property
    def decodable(self) -> bool:
        """Whether loratool can decode this dtype into a numpy array (the F6 types: no)."""
        return self.numpy_name is not None

    @property
    def numpy(self) -> np.dtype | None:
        """The numpy dtype (None for the F6 types); may import ml_dtypes."""
        return _numpy_type(self.numpy_name) if self.numpy_name is not None else None


@functools.cache
def _numpy_type(numpy_name: str) -> np.dtype:
    module, _, attr = numpy_name.rpartition(".")
    if module == "ml_dtypes":
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, attr))
    return np.dtype(getattr(np, attr))


# Declaration order matters: the reference writer sorts tensors by this order, descending.
DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 8, "bool_"),
        DType("F4", 4, "ml_dtypes.float4_e2m1fn"),  # packed two per byte, low nibble first
        DType("F6_E2M3", 6, None),
        DType("F6_E3M2", 6, None),
        DType("U8", 8, "uint8"),
        DType("I8", 8, "int8"),
        DType("F8_E5M2", 8, "ml_dtypes.float8_e5m2"),
        DType("F8_E4M3", 8, "ml_dtypes.float8_e4m3fn"),
        DType("F8_E8M0", 8, "ml_dtypes.float8_e8m0fnu"),
        DType("F8_E4M3FNUZ", 8, "ml_dtypes.float8_e4m3fnuz"),
        DType("F8_E5M2FNUZ", 8, "ml_dtypes.float8_e5m2fnuz"),
        DType("I16", 16, "int16"),
        DType("U16", 16, "uint16"),
        DType("F16", 16, "float16"),
        DType("BF16", 16, "ml_dtypes.bfloat16"),
        DType("I32", 32, "int32"),
        DType("U32", 32, "uint32"),
        DType("F32", 32, "float32"),
        DType("C64", 64, "complex64"),
        DType("F64", 64, "float64"),
        DType("I64", 64, "int64"),
        DType("U64", 64, "uint64"),
    )
}
_DTYPE_RANK = {name: i for i, name in enumerate(DTYPES)}
# numpy's name of each dtype (``np.dtype(...).name``: "float16", "bfloat16", "float8_e5m2"...),
# known without importing ml_dtypes: an array of an ml_dtypes type means ml_dtypes is loaded.
_NAME_TO_DTYPE = {
    d.numpy_name.rpartition(".")[2].rstrip("_"): d.name
    for d in DTYPES.values()
    if d.numpy_name is not None
}


def dtype_of(array: np.ndarray) -> str:
    """Return the safetensors dtype name of a numpy array.

    Example:
        >>> import ml_dtypes
        >>> dtype_of(np.zeros(2, dtype=ml_dtypes.bfloat16))
        'BF16'
    """
    name = _NAME_TO_DTYPE.get(array.dtype.name)
    if name is None or array.dtype != DTYPES[name].numpy:
        raise FormatError(
            f"numpy dtype {array.dtype} has no safetensors equivalent",
            hint="cast to float32, float16 or bfloat16 first",
        )
    return name


def numpy_dtype(name: str) -> np.dtype:
    """Return the numpy dtype for a safetensors dtype name (the F6 types have none)."""
    dt = DTYPES[name].numpy
    if dt is None:
        raise FormatError(
            f"dtype {name} packs 4 elements into 3 bytes in an order no reference defines",
            hint="loratool copies such tensors byte for byte but does not decode them",
            kind="dtype-not-decodable",
        )
    return dt


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file. Offsets are relative to the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a container. ``kind`` is a stable slug (validate maps it to a rule)."""

    kind: str
    message: str
    tensor: str | None = None
    hint: str | None = None


@dataclass(frozen=True)
class Header:
    """A parsed, fully checked safetensors header."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    header_bytes: int
    file_bytes: int
    duplicate_keys: tuple[str, ...] = field(default=())

    @property
    def data_start(self) -> int:
        """Absolute file offset of the data buffer."""
        return 8 + self.header_bytes

    @property
    def data_bytes(self) -> int:
        return self.file_bytes - self.data_start


def unpack_f4(packed: np.ndarray) -> np.ndarray:
    """F4 bytes -> one float4_e2m1fn per element: element ``2i`` is the low nibble of byte
    ``i``, element ``2i + 1`` the high nibble (PyTorch's ``float4_e2m1fn_x2`` layout, which the
    reference torch binding reads F4 as)."""
    codes = np.empty(packed.size * 2, np.uint8)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    return codes.view(numpy_dtype("F4"))


def scalar_value(raw: bytes, dtype: str) -> float:
    """The value of a one-element tensor from its raw bytes, as a Python float.

    bfloat16 is decoded as the top half of a float32 (exact), so that reading a bf16 file's
    alpha tensors does not import ml_dtypes (about 1 s); other dtypes go through numpy.

    Example:
        >>> scalar_value(bytes([0x80, 0x3F]), "BF16")
        1.0
    """
    if dtype == "BF16":
        bits = np.frombuffer(raw, "<u2").astype("<u4") << np.uint32(16)
        return float(bits.view("<f4")[0])
    if dtype == "F4":
        return float(unpack_f4(np.frombuffer(raw, np.uint8))[0])
    return float(np.frombuffer(raw, numpy_dtype(dtype))[0])


def pack_f4(values: np.ndarray) -> np.ndarray:
    """float4_e2m1fn elements (an even count) -> F4 bytes; the inverse of :func:`unpack_f4`."""
    codes = np.ascontiguousarray(values).reshape(-1).view(np.uint8) & 0x0F
    if codes.size % 2:
        raise FormatError(f"{codes.size} F4 elements do not fill whole bytes", kind="misaligned")
    return codes[0::2] | (codes[1::2] << 4)


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes a tensor of this dtype and shape occupies; FormatError if not a whole number."""
    bits = math.prod(shape) * DTYPES[dtype].bits
    if bits % 8:
        raise FormatError(
            f"{math.prod(shape)} elements of {dtype} do not fill a whole number of bytes",
            kind="misaligned",
        )
    return bits // 8


def _pairs_with_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = dict(pairs)  # one C call per object: the common case, no duplicates
    if len(out) == len(pairs):
        return out
    seen: set[str] = set()
    dups: list[str] = []
    for key, _ in pairs:
        if key in seen:
            dups.append(key)
        seen.add(key)
    out.setdefault("\x00duplicates", []).extend(dups)  # type: ignore[union-attr]
    return out


def _lone_surrogate(doc: dict[str, object]) -> str | None:
    """The first tensor name, metadata key or value that cannot be encoded as UTF-8."""
    metadata = doc.get(METADATA_KEY)
    strings = list(doc)
    if isinstance(metadata, dict):
        strings += [s for kv in metadata.items() for s in kv if isinstance(s, str)]
    for text in strings:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return text
    return None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small acyclic objects (a
    million-tensor header): its collections would visit every live object again and again,
    doubling the parse time. Reference counting still frees everything as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_header(
    header_json: bytes, header_bytes: int, file_bytes: int
) -> tuple[Header | None, list[Problem]]:
    """Check a header against every rule of the reference reader, plus duplicate keys.

    Returns the parsed header (None if it could not be parsed far enough to locate tensors) and
    every problem found. :func:`read_header` raises the first problem; ``loratool validate``
    reports all of them.
    """
    problems: list[Problem] = []
    try:
        text = header_json.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [Problem("header-utf8", f"header is not valid UTF-8 ({exc.reason})")]
    if not text.startswith("{"):
        return None, [Problem("header-json", "header does not start with '{'")]
    try:
        with gc_paused():
            doc = json.loads(text, object_pairs_hook=_pairs_with_duplicates)
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = str(exc) if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        return None, [Problem("header-json", f"header is not valid JSON: {msg}")]
    if not isinstance(doc, dict):
        return None, [Problem("header-json", "header JSON is not an object")]
    if "\\ud" in text.lower() and (lone := _lone_surrogate(doc)) is not None:
        return None, [
            Problem(
                "header-json",
                f"header string {lone!r} holds a lone UTF-16 surrogate escape, which is not "
                "valid Unicode; the reference reader rejects the header",
            )
        ]
    duplicates = tuple(doc.pop("\x00duplicates", ()))
    for name in duplicates:
        problems.append(
            Problem(
                "duplicate-key",
                f"key {name!r} appears more than once in the header; readers disagree on which wins",
                tensor=name,
                hint="rewrite the file with a tool that writes each key once",
            )
        )

    metadata = doc.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict):
            problems.append(Problem("metadata-type", "__metadata__ is not an object"))
            metadata = None
        else:
            bad = {k: v for k, v in metadata.items() if not isinstance(v, str)}
            if bad:
                key, value = next(iter(bad.items()))
                problems.append(
                    Problem(
                        "metadata-type",
                        f"__metadata__[{key!r}] must be a string, found "
                        f"{type(value).__name__} {json.dumps(value)[:40]}",
                        hint="metadata values must be strings; JSON-encode structured values",
                    )
                )
                metadata = {k: v for k, v in metadata.items() if isinstance(v, str)}

    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    with gc_paused():
        for name, entry in doc.items():
            info = _check_entry(name, entry, problems)
            if info is not None:
                tensors[name] = info
                spans.append((info.begin, info.end, name))
            elif (span := _valid_offsets(entry)) is not None:
                # An entry rejected for its dtype or shape still occupies its bytes: keeping its
                # span stops one bad entry from also being reported as a gap or as trailing bytes.
                spans.append((*span, name))

    expected_end = 0
    for begin, end, name in sorted(spans):
        if begin > expected_end:
            problems.append(
                Problem(
                    "gap",
                    f"tensor {name!r} starts at byte {begin} of the data buffer, "
                    f"expected {expected_end}: {begin - expected_end} bytes belong to no tensor",
                    tensor=name,
                )
            )
        elif begin < expected_end:
            problems.append(
                Problem(
                    "overlap",
                    f"tensor {name!r} starts at byte {begin}, inside the previous "
                    f"tensor which ends at {expected_end}",
                    tensor=name,
                )
            )
        expected_end = max(expected_end, end)

    actual_data = file_bytes - 8 - header_bytes
    if expected_end > actual_data:
        problems.append(
            Problem(
                "truncated",
                f"tensors need {expected_end} data bytes but the file holds {actual_data}",
                hint="the file is truncated; copy or download it again",
            )
        )
    elif expected_end < actual_data:
        problems.append(
            Problem(
                "trailing-bytes",
                f"{actual_data - expected_end} bytes after the last tensor belong to no tensor",
            )
        )
    header = Header(tensors, metadata, header_bytes, file_bytes, duplicates)
    return header, problems


def _valid_offsets(entry: object) -> tuple[int, int] | None:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_uint(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        return offsets[0], offsets[1]
    return None


def _check_entry(name: str, entry: object, problems: list[Problem]) -> TensorInfo | None:
    if not isinstance(entry, dict):
        problems.append(Problem("header-json", f"entry {name!r} is not an object", tensor=name))
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        problems.append(
            Problem(
                "dtype",
                f"tensor {name!r} has unknown dtype {dtype!r}",
                tensor=name,
                hint=f"known dtypes: {', '.join(DTYPES)}",
            )
        )
        return None
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        problems.append(
            Problem(
                "shape",
                f"tensor {name!r} has shape {shape!r}, expected a list of non-negative integers",
                tensor=name,
            )
        )
        return None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_uint(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        problems.append(
            Problem(
                "offsets",
                f"tensor {name!r} has data_offsets {offsets!r}, expected [begin, end] with "
                "0 <= begin <= end",
                tensor=name,
            )
        )
        return None
    numel = math.prod(shape)
    bits = numel * DTYPES[dtype].bits
    if bits % 8:
        problems.append(
            Problem(
                "size-mismatch",
                f"tensor {name!r}: {numel} elements of {dtype} do not fill whole bytes",
                tensor=name,
            )
        )
        return None
    begin, end = offsets
    if bits // 8 != end - begin or bits >= 2**64:
        problems.append(
            Problem(
                "size-mismatch",
                f"tensor {name!r}: shape {shape} of {dtype} needs {bits // 8} bytes, "
                f"data_offsets span {end - begin}",
                tensor=name,
            )
        )
        return None
    return TensorInfo(name, dtype, tuple(shape), begin, end)


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


class Tensor:
    """A tensor known by dtype and shape whose data may not be loaded yet.

    Two kinds exist: :class:`FileTensor` (lazy, in a safetensors file) and :class:`ArrayTensor`
    (a numpy array in memory). Pass-through tensors stay FileTensors and are copied as bytes.
    """

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def numpy(self) -> np.ndarray:
        raise NotImplementedError

    def tobytes(self) -> bytes:
        raise NotImplementedError

    def iter_bytes(self, chunk_bytes: int = 16 << 20) -> Iterable[bytes | memoryview]:
        yield self.tobytes()


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

    def __repr__(self) -> str:
        return f"FileTensor({self.info.name!r}, {self.dtype}, {list(self.shape)})"


class ArrayTensor(Tensor):
    """A tensor held as a numpy array."""

    def __init__(self, array: np.ndarray, dtype: str | None = None) -> None:
        array = np.asarray(array)
        if dtype is not None and array.dtype != numpy_dtype(dtype):
            array = array.astype(numpy_dtype(dtype))
        self.array = array if array.flags.c_contiguous else array.copy(order="C")
        self.dtype = dtype_of(self.array)
        self.shape = tuple(self.array.shape)

    def numpy(self) -> np.ndarray:
        return self.array

    def tobytes(self) -> bytes:
        if self.dtype == "F4":
            return pack_f4(self.array).tobytes()
        return self.array.astype(self.array.dtype.newbyteorder("<"), copy=False).tobytes()

    def __repr__(self) -> str:
        return f"ArrayTensor({self.dtype}, {list(self.shape)})"


def as_tensor(value: Tensor | np.ndarray) -> Tensor:
    return value if isinstance(value, Tensor) else ArrayTensor(value)


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
