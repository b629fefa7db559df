"""The value scan's per-chunk arithmetic: NaN/Inf counts, all-zero flags, factor Gram matrices.

The values rules (:mod:`lora_tools.ops.validate.checks.values`) read every tensor once, in file
order and bounded chunks, and feed each chunk here; nothing in this module reads files.
"""

from __future__ import annotations

import numpy as np

from lora_tools.io.safetensors import DTYPES, TensorInfo, numpy_dtype

#: Bytes read per chunk for tensors that are not LoRA factors (embeddings, modules_to_save).
CHUNK_BYTES = 8 << 20
#: dtype -> (unsigned view, mask clearing the sign bit, bit pattern of +Inf). With the sign
#: cleared, max(bits) >= Inf means NaN/Inf somewhere and max(bits) == 0 means all zeros: both
#: from one masked max, the cheapest way to look at every value.
_BIT_CHECKS: dict[str, tuple[type, int, int]] = {
    "F16": (np.uint16, 0x7FFF, 0x7C00),
    "BF16": (np.uint16, 0x7FFF, 0x7F80),
    "F32": (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    "F64": (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}


class TensorScan:
    """NaN/Inf counts and the all-zero flag of one tensor, fed chunk by chunk."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.nan = 0
        self.inf = 0
        self.all_zero = True
        self.finite = True

    def feed(self, raw: memoryview) -> None:
        check = _BIT_CHECKS.get(self.dtype)
        if check is not None:
            view_type, mask, inf_bits = check
            bits = np.frombuffer(raw, dtype=view_type) & view_type(mask)
            top = int(bits.max()) if bits.size else 0
            if top:
                self.all_zero = False
            if top >= inf_bits:
                self.finite = False
                self.nan += int(np.count_nonzero(bits > inf_bits))
                self.inf += int(np.count_nonzero(bits == inf_bits))
            return
        np_dtype = DTYPES[self.dtype].numpy
        if np_dtype is None:  # sub-byte floats: no NaN encoding to look for
            self.all_zero = self.all_zero and not any(raw)
            return
        values = np.frombuffer(raw, dtype=np_dtype)
        if np_dtype.kind == "c":
            values = values.view(np.float32)
        if values.size and np.any(values != 0):
            self.all_zero = False
        if np_dtype.kind in "fc" and values.size:
            as_float = values.astype(np.float32)
            nan = int(np.count_nonzero(np.isnan(as_float)))
            inf = int(np.count_nonzero(np.isinf(as_float)))
            if nan or inf:
                self.finite = False
                self.nan += nan
                self.inf += inf

    def describe(self) -> str:
        parts = []
        if self.nan:
            parts.append(f"{self.nan} NaN")
        if self.inf:
            parts.append(f"{self.inf} Inf")
        return " and ".join(parts)


class Factor:
    """A factor kept as a matrix because its rank exceeds its other side: its ``r x r`` Gram
    would be larger than the factor itself (rank 60,000 on a 1 x 1 layer: 13 GiB)."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix = matrix


def gram(
    raw: memoryview, info: TensorInfo, role: str, *, transposed: bool = False
) -> np.ndarray | Factor:
    """The ``r x r`` Gram matrix of a factor: ``U^T U`` for up, ``V V^T`` for down; or the
    factor itself (:class:`Factor`) when ``r`` exceeds its other side.

    ``transposed``: the file stores the 2-D factor transposed (mlx-lm's ``lora_a [in, r]``,
    ``lora_b [r, out]``); it is read as a view of its transpose.

    ``||s U V||_F^2 = s^2 trace(U^T U V V^T)``, so the two Grams give the update norm without
    forming it (:func:`frobenius_squared`); float32 products (float64 for F64 data) are plenty
    for an outlier test. Memory stays within twice the factor's size.
    """
    values = np.frombuffer(raw, dtype=numpy_dtype(info.dtype))
    work = values if values.dtype in (np.float32, np.float64) else values.astype(np.float32)
    mat = work.reshape(info.shape[0], -1)
    if transposed:
        mat = mat.T
    rank, other = (mat.shape[1], mat.shape[0]) if role == "up" else mat.shape
    if rank > other:
        # ``values`` is a view of the read buffer: keep a copy.
        return Factor(mat.copy() if work is values else mat)
    with np.errstate(over="ignore", invalid="ignore"):
        gram = mat.T @ mat if role == "up" else mat @ mat.T
    if not np.all(np.isfinite(gram)):
        # Finite values beyond float32's square range: redo in float64 (rare, and exactly the
        # modules the outlier rule is for).
        mat = mat.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            gram = mat.T @ mat if role == "up" else mat @ mat.T
    return gram.astype(np.float64)


def frobenius_squared(
    up: np.ndarray | Factor, down: np.ndarray | Factor, *, block_bytes: int = 1 << 26
) -> float:
    """``||U V||_F^2`` from what :func:`gram` kept of each factor, in bounded memory.

    Two Grams: ``sum(Gu * Gv)``; a factor and a Gram: ``sum((U Gv) * U)`` or
    ``sum((Gu V) * V)``; two factors (rank above both sides): ``U @ V`` a block of rows at a
    time, at most ``block_bytes`` of float64 at once.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if not isinstance(up, Factor) and not isinstance(down, Factor):
            return float(np.sum(up * down))
        if isinstance(up, Factor) and not isinstance(down, Factor):
            U = up.matrix.astype(np.float64)
            return float(np.sum((U @ down) * U))
        if isinstance(down, Factor) and not isinstance(up, Factor):
            V = down.matrix.astype(np.float64)
            return float(np.sum((up @ V) * V))
        assert isinstance(up, Factor) and isinstance(down, Factor)
        U, V = up.matrix, down.matrix
        rows = max(1, block_bytes // (8 * max(V.shape[1], 1)))
        total = 0.0
        for start in range(0, U.shape[0], rows):
            block = U[start : start + rows].astype(np.float64) @ V.astype(np.float64)
            total += float(np.sum(block * block))
        return total
