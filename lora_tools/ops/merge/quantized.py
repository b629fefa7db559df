"""Merging into an fp8 base: one merged weight dequantized, updated and requantized with its scale.

A merged weight of a quantized base (:class:`~lora_tools.quant.Scheme`) carries a
:class:`QuantJob`: where its scale lives (its own shard or another), and whether the output keeps
the scheme (``--dtype keep``) or is dequantized (``--dtype bf16|fp16|fp32``). Per row block
(:func:`merge_rows`):

1. ``W = fp8 * scale``, exact in float64 (:func:`lora_tools.quant.numeric.dequantize`);
2. ``W' = W + dW_1 + dW_2 + ...``, the float32 updates the float merge adds
   (:func:`~lora_tools.ops.merge.arithmetic.apply_terms`), accumulated in float64;
3. keep: ``q, s = quantize(scheme, W')`` with a fresh scale, as the scheme's own quantizer does
   (:func:`lora_tools.quant.numeric.quantize`); otherwise ``W'`` rounded once to the dtype.

A row block holds whole scale blocks (a multiple of the block's rows, per-channel rows), so the
scale each block gets is the one the quantizer would give the whole tensor; where one scale
covers the tensor, a first pass measures the merged weight's amax block by block
(:meth:`QuantJob.measure`) and the second quantizes each block with it. Memory stays at a few
row blocks per worker, as for float merges. The new scale is written in the scale tensor's own place (same
name, dtype, shape, file) by that tensor's job (:attr:`TensorJob.scale_of`), once its weight is
done; a scale that sits in a file written before its weight's is computed there from the
weight (the same bytes: every step is deterministic).

Example:
    >>> from lora_tools.quant.schemes import Scheme
    >>> q = QuantJob(Scheme("plain-fp8", "F8_E4M3"), Path("w.safetensors"))
    >>> q.keeps_scheme
    True
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from lora_tools.io.safetensors import SafetensorsFile, TensorInfo, numpy_dtype
from lora_tools.ops.merge.arithmetic import PRODUCT_ROWS, Term, apply_terms, dims_2d, row_block
from lora_tools.quant.schemes import Scheme


class TensorJob(Protocol):
    """What a :class:`QuantJob` reads of its weight's
    :class:`~lora_tools.ops.merge.jobs.TensorJob` (a protocol, so that this phase does not
    import the one above it)."""

    @property
    def info(self) -> TensorInfo: ...

    @property
    def needs_whole_tensor(self) -> bool: ...

    def terms(self) -> list[Term]: ...


@dataclass
class QuantJob:
    """How one fp8 weight of a quantized base is read and written.

    Attributes:
        scheme: the base's scheme.
        weight_path: the file holding the weight.
        scale_name / scale_path / scale_info: its weight scale and the file holding it (None
            for plain fp8).
        to_dtype: ``--dtype``: the weight is dequantized to it and the scale dropped; None keeps
            the scheme.
        job: the weight's own job (set by the planner).
        new_scale: the recomputed scale, as stored (dtype, shape), once computed.
        amax: for a per-tensor scale on a weight merged in several row blocks, the merged
            weight's amax, measured by a first pass (:meth:`measure`).
    """

    scheme: Scheme
    weight_path: Path
    scale_name: str | None = None
    scale_path: Path | None = None
    scale_info: TensorInfo | None = None
    to_dtype: str | None = None
    job: TensorJob | None = None
    new_scale: np.ndarray | None = None
    amax: np.ndarray | None = None
    _old_scale: np.ndarray | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def keeps_scheme(self) -> bool:
        return self.to_dtype is None

    @property
    def compute_dtype(self) -> str:
        """The dtype the scheme's quantizer runs in: compressed-tensors the scale's (the
        original weight's dtype), the others float32."""
        if self.scheme.name == "compressed-tensors-fp8" and self.scale_info is not None:
            return self.scale_info.dtype
        return "F32"

    def old_scale(self) -> np.ndarray | None:
        """The base's scale tensor (read once; small)."""
        if self.scale_name is None or self.scale_path is None:
            return None
        with self._lock:
            if self._old_scale is None:
                with SafetensorsFile(self.scale_path) as reader:
                    self._old_scale = reader.read(self.scale_name)
            return self._old_scale

    # -- row blocks ----------------------------------------------------------------------

    def whole(self, shape: tuple[int, ...]) -> bool:
        """The layout is not rows x columns (stacked experts, a convolution): one block."""
        return len(shape) != 2

    def needs_amax(self, rows: int, step: int) -> bool:
        """A per-tensor scale, kept, on a weight merged in several blocks: the blocks need the
        whole merged weight's amax first (a pass of its own)."""
        return self.keeps_scheme and self.scheme.granularity == "tensor" and step < rows

    def measure(
        self, reader: SafetensorsFile, terms: list[Term], block_bytes: int, whole: bool
    ) -> None:
        """First pass for a per-tensor scale: the merged weight's amax, block by block, in the
        quantizer's dtype (the rows are merged again by the second pass: the same values)."""
        from lora_tools.quant.numeric import tensor_amax

        assert self.job is not None
        rows, _, step = self.rows(self.job.info.shape, block_bytes, whole)
        if not self.needs_amax(rows, step) or self.amax is not None:
            return
        amax = None
        for start in range(0, rows, step):
            count = min(rows, start + step) - start
            merged = _merged_rows(self, reader, terms, start, count)
            block = tensor_amax(merged, compute_dtype=self.compute_dtype)
            amax = block if amax is None else np.maximum(amax, block)
        self.amax = amax

    def rows(self, shape: tuple[int, ...], block_bytes: int, whole: bool) -> tuple[int, int, int]:
        """``(rows, cols, rows per block)``: blocks of float64 rows, a multiple of
        PRODUCT_ROWS (so the products do not depend on the block size) and of the scale
        block's rows."""
        rows, cols = dims_2d(shape)
        if whole or self.whole(shape):
            return rows, cols, rows
        unit = PRODUCT_ROWS
        if self.scheme.granularity == "block" and self.scheme.block_size:
            unit = math.lcm(PRODUCT_ROWS, self.scheme.block_size[0])
        step = row_block(rows, cols * 8, block_bytes)
        return rows, cols, min(rows, max(unit, step - step % unit))

    def _scale_rows(self, start: int, count: int, shape: tuple[int, ...]) -> np.ndarray | None:
        scale = self.old_scale()
        if scale is None or len(shape) != 2 or count == shape[0]:
            return scale
        if self.scheme.granularity == "block" and self.scheme.block_size:
            br = self.scheme.block_size[0]
            return scale[start // br : -(-(start + count) // br)]
        if self.scheme.granularity == "channel":
            return scale.reshape(-1, 1)[start : start + count]
        return scale

    def dequantize_rows(
        self, raw: np.ndarray, start: int, shape: tuple[int, ...], out: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows ``start : start + len(raw)`` of the weight, exactly, in float64 (2-D), into
        ``out`` (float64, ``raw``'s shape) if given."""
        from lora_tools.quant.numeric import dequantize

        rows, cols = dims_2d(shape)
        block_shape = shape if raw.shape[0] == rows else (raw.shape[0], cols)
        scale = self._scale_rows(start, raw.shape[0], shape)
        if scale is not None and self.scheme.granularity == "channel":
            scale = scale.reshape(-1, 1)
        target = None if out is None else out.reshape(block_shape)
        values = dequantize(self.scheme, raw.reshape(block_shape), scale, target)
        return np.ascontiguousarray(values.reshape(raw.shape[0], cols))

    def finish_rows(
        self, merged: np.ndarray, shape: tuple[int, ...], out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows as written (fp8, or the ``--dtype``: into ``out`` if given), and their
        piece of the new scale."""
        from lora_tools.quant.numeric import quantize, round_to

        if not self.keeps_scheme:
            assert self.to_dtype is not None
            return round_to(merged, self.to_dtype, out), None
        rows = dims_2d(shape)[0]
        values = merged.reshape(shape) if merged.shape[0] == rows else merged
        q, scale = quantize(
            self.scheme, values, compute_dtype=self.compute_dtype, whole_amax=self.amax
        )
        return q.reshape(merged.shape), scale

    def finish(self, pieces: list[np.ndarray | None]) -> None:
        """Assemble the new scale from the blocks' pieces, as the base stores it."""
        if self.scale_info is None or not self.keeps_scheme:
            return
        parts = [p for p in pieces if p is not None]
        if len(parts) == 1 or self.scheme.granularity == "tensor":
            scale = parts[0]  # a per-tensor scale: each block got the same
        elif self.scheme.granularity == "block":
            scale = np.concatenate(parts, axis=-2)
        else:
            scale = np.concatenate([p.reshape(-1, 1) for p in parts], axis=0)
        stored = numpy_dtype(self.scale_info.dtype)
        self.new_scale = np.ascontiguousarray(
            np.asarray(scale).astype(stored).reshape(self.scale_info.shape)
        )

    def scale_for_writing(self, block_bytes: int) -> np.ndarray:
        """The new scale; computed from the weight now when its file is not written yet."""
        if self.new_scale is None:
            assert self.job is not None
            with SafetensorsFile(self.weight_path) as reader:
                terms = self.job.terms()
                whole = _whole(self.job)
                self.measure(reader, terms, block_bytes, whole)
                rows, _, step = self.rows(self.job.info.shape, block_bytes, whole)
                pieces = []
                for start in range(0, rows, step) if rows else range(1):
                    count = min(rows, start + step) - start
                    _, piece = merge_rows(self, reader, terms, start, count)
                    pieces.append(piece)
            self.finish(pieces)
        assert self.new_scale is not None
        return self.new_scale


def _whole(job: TensorJob) -> bool:
    return job.needs_whole_tensor


def quant_rows(job: TensorJob, block_bytes: int) -> tuple[int, int, int]:
    """``(rows, cols, rows per block)`` for a job with a :class:`QuantJob`."""
    assert job.quant is not None
    return job.quant.rows(job.info.shape, block_bytes, _whole(job))


def merge_rows(
    quant: QuantJob,
    reader: SafetensorsFile,
    terms: list[Term],
    start: int,
    count: int,
    scratch: np.ndarray | None = None,
    raw: np.ndarray | None = None,
    acc: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read rows ``start : start + count`` of a quantized weight, merge ``terms`` into them
    and requantize (or round to the ``--dtype``): the rows written, and their scale piece.

    ``scratch`` (float32), ``raw`` (the weight's dtype), ``acc`` (float64) and ``out`` (the
    ``--dtype``) are the caller's reused ``[count, cols]`` buffers; None allocates.
    """
    assert quant.job is not None
    merged = _merged_rows(quant, reader, terms, start, count, scratch, raw, acc)
    return quant.finish_rows(merged, quant.job.info.shape, out)


def _merged_rows(
    quant: QuantJob,
    reader: SafetensorsFile,
    terms: list[Term],
    start: int,
    count: int,
    scratch: np.ndarray | None = None,
    raw: np.ndarray | None = None,
    acc: np.ndarray | None = None,
) -> np.ndarray:
    """Rows ``start : start + count`` of ``W' = dequant(W) + dW...`` in float64."""
    assert quant.job is not None
    info = quant.job.info
    cols = dims_2d(info.shape)[1]
    if raw is None:
        raw = np.empty((count, cols), numpy_dtype(info.dtype))
    reader.read_into(info.name, raw, row_start=start)
    values = quant.dequantize_rows(raw, start, info.shape, acc)
    return apply_terms(values, terms, start, np.dtype(np.float64), scratch)


__all__ = ["QuantJob", "merge_rows", "quant_rows"]
