"""The arithmetic of a merge, in numpy: each module's update as PEFT computes it.

Definitions (float32 throughout, as PEFT's default merge path on an fp32 adapter):

- The product ``P = up @ down`` is a float32 matrix product (BLAS ``sgemm``), computed in calls
  of :data:`PRODUCT_ROWS` rows each, so that which rows share a call, and with it the order in
  which BLAS sums over the rank, does not depend on the row-block size or thread count chosen.
  PEFT's product is torch's (MKL on CPU); the two libraries sum the ``r`` terms of a product in
  different orders, so for ``r >= 8`` some elements of ``P`` differ in the last bit (measured
  and recorded in docs/benchmarks.md). For the fixtures' shapes the bytes are PEFT's exactly.
- ``dW = P * float32(scale)`` (linear, conv), ``dW = P.T * float32(scale)`` (GPT-2 Conv1D
  stored ``[in, out]``, embeddings), with ``scale = alpha / r`` (rsLoRA ``alpha / sqrt(r)``)
  times the adapter's merge weight.
- ``W' = round_to_output_dtype(float32(W) + dW_1 + dW_2 + ...)``: one rounding at the end
  (PEFT's Linear and Conv merges add the float32 delta in place, ``W += dW``).
- Embeddings: PEFT's ``Embedding.merge`` adds ``dW.to(W.dtype)``, so for float16 / bfloat16
  weights each delta is first rounded to the weight's dtype (:attr:`LowRankTerm.delta_dtype`),
  then added in float32 and rounded again: two roundings, as PEFT does. (float32 + a float16 or
  bfloat16 value, rounded to that type, is the correctly rounded sum: 24 >= 2 * 11 + 2 bits.)
- DoRA (PEFT's ``merge_unsafe``): ``T = float32(W + dW)``; ``n = ||T||`` per output row (the
  norm reduced as torch's CPU kernel reduces a contiguous last dimension: 8 float32 lanes of
  ``acc += x * x``, folded left, then the remainder with fused multiply-adds; for GPT-2 Conv1D,
  stored ``[in, out]``, the reduced dimension is not contiguous and torch sums down it in order,
  see :func:`column_norm`); then ``W' = round(float32((m / n) * T))``.
- lora_bias: ``b' = round(float32(b) + float32(bias * float32(scale)))``.
- The other adapter types (:mod:`lora_tools.deltas`): a type whose update is row-local (LoHa,
  LoKr, Tucker LoCon, full diff) gives its float32 rows (scale included,
  :meth:`~lora_tools.deltas.DeltaModule.delta_rows`), computed :data:`PRODUCT_ROWS` rows of
  the update at a time, times ``float32(weight)`` (:class:`RowsTerm`), added like a LoRA
  update; a type whose merge reads the weight (kohya DoRA's ``dora_scale``, OFT, IA3...) takes
  the weight as merged so far and returns it merged (:class:`WeightTerm`,
  :func:`lora_tools.deltas.merged` in float32). Either way the sum is rounded once.

Everything here works on row blocks of a base tensor, in place where it can, so that memory stays
bounded and no pass allocates.

Example:
    >>> import numpy as np
    >>> up = np.full((2, 1), 0.5, np.float32); down = np.full((1, 3), 2.0, np.float32)
    >>> term = LowRankTerm(up, down, scale=2.0)
    >>> apply_terms(np.zeros((2, 3), np.float32), [term], 0).tolist()
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lora_tools.deltas import DeltaModule, merged
from lora_tools.errors import AdapterError
from lora_tools.io.safetensors import numpy_dtype

#: Float dtypes a merge can compute on and write.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: Base dtypes narrower than the float32 update: PEFT's embedding merge rounds the update to them.
NARROW_DTYPES = ("F16", "BF16")
#: Rows of ``up`` per BLAS call of a product (see the module docstring).
PRODUCT_ROWS = 64
#: Lanes of torch's vectorised float32 norm reduction (``Vectorized<float>::size()``).
NORM_LANES = 8

_LOW29 = np.uint64((1 << 29) - 1)
_HALF29 = np.uint64(1 << 28)


def _fix_double_rounding(
    total: np.ndarray, acc: np.ndarray, prod: np.ndarray, where: tuple[np.ndarray, ...]
) -> None:
    """Where the float64 sum ``total = acc + prod`` sits exactly on a float32 midpoint but the
    exact sum does not, move ``total`` one float64 step towards the exact sum, so that the
    following float32 rounding is the single rounding a fused multiply-add performs."""
    a, p, s = acc[where], prod[where], total[where]
    bb = s - a
    err = (a - (s - bb)) + (p - bb)  # TwoSum: exact error of the float64 addition
    total[where] = np.where(
        err > 0, np.nextafter(s, np.inf), np.where(err < 0, np.nextafter(s, -np.inf), s)
    )


def fma_round(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``float32(acc + a * b)`` with one rounding, as a fused multiply-add computes it.

    ``acc``, ``a`` and ``b`` are float32 arrays (broadcastable); returns float32.
    """
    acc64 = acc.astype(np.float64)
    prod = a.astype(np.float64) * b.astype(np.float64)  # exact: 24 + 24 bits < 53
    total = acc64 + prod
    total, acc64, prod = np.broadcast_arrays(total, acc64, prod)
    total = np.array(total)
    mid = (total.view(np.uint64) & _LOW29) == _HALF29
    if mid.any():
        _fix_double_rounding(total, acc64, prod, np.nonzero(mid))
    return total.astype(np.float32)


