"""Read GGUF files, llama.cpp's container, through llama.cpp's own ``gguf`` package.

A GGUF file is a header (magic ``GGUF``, version, key-value metadata, then each tensor's name,
dimensions, GGML type and offset) followed by the aligned tensor data. ``gguf.GGUFReader``
memory-maps the file, so listing key-values and tensors reads the header only; a tensor's
values are read, and dequantized to float32 (``gguf.quants.dequantize``: F16, BF16, Q8_0 and
the other block types), when :meth:`GgufTensor.numpy` asks for them.

``gguf`` is an optional extra (``pip install 'loratool[gguf]'``), imported on first use only:
only GGUF paths pay for it, and header-only work on safetensors never imports it.

Example:
    >>> with GgufFile("adapter.gguf") as f:                       # doctest: +SKIP
    ...     f.kv["adapter.lora.alpha"].value, f.tensors["blk.0.attn_q.weight.lora_a"].shape
    (16.0, (8, 4096))
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.errors import FormatError, UsageError
from lora_tools.io.safetensors.reader import file_kind
from lora_tools.io.safetensors.tensors import Tensor

#: The first four bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
GGUF_SUFFIX = ".gguf"
#: How to get the optional ``gguf`` package.
GGUF_INSTALL_HINT = "pip install 'loratool[gguf]' (llama.cpp's gguf package)"
#: GGML types that hold integers: no LoRA factor is one.
INTEGER_TYPES = frozenset({"I8", "I16", "I32", "I64"})
#: Pseudo-fields GGUFReader lists beside the file's own key-values.
_READER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")


def gguf_package(operation: str = "reading a GGUF file") -> Any:
    """The ``gguf`` module, imported now; UsageError naming the extra when it is missing."""
    try:
        import gguf
    except ImportError:
        raise UsageError(
            f"{operation} needs llama.cpp's gguf package, which is not installed",
            hint=GGUF_INSTALL_HINT,
            kind="missing-extra",
        ) from None
    return gguf


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a GGUF file: a ``.gguf`` name, or a regular file that starts with
    ``GGUF`` (read without blocking; anything unreadable is no GGUF here)."""
    path = Path(path)
    if path.suffix.lower() == GGUF_SUFFIX:
        return not path.is_dir()
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return os.read(fd, len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True)
class KeyValue:
    """One key-value of the GGUF header; an array's items are decoded only when asked for
    (a model GGUF's vocabulary is a 150,000-string array).

    Attributes:
        key: the key (``adapter.lora.alpha``).
        type: its GGUF value type (``STRING``, ``FLOAT32``, ``UINT32``, ``ARRAY``...).
        item_type: an array's element type, else None.
        count: an array's length (1 for a single value).
    """

    key: str
    type: str
    item_type: str | None
    count: int
    scalar: Any = None
    field: Any = dc_field(default=None, repr=False, compare=False)

    @property
    def value(self) -> Any:
        """The value: a str, int, float or bool; a list for an array (decoded now; an array
        of strings that are no UTF-8 raises UnicodeDecodeError)."""
        return self.field.contents() if self.type == "ARRAY" else self.scalar

    @property
    def spelled_type(self) -> str:
        """``FLOAT32``, or ``ARRAY[UINT32]`` for an array."""
        return f"ARRAY[{self.item_type}]" if self.type == "ARRAY" else self.type

    def text(self) -> str:
        """The value as metadata shows it: arrays as their type and length."""
        if self.type == "ARRAY":
            return f"[{self.count} x {self.item_type}]"
        value = self.value
        return repr(value) if isinstance(value, float) else str(value)


