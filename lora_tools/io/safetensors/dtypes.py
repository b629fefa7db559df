"""The safetensors dtypes: names, widths, their numpy types, and the packed F4 layout.

ml_dtypes (bfloat16, the float8 and float4 types) is imported only when one of its types is
first needed: importing it takes about 1 s, and header-only work never needs it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lora_tools.errors import FormatError


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