def lane_norm(rows: np.ndarray) -> np.ndarray:
    """Per-row L2 norm of a float32 ``[m, n]`` array, reduced as torch's CPU kernel does.

    8 lanes accumulate ``acc += x * x`` (separately rounded), the lanes are folded left into
    lane 0, the ``n % 8`` remaining elements are added with fused multiply-adds, then sqrt.
    Bit-identical to ``torch.linalg.norm(rows, dim=1)`` on CPU when ``n`` is a multiple of 8
    (every transformer hidden size); for other lengths torch's remainder handling differs in
    the last bit for some rows.
    """
    m, n = rows.shape
    full = n - n % NORM_LANES
    lanes = np.zeros((m, NORM_LANES), np.float32)
    for j in range(0, full, NORM_LANES):
        chunk = rows[:, j : j + NORM_LANES]
        lanes = lanes + chunk * chunk
    total = lanes[:, 0].copy()
    for j in range(1, NORM_LANES):
        total = total + lanes[:, j]
    for j in range(full, n):
        total = fma_round(total, rows[:, j], rows[:, j])
    return np.sqrt(total)


def column_norm(stored: np.ndarray) -> np.ndarray:
    """Per-column L2 norm of a float32 ``[rows, cols]`` array, reduced as torch reduces a
    non-contiguous dimension: one accumulator per column, ``acc = acc + x * x`` (separately
    rounded) down the rows in order, then sqrt.

    This is PEFT's DoRA norm for GPT-2 Conv1D layers (stored ``[in, out]``): it takes the norm of
    the transposed view, whose reduced dimension is not contiguous in memory.
    """
    acc = np.zeros(stored.shape[1], np.float32)
    for row in stored:
        acc = acc + row * row
    return np.sqrt(acc)


@dataclass(frozen=True)
class LowRankTerm:
    """One adapter module's contribution to one base tensor.

    Attributes:
        up: ``[m, r]`` float32 (B / lora_up, conv kernels flattened).
        down: ``[r, n]`` float32 (A / lora_down, flattened).
        scale: the module's scale times the adapter's merge weight (float32 when applied).
        transposed: the base stores the update transposed (GPT-2 Conv1D ``[in, out]``,
            embeddings): base row ``i`` is column ``i`` of ``up @ down``.
        magnitude: the DoRA magnitude, one float32 per output feature, or None.
        label: the module's name, for messages.
        delta_dtype: round the scaled update to this dtype (a safetensors name) before adding
            it: PEFT's embedding merge casts the delta to the weight's dtype first. None: add
            the float32 update as it is (every other layer kind, and float32 / float64 bases).
        offset: the tensor row that row 0 of ``up`` updates: a module that is a row range of a
            fused weight (``to_k`` in a native ``qkv``) updates rows ``offset : offset +
            len(up)`` only. 0 for a module that is the whole tensor.
    """

    up: np.ndarray
    down: np.ndarray
    scale: float
    transposed: bool = False
    magnitude: np.ndarray | None = None
    label: str = ""
    delta_dtype: str | None = None
    offset: int = 0


