"""The per-tensor jobs of a merge: what happens to each base tensor, and the raw copy.

A :class:`TensorJob` is one base tensor with what happens to it: copied as raw bytes
(:attr:`TensorJob.copy_raw`), merged with a list of updates, or replaced by an adapter tensor
(PEFT modules_to_save). A :class:`FilePlan` is one output weight file, its jobs in the base
file's order. Both engines (:mod:`.numpy_engine`, :mod:`.torch_engine`) consume these and
nothing above them.

Example:
    >>> from lora_tools.ops.merge.plan import AdapterSpec, plan_merge
    >>> plan = plan_merge("fixtures/bases/tiny-llama",
    ...                   [AdapterSpec("fixtures/peft/llama-lora")])      # doctest: +SKIP
    >>> [job.name for job in plan.files[0].jobs if job.sources][:1]      # doctest: +SKIP
    ['model.layers.0.self_attn.k_proj.weight']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lora_tools.adapter import EMBEDDING, LARGEST, LARGEST_F32, require_finite
from lora_tools.deltas import LOKR, TYPES, DeltaModule
from lora_tools.io.safetensors import (
    ArrayTensor,
    SafetensorsFile,
    SafetensorsWriter,
    Tensor,
    TensorInfo,
    tensor_nbytes,
)
from lora_tools.ops.merge.arithmetic import (
    NARROW_DTYPES,
    PRODUCT_ROWS,
    DenseTerm,
    LowRankTerm,
    RowsTerm,
    Term,
    WeightTerm,
    dims_2d,
    row_block,
    rows_delta,
)
from lora_tools.resolve import ModuleMatch, Rows

if TYPE_CHECKING:
    from lora_tools.ops.merge.quantized import QuantJob

#: Bytes of one row block of a merged tensor (in float32): a few MB keeps a block's passes
#: (product, scale, add, round) in the CPU caches (measured fastest between 1 and 8 MB).
DEFAULT_BLOCK_BYTES = 4 << 20

ProgressFn = Callable[[int, int], None]
#: One update of a base tensor: the module, its merge weight, ``"weight"``, ``"bias"``,
#: ``"bias_diff"`` or ``"bias_scale"`` (a type whose merge scales the bias), and the rows of
#: the tensor it covers (None: the whole tensor).
Source = tuple[ModuleMatch, float, str, "Rows | None"]


@dataclass
class TensorJob:
    """What happens to one base tensor.

    Attributes:
        info: the tensor in the base file.
        out_dtype: dtype written.
        terms: updates (built lazily from ``sources`` when the tensor is reached).
        replacement: an adapter tensor that replaces the base values before the updates.
        quant: for an fp8 weight of a quantized base that is merged or dequantized: its
            scheme and scale (:mod:`.quantized`).
        scale_of: for the scale tensor of a merged fp8 weight: that weight's
            :class:`~lora_tools.ops.merge.quantized.QuantJob`, which computes the new scale.
    """

    info: TensorInfo
    out_dtype: str
    sources: list[Source] = field(default_factory=list)
    replacement: Tensor | None = None
    quant: QuantJob | None = None
    scale_of: QuantJob | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def copy_raw(self) -> bool:
        return (
            not self.sources
            and self.replacement is None
            and self.out_dtype == self.info.dtype
            and self.quant is None
            and self.scale_of is None
        )

    @property
    def out_nbytes(self) -> int:
        return tensor_nbytes(self.out_dtype, self.info.shape)

    def terms(self) -> list[Term]:
        """The updates, with factors read from the adapter files now."""
        return [
            build_term(match, weight, role, self.info.dtype, rows, self)
            for match, weight, role, rows in self.sources
        ]

    @property
    def needs_whole_tensor(self) -> bool:
        """DoRA on a transposed layout (GPT-2 Conv1D) normalises columns of the base, and a
        module of another type whose merge reads the weight (kohya DoRA, OFT, IA3...) takes
        it whole, so the tensor is merged in one block; known from the plan, without reading
        the factors."""
        for match, _, role, _ in self.sources:
            module = match.module
            if role == "bias_scale":
                return True
            if role != "weight":
                continue
            if isinstance(module, DeltaModule):
                if not module.row_local:
                    return True
            elif module.dora and (module.kind == EMBEDDING or match.transpose):
                return True
        return False


@dataclass
class FilePlan:
    """One output weight file: where it comes from and every tensor in the base's order."""

    source: Path
    relative: Path
    jobs: list[TensorJob]
    metadata: dict[str, str] | None

    @property
    def untouched(self) -> bool:
        """No adapter changes any tensor of this file: it is a copy."""
        return all(job.copy_raw for job in self.jobs)