class GgufTensor(Tensor):
    """A tensor of a GGUF file, in numpy's axis order (GGML's dimensions reversed: a
    ``lora_a`` of GGML ``ne = [in, r]`` is ``[r, in]`` here); its values are read on
    :meth:`numpy`.

    Attributes:
        file: the :class:`GgufFile` it lies in.
        name: the tensor's name.
        dtype: the GGML type's name (``F32``, ``F16``, ``BF16``, ``Q8_0``...).
        shape: numpy's shape.
        offset: where its data starts in the file, in bytes.
    """

    def __init__(
        self,
        file: GgufFile,
        name: str,
        dtype: str,
        shape: tuple[int, ...],
        nbytes: int,
        offset: int,
    ) -> None:
        self.file = file
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self._nbytes = nbytes
        self.offset = offset

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def integer(self) -> bool:
        """The GGML type holds integers, not numbers a LoRA factor is made of."""
        return self.dtype in INTEGER_TYPES

    def numpy(self) -> np.ndarray:
        """The values: float32 (float16 stays float16, F64 float64, integers as stored)."""
        return self.file.read(self.name)

    def tobytes(self) -> bytes:
        return self.file.raw(self.name).tobytes()


class GgufFile:
    """A GGUF file opened for reading: its key-values and tensors from the header, each
    tensor's values on demand (the file is memory-mapped, never read whole).

    Args:
        path: the file.

    Raises:
        UsageError: the ``gguf`` package is not installed.
        FormatError: the file is no GGUF the gguf package can read (kind ``gguf-invalid``;
            ``duplicate-key`` for a key or tensor name written twice).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        gguf = gguf_package()
        self._gguf = gguf
        try:
            mode = os.stat(self.path).st_mode
            if not stat.S_ISREG(mode):  # a FIFO would block the reader, a device never end
                raise FormatError(
                    f"not a regular file (a {file_kind(mode)}); reading it would block or "
                    "never end",
                    path=self.path,
                    hint="pass the .gguf file itself",
                    kind="not-regular",
                )
            check_array_bounds(self.path)
            reader = gguf.GGUFReader(self.path)
        except OSError as exc:
            raise FormatError(
                f"cannot read the file: {exc.strerror or exc}", path=self.path, kind="io"
            ) from None
        except (ValueError, KeyError, IndexError, OverflowError, TypeError) as exc:
            # gguf's reader checks the magic, version, counts and types as it parses; what it
            # cannot parse surfaces as one of these (a truncated header as an IndexError)
            text = str(exc.args[0]) if exc.args else type(exc).__name__
            if text.startswith(("Duplicate", "Found duplicated tensor")):
                raise FormatError(
                    f"a key or tensor name appears twice in the GGUF header ({text}); "
                    "llama.cpp's gguf_init_from_file refuses the file",
                    path=self.path,
                    hint="re-write the file with each key once",
                    kind="duplicate-key",
                ) from None
            raise FormatError(
                f"not a valid GGUF file: {text}",
                path=self.path,
                hint="the file is truncated or corrupt, or no GGUF at all",
                kind="gguf-invalid",
            ) from None
        self._reader: Any = reader
        self._raw: dict[str, Any] = {}
        self.version = int(reader.fields["GGUF.version"].parts[0][0])
        self.kv: dict[str, KeyValue] = {}
        for name, field in reader.fields.items():
            if name in _READER_FIELDS:
                continue
            try:
                self.kv[name] = _key_value(gguf, name, field)
            except (ValueError, IndexError) as exc:  # a string that is no UTF-8, a bad type
                self.close()
                raise FormatError(
                    f"not a valid GGUF file: key-value {name!r} cannot be read ({exc})",
                    path=self.path,
                    hint="the file is truncated or corrupt",
                    kind="gguf-invalid",
                ) from None
        self.tensors: dict[str, GgufTensor] = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = GgufTensor(
                self, t.name, t.tensor_type.name, shape, int(t.n_bytes), int(t.data_offset)
            )
            self._raw[t.name] = t

    def __enter__(self) -> GgufFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the memory map (tensors read before keep their own copies)."""
        self._raw = {}
        reader, self._reader = self._reader, None
        if reader is not None:
            mm = getattr(reader.data, "_mmap", None)
            with contextlib.suppress(Exception):
                if mm is not None:
                    mm.close()

    def keys(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self.tensors)

    @property
    def metadata(self) -> dict[str, str]:
        """Every key-value as text (arrays as their type and length), as llama.cpp's
        ``llama_adapter_meta_val_str`` lists the non-array ones."""
        return {key: kv.text() for key, kv in self.kv.items()}

    def tensor(self, name: str) -> GgufTensor:
        return self.tensors[name]

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data (the sum of every tensor's size)."""
        return sum(t.nbytes for t in self.tensors.values())

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored data, as GGUFReader views it (a copy, not the memory map)."""
        if self._reader is None:
            raise FormatError("file is closed", path=self.path)
        return np.array(self._raw[name].data)

    def read(self, name: str) -> np.ndarray:
        """The tensor's values in numpy's axis order, dequantized: float32 for every block
        type and BF16; F16, F32, F64 and integers as stored.

        Raises:
            FormatError: the gguf package cannot dequantize this GGML type (kind
                ``gguf-type``).
        """
        info = self.tensors[name]
        data = self.raw(name)
        if info.dtype in ("F32", "F16", "F64") or info.integer:
            return data.reshape(info.shape)
        try:
            values = self._gguf.quants.dequantize(data, self._gguf.GGMLQuantizationType[info.dtype])
        except (NotImplementedError, ValueError, KeyError) as exc:
            raise FormatError(
                f"tensor {name!r} has GGML type {info.dtype}, which the gguf package cannot "
                f"decode ({exc or type(exc).__name__})",
                path=self.path,
                kind="gguf-type",
            ) from None
        return values.reshape(info.shape)


#: Bytes of each GGUF scalar value type (``GGUFValueType``: 8 is STRING, 9 ARRAY).
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_array_bounds(path: str | os.PathLike[str]) -> None:
    """Walk the key-values of a GGUF header and check every length against the bytes left,
    as llama.cpp's reader does (``gguf_reader::read``: ``nbytes_remain < n * sizeof(T)``).

    GGUFReader trusts an array's length: past the end of the file its reads come back empty
    and it loops ``length`` times, so one hostile length (``2**63``) hangs it. This walk is
    bounded by the header's size; what it cannot place (a version or a type it does not know)
    it leaves to GGUFReader, which raises.

    Raises:
        ValueError: a string or array that cannot fit in the file.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _walk_key_values(data, size)


def _walk_key_values(data: mmap.mmap, size: int) -> None:
    (version,) = struct.unpack_from("<I", data, 4)
    order = ">" if version & 0xFFFF == 0 else "<"
    (version,) = struct.unpack_from(order + "I", data, 4)
    if version not in (2, 3):
        return
    n_kv = struct.unpack_from(order + "Q", data, 16)[0]
    pos = 24

    def take(count: int, what: str) -> int:
        nonlocal pos
        if count > size - pos:
            raise ValueError(f"{what} of {count} bytes runs past the end of the file")
        start, pos = pos, pos + count
        return start

    def number(fmt: str) -> int:
        return struct.unpack_from(order + fmt, data, take(struct.calcsize(fmt), "a number"))[0]

    def value(vtype: int) -> bool:
        if vtype in _SCALAR_BYTES:
            take(_SCALAR_BYTES[vtype], "a value")
        elif vtype == _STRING:
            take(number("Q"), "a string")
        elif vtype == _ARRAY:
            item, count = number("I"), number("Q")
            smallest = _SCALAR_BYTES.get(item, 8 if item == _STRING else 12)
            if count > (size - pos) // smallest:
                raise ValueError(f"an array of {count} items runs past the end of the file")
            if item in _SCALAR_BYTES:
                take(count * smallest, "an array")
            else:
                for _ in range(count):
                    if not value(item):
                        return False
        else:
            return False  # a type GGUFReader names in its own error
        return True

    for _ in range(n_kv):
        take(number("Q"), "a key")
        if not value(number("I")):
            return


def _key_value(gguf: Any, name: str, field: Any) -> KeyValue:
    types = [gguf.GGUFValueType(t).name for t in field.types]
    main = types[0] if types else "UNKNOWN"
    if main == "ARRAY":
        item = types[-1] if len(types) > 1 else "UNKNOWN"
        return KeyValue(name, main, item, len(field.data), field=field)
    return KeyValue(name, main, None, 1, scalar=field.contents())


__all__ = [
    "GGUF_INSTALL_HINT",
    "GGUF_MAGIC",
    "GGUF_SUFFIX",
    "INTEGER_TYPES",
    "GgufFile",
    "GgufTensor",
    "KeyValue",
    "gguf_package",
    "is_gguf",
]