@dataclass(frozen=True)
class DenseTerm:
    """A dense update ``value * scale`` (PEFT lora_bias added to the base bias), to rows
    ``offset : offset + len(value)`` of the tensor."""

    value: np.ndarray
    scale: float
    label: str = ""
    offset: int = 0


@dataclass(frozen=True)
class RowsTerm:
    """A row-local module of another type (LoHa, LoKr, Tucker LoCon, full diff): rows
    ``first : first + count`` of its update, times ``weight``, to tensor rows ``offset :
    offset + count``.

    Attributes:
        module: the module, its tensors read into memory (float32).
        weight: the adapter's merge weight.
        first: the first row of the module's update this term adds (a row range of a fused
            weight takes some of them); ``count`` rows from there.
        limit: the largest update the output dtype holds next to the base weight: a larger
            one (or NaN / Inf) is an error, not an ``inf`` in the output.
    """

    module: DeltaModule
    weight: float
    count: int
    first: int = 0
    offset: int = 0
    limit: float = float("inf")
    label: str = ""


@dataclass(frozen=True)
class WeightTerm:
    """A module whose merge reads the weight (``needs_base``: kohya DoRA, OFT, IA3...): rows
    ``offset : offset + count`` of the tensor, shaped ``shape``, are replaced by
    :func:`lora_tools.deltas.merged` of them (the weight as merged so far) at ``weight``.
    The tensor is merged in one block
    (:attr:`~lora_tools.ops.merge.jobs.TensorJob.needs_whole_tensor`).

    Attributes:
        shape: the rows' shape as the module sees the weight (PyTorch's ``[out, in, ...]``).
        transposed: the base stores the layer ``[in, out]`` (GPT-2 Conv1D): the stored rows
            are the transpose of ``shape``.
        limit: the largest value the output dtype holds.
    """

    module: DeltaModule
    weight: float
    shape: tuple[int, ...]
    transposed: bool = False
    offset: int = 0
    limit: float = float("inf")
    label: str = ""
    #: the rows are the layer's bias, merged by the type's ``merged_bias`` (IA3 on outputs).
    bias: bool = False

    @property
    def count(self) -> int:
        if self.transposed:
            return self.shape[1]
        return self.shape[0] if self.shape else 1


Term = LowRankTerm | DenseTerm | RowsTerm | WeightTerm


