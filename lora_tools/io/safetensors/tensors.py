"""Tensors known by dtype and shape: where one lies in a file, and the in-memory kind."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lora_tools.io.safetensors.dtypes import dtype_of, numpy_dtype, pack_f4, tensor_nbytes


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