def build_term(
    match: ModuleMatch,
    weight: float,
    role: str,
    base_dtype: str = "F32",
    rows: Rows | None = None,
    job: TensorJob | None = None,
) -> Term:
    """The float32 update one resolved module makes to its weight (``role="weight"``) or to
    its bias (``role="bias"``, PEFT lora_bias, times the module's scale; ``role="bias_diff"``,
    ComfyUI's ``.diff_b``, times the merge weight only); ``base_dtype`` is the base tensor's dtype;
    ``rows``: the update's rows that go to a row range of the tensor (a fused weight).

    Each layer kind rounds as PEFT's ``merge`` does (docs/math.md): Linear, Conv1D and conv
    layers add the float32 update to the weight (one rounding), embeddings add the update
    rounded to the weight's dtype first (two roundings for float16 / bfloat16 weights).
    A row range takes the same rows of ``up`` (and of the bias and the DoRA magnitude): each
    row of the update depends on its own row of ``up`` only, so the rows merged are those of
    the whole update.

    A module of another type (:class:`~lora_tools.deltas.DeltaModule`) makes a
    :class:`~lora_tools.ops.merge.arithmetic.RowsTerm` or a
    :class:`~lora_tools.ops.merge.arithmetic.WeightTerm` (:func:`build_delta_term`; ``job`` is
    the tensor it goes to).

    Raises:
        AdapterError: a factor holds NaN or Inf, which would make the merged weight non-finite.
    """
    module = match.module
    harm = f"merging it would make {match.target.key!r} non-finite"
    span = slice(None) if rows is None else slice(rows.update_start, rows.update_start + rows.count)
    offset = 0 if rows is None else rows.start
    if role == "bias_diff":
        # ComfyUI's .diff_b, of a LoRA or another type: bias += strength * diff_b (no alpha / r)
        assert module.bias_diff is not None
        named = _Named(module) if isinstance(module, DeltaModule) else module
        diff = module.bias_diff.numpy().astype(np.float32).reshape(-1)
        diff = require_finite(diff, "bias difference (.diff_b)", named, harm)
        return DenseTerm(np.ascontiguousarray(diff[span]), weight, module.key, offset)
    if isinstance(module, DeltaModule):
        return build_delta_term(match, weight, role, rows, job)
    scale = module.scale * weight
    if role == "bias":
        assert module.bias is not None
        bias = require_finite(module.bias.numpy().astype(np.float32), "lora_B.bias", module, harm)
        return DenseTerm(np.ascontiguousarray(bias[span]), scale, module.key, offset)
    up, down = module.finite_factors(np.float32, consequence=harm)
    magnitude = None
    if module.magnitude is not None:
        magnitude = module.magnitude.numpy().astype(np.float32).reshape(-1)
        require_finite(magnitude, "DoRA magnitude", module, harm)
        magnitude = np.ascontiguousarray(magnitude[span])
    transposed = module.kind == EMBEDDING or match.transpose
    # PEFT's Embedding.merge: weight += delta.to(weight.dtype); its DoRA path adds unrounded
    delta_dtype = None
    if module.kind == EMBEDDING and magnitude is None and base_dtype in NARROW_DTYPES:
        delta_dtype = base_dtype
    up = up if rows is None else np.ascontiguousarray(up[span])
    return LowRankTerm(up, down, scale, transposed, magnitude, module.key, delta_dtype, offset)


