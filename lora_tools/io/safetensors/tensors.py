"""Tensors known by dtype and shape: where one lies in a file, and the in-memory kind."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lora_tools.io.safetensors.dtypes import dtype_of, numpy_dtype, pack_f4, tensor_nbytes

if TYPE_CHECKING:
    import numpy.typing as npt


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

    def __array__(self, dtype: npt.DTypeLike = None, copy: bool | None = None) -> np.ndarray:
        """The values of :meth:`numpy`, for numpy's array protocol: ``np.asarray(module.up)``
        is the decoded array (not a 0-d array holding the Tensor object).

        ``dtype`` casts the values; ``copy`` means what it means to numpy 2: True never shares
        memory with the tensor, False raises ValueError where a copy (a cast) is needed.

        Example:
            >>> np.asarray(ArrayTensor(np.eye(2, dtype=np.float32)), np.float64).tolist()
            [[1.0, 0.0], [0.0, 1.0]]
        """
        return np.array(self.numpy(), dtype=dtype, copy=copy)

    def __repr__(self) -> str:
        """Kind, dtype and shape only: no values, and nothing is read from a file.

        Example:
            >>> ArrayTensor(np.zeros((16, 4096), np.float16))
            ArrayTensor(F16, [16, 4096])
        """
        return f"{type(self).__name__}({self.dtype}, {list(self.shape)})"


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


def as_tensor(value: Tensor | np.ndarray) -> Tensor:
    return value if isinstance(value, Tensor) else ArrayTensor(value)