def product_rows(up: np.ndarray, down: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = up @ down`` in float32, in calls of :data:`PRODUCT_ROWS` rows of ``up``.

    Args:
        up: ``[m, r]`` float32, m a multiple of PRODUCT_ROWS unless it holds a tensor's last rows.
        down: ``[r, n]`` float32.
        out: ``[m, n]`` float32, C-contiguous (written in place).

    Returns:
        ``out``.
    """
    for a in range(0, up.shape[0], PRODUCT_ROWS):
        np.matmul(up[a : a + PRODUCT_ROWS], down, out=out[a : a + PRODUCT_ROWS])
    return out


def term_rows(term: Term) -> int:
    """How many rows of the tensor the term updates (from row ``term.offset``)."""
    if isinstance(term, DenseTerm):
        return term.value.shape[0]
    if isinstance(term, (RowsTerm, WeightTerm)):
        return term.count
    return term.down.shape[1] if term.transposed else term.up.shape[0]


def term_span(term: Term, start: int, stop: int) -> tuple[int, int]:
    """The rows ``(lo, hi)`` of the tensor's block ``start:stop`` that the term updates
    (``lo >= hi``: none)."""
    return max(start, term.offset), min(stop, term.offset + term_rows(term))


def term_delta(term: Term, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``start:stop`` of the term's own scaled update (row 0 is tensor row
    ``term.offset``), float32, shaped ``[rows, cols]``.

    ``start`` is a multiple of :data:`PRODUCT_ROWS` for a term that is the whole tensor (row
    blocks are); ``out`` (float32 ``[rows, cols]``, C-contiguous) receives the result when given.
    """
    if isinstance(term, RowsTerm):
        return rows_delta(term, start, stop, out)
    if isinstance(term, WeightTerm):
        raise TypeError("a WeightTerm merges the weight itself: use weight_merged")
    scale = np.float32(term.scale)
    rows = stop - start
    if isinstance(term, DenseTerm):
        flat = term.value.reshape(term.value.shape[0], -1)[start:stop]
        return np.multiply(flat.astype(np.float32, copy=False), scale, out=out)
    if term.transposed:
        # base row i is column i of up @ down: compute the columns, then transpose
        cols = np.empty((rows, term.up.shape[0]), np.float32) if out is None else out
        prod_t = product_rows(
            np.ascontiguousarray(term.down[:, start:stop].T),
            np.ascontiguousarray(term.up.T),
            cols,
        )
        return np.multiply(prod_t, scale, out=prod_t)
    if out is None:
        out = np.empty((rows, term.down.shape[1]), np.float32)
    product_rows(term.up[start:stop], term.down, out)
    return np.multiply(out, scale, out=out)


def rows_delta(term: RowsTerm, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``start:stop`` of a :class:`RowsTerm` (row 0: its update's row ``term.first``),
    float32 ``[rows, cols]``, weight applied.

    The update's rows are computed in whole cells of :data:`PRODUCT_ROWS` rows of the module's
    own update (the cells ``start:stop`` touches, then cut), so that the bytes do not depend on
    the row blocks a tensor is merged in, nor on the engine.

    Raises:
        AdapterError: the rows hold NaN / Inf, or values beyond ``term.limit``.
    """
    lo, hi = term.first + start, term.first + stop
    if out is None:
        out = np.empty((stop - start, term.module.update_dims[1] or 1), np.float32)
    total = term.module.update_dims[0]
    weight = np.float32(term.weight)
    cell = lo - lo % PRODUCT_ROWS
    while cell < hi:
        end = min(cell + PRODUCT_ROWS, total)
        rows = term.module.delta_rows(cell, end, np.float32)
        a, b = max(lo, cell), min(hi, end)
        target = out[a - lo : b - lo]
        piece = rows[a - cell : b - cell]
        if term.weight == 1.0:
            np.copyto(target, piece.reshape(target.shape), casting="unsafe")
        else:
            np.multiply(piece.reshape(target.shape), weight, out=target)
        cell = end
    _check_peak(term, out)
    return out


def weight_merged(term: WeightTerm, rows: np.ndarray) -> np.ndarray:
    """The tensor rows a :class:`WeightTerm` updates (2-D ``[count, cols]``, the weight merged
    so far, float32 or float64) with its module merged: :func:`lora_tools.deltas.merged` in
    that dtype, on the rows in the weight's own shape (``[in, out]`` ones transposed back).

    Raises:
        AdapterError: the result holds NaN / Inf, or values beyond ``term.limit``.
    """
    if term.bias:
        flat = rows.reshape(-1)
        out = term.module.spec.merged_bias(term.module, flat, term.weight, flat.dtype)
    elif term.transposed:
        out = merged(term.module, rows.T, term.weight, rows.dtype).T
    else:
        out = merged(term.module, rows.reshape(term.shape), term.weight, rows.dtype)
    out = np.ascontiguousarray(out, dtype=rows.dtype).reshape(rows.shape)
    _check_peak(term, out)
    return out


def _check_peak(term: RowsTerm | WeightTerm, values: np.ndarray) -> None:
    with np.errstate(invalid="ignore"):
        peak = float(np.abs(values).max(initial=0.0))
    if not peak < term.limit:
        m = term.module
        what = "update" if isinstance(term, RowsTerm) else "merged weight"
        raise AdapterError(
            f"module {m.key!r} ({m.type}): its {what} at weight {term.weight:g} reaches "
            f"{peak:.3g}, beyond what the output dtype holds ({term.limit:.3g}); merging "
            "would write inf",
            path=_source_of(m),
            hint="use a smaller --weight; `loratool validate` checks the module's values",
            kind="non-finite",
        )


def _source_of(m: DeltaModule) -> object:
    """The adapter file a module's tensors come from, if they come from one."""
    for tensor in m.tensors.values():
        file = getattr(tensor, "file", None)
        if file is not None:
            return file.path
    return None


def apply_terms(
    base: np.ndarray,
    terms: list[Term],
    start: int,
    compute_dtype: np.dtype = np.float32,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """Merge ``terms`` into rows ``start:start+len(base)`` of a base tensor.

    Args:
        base: the base rows upcast to ``compute_dtype``, 2-D ``[rows, cols]``, C-contiguous;
            updated in place (the result may be ``base`` itself).
        terms: updates in adapter order.
        start: index of the first row within the whole tensor (a multiple of PRODUCT_ROWS).
        compute_dtype: float32, or float64 for float64 bases.
        scratch: a float32 ``[rows, cols]`` buffer for the updates (allocated when None).

    Returns:
        The merged rows in ``compute_dtype`` (the caller rounds once to the output dtype).
    """
    stop = start + base.shape[0]
    unmerged_base = base.copy() if any(_is_dora(t) for t in terms) else None
    acc = base
    for term in terms:
        lo, hi = term_span(term, start, stop)
        if lo >= hi:
            continue  # a row range of a fused tensor outside this block
        whole = (lo, hi) == (start, stop)
        rows = acc if whole else acc[lo - start : hi - start]
        if isinstance(term, WeightTerm):
            np.copyto(rows, weight_merged(term, rows), casting="unsafe")
            continue
        buffer = None if scratch is None else scratch[: hi - lo]
        delta = term_delta(term, lo - term.offset, hi - term.offset, out=buffer)
        if isinstance(term, LowRankTerm) and term.magnitude is not None:
            assert unmerged_base is not None
            unmerged = unmerged_base if whole else unmerged_base[lo - start : hi - start]
            merged = _dora(unmerged, rows, delta, term, lo - term.offset)
            if whole:
                acc = merged.astype(compute_dtype, copy=False)
            else:
                np.copyto(rows, merged, casting="unsafe")
        else:
            if isinstance(term, LowRankTerm) and term.delta_dtype is not None:
                np.copyto(delta, delta.astype(numpy_dtype(term.delta_dtype)), casting="unsafe")
            np.add(rows, delta, out=rows)
    return acc


def _is_dora(term: Term) -> bool:
    return isinstance(term, LowRankTerm) and term.magnitude is not None


def _dora(
    base: np.ndarray, acc: np.ndarray, delta: np.ndarray, term: LowRankTerm, start: int
) -> np.ndarray:
    """PEFT's DoRA merge: the norm of the unmerged base plus this update, per output feature."""
    assert term.magnitude is not None
    unmerged = (base + delta).astype(np.float32)
    merged = (acc + delta).astype(np.float32)
    if term.transposed:
        factor = term.magnitude.astype(np.float32) / column_norm(unmerged)
        return factor[None, :] * merged
    magnitude = term.magnitude.astype(np.float32).reshape(-1)[start : start + len(unmerged)]
    return (magnitude / lane_norm(unmerged))[:, None] * merged


def compute_dtype_for(dtype: str) -> np.dtype:
    """float32, or float64 for float64 bases (torch promotes ``W64 += dW32`` to float64)."""
    return np.dtype(np.float64) if dtype == "F64" else np.dtype(np.float32)


def row_block(rows: int, row_bytes: int, block_bytes: int) -> int:
    """How many rows fit in ``block_bytes`` (at least one)."""
    return max(1, min(rows, block_bytes // max(row_bytes, 1)))


def dims_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, cols)`` of a tensor viewed as a matrix over its first dimension."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])