def build_delta_term(
    match: ModuleMatch,
    weight: float,
    role: str,
    rows: Rows | None = None,
    job: TensorJob | None = None,
) -> Term:
    """The term a module of another type makes to its weight or, for ``role="bias_scale"``,
    to the bias its merge scales (a ``.diff_b`` is :func:`build_term`'s, as for LoRA).

    The module's tensors are read once, into float32 arrays, so that each row block computes
    from memory. A row-local module (:attr:`~lora_tools.deltas.DeltaModule.row_local`) makes a
    :class:`RowsTerm` (its update streamed in row blocks), or, on a weight stored ``[in,
    out]``, a dense term of its transposed update; any other a :class:`WeightTerm`, merged
    by :func:`lora_tools.deltas.merged` on the whole weight.

    Raises:
        AdapterError: a tensor of the module holds NaN or Inf.
    """
    module = match.module
    assert isinstance(module, DeltaModule) and role in ("weight", "bias_scale")
    harm = f"merging it would make {match.target.key!r} non-finite"
    offset = 0 if rows is None else rows.start
    out_dtype = job.out_dtype if job is not None else "F32"
    limit = LARGEST.get(out_dtype, LARGEST_F32)
    loaded = _loaded(module, harm)
    if role == "bias_scale":
        # IA3 on the outputs scales the bias too: merged whole by the type's merged_bias
        count = module.update_dims[0] if rows is None else rows.count
        return WeightTerm(loaded, weight, (count,), False, offset, limit, module.key, bias=True)
    out_rows = module.update_dims[0]
    first = 0 if rows is None else rows.update_start
    count = out_rows if rows is None else rows.count
    if not module.row_local:
        stored = tuple(job.info.shape) if job is not None else module.delta_shape
        if match.transpose:
            shape = (stored[1], stored[0])
        elif rows is not None:
            shape = (rows.count, *stored[1:])
        else:
            shape = stored
        return WeightTerm(loaded, weight, shape, match.transpose, offset, limit, module.key)
    term = RowsTerm(loaded, weight, count, first, offset, limit / 2, module.key)
    if match.transpose:
        dense = np.ascontiguousarray(rows_delta(term, 0, count).T)
        return DenseTerm(dense, 1.0, module.key, offset)
    return term


class _Named:
    """What :func:`~lora_tools.adapter.require_finite` names a module by: its key and file."""

    def __init__(self, module: DeltaModule) -> None:
        self.key = module.key
        self.down = next(iter(module.tensors.values()), None)


def _loaded(module: DeltaModule, harm: str) -> DeltaModule:
    """``module`` with every tensor read into memory as float32 (checked finite).

    A LyCORIS LoKr's two factors are also kept whole (``lokr_w1`` / ``lokr_w2``, the float32
    products its rows would otherwise rebuild for every 64 rows: the same values, computed
    once), where that leaves its scale as it was.
    """
    tensors = {}
    for role, tensor in module.tensors.items():
        values = np.asarray(tensor.numpy(), dtype=np.float32)
        tensors[role] = ArrayTensor(require_finite(values, role, _Named(module), harm))
    loaded = dataclasses.replace(module, tensors=tensors)
    if module.spec is TYPES[LOKR] and {"lokr_w1", "lokr_w2"} - set(tensors):
        w1, w2 = loaded.spec.factors(loaded, np.dtype(np.float32))  # type: ignore[attr-defined]
        whole = dataclasses.replace(
            loaded, tensors={**tensors, "lokr_w1": ArrayTensor(w1), "lokr_w2": ArrayTensor(w2)}
        )
        if whole.scale == loaded.scale and whole.update_dims == loaded.update_dims:
            return whole
    return loaded


def copy_raw(
    reader: SafetensorsFile, job: TensorJob, writer: SafetensorsWriter, progress: ProgressFn
) -> None:
    """Copy a tensor's bytes without decoding them (kernel-side, see ``copy_range``)."""
    info = job.info
    writer.copy_range(
        job.name,
        reader.fileno(),
        reader.header.data_start + info.begin,
        info.nbytes,
        on_chunk=lambda n: progress(n, 0),
    )
    progress(0, 1)


def job_rows(job: TensorJob, block_bytes: int) -> tuple[int, int, int]:
    """``(rows, cols, rows per block)`` for merging a tensor in row blocks.

    Blocks hold a multiple of PRODUCT_ROWS rows, so that the products (and so the bytes written)
    do not depend on ``block_bytes``.
    """
    rows, cols = dims_2d(job.info.shape)
    if job.needs_whole_tensor:
        return rows, cols, rows
    step = row_block(rows, cols * 4, block_bytes)
    return rows, cols, min(rows, max(PRODUCT_ROWS, step - step % PRODUCT_ROWS))
