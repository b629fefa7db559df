"""Planning a merge: the inputs, the checks, and what happens to each base tensor.

:func:`plan_merge` opens the base (headers and indexes only) and every adapter, resolves each
adapter module to the base weight it updates (:mod:`lora_tools.resolve`), and records, per
output file, every tensor in the base file's order with what happens to it
(:class:`~lora_tools.ops.merge.jobs.TensorJob`). Nothing here reads tensor data beyond the
adapters' factors (for the overflow check); nothing is written.

Example:
    >>> DTYPE_NAMES["bf16"]
    'BF16'
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from lora_tools.adapter import EMBEDDING, LARGEST, LARGEST_F32, Adapter
from lora_tools.deltas import DeltaModule
from lora_tools.errors import (
    AdapterError,
    OutputError,
    UnsupportedAdapterError,
    UnsupportedBaseError,
    UsageError,
)
from lora_tools.io.checkpoint import Checkpoint, open_checkpoint
from lora_tools.io.safetensors import Tensor
from lora_tools.lowrank import max_abs_update
from lora_tools.ops.merge.arithmetic import FLOAT_DTYPES
from lora_tools.ops.merge.jobs import FilePlan, Source, TensorJob
from lora_tools.quant.schemes import component_scheme
from lora_tools.resolve import ModuleMatch, Resolution, resolve

#: --dtype spellings -> safetensors dtype names (``keep`` keeps each tensor's own).
DTYPE_NAMES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}

#: PEFT inits that also change the base weights (``pissa*``, ``olora``, ``corda``, ``loftq``,
#: ``lora_ga``: PEFT's ``save_pretrained`` converts all but LoftQ with
#: ``path_initial_model_for_weight_conversion``). EVA only sets ``lora_A`` from data and zeroes
#: ``lora_B`` (``init_lora_weights == "eva"`` in ``LoraLayer.update_layer``): once trained it
#: is a plain LoRA, and PEFT's merge_and_unload of it equals loratool's.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class AdapterSpec:
    """One adapter to merge and its weight (negative weights subtract).

    Attributes:
        path: the adapter file, folder or Hub id; None for an in-memory adapter.
        weight: the merge weight.
        adapter: an in-memory :class:`~lora_tools.adapter.Adapter`, merged instead of reading
            ``path``.
    """

    path: str | None
    weight: float = 1.0
    adapter: Adapter | None = None

    @property
    def label(self) -> str:
        """How messages name the adapter."""
        if self.path is not None:
            return self.path
        return f"the in-memory adapter {self.adapter.name if self.adapter else '<adapter>'}"


@dataclass
class AdapterReport:
    """One adapter of a plan: how it was named, what was read, and how its modules resolved."""

    spec: AdapterSpec
    adapter: Adapter
    resolution: Resolution


@dataclass
class MergePlan:
    """Everything :func:`execute` needs; built by :func:`plan_merge` without reading tensor data."""

    base: Checkpoint
    base_spec: str
    files: list[FilePlan]
    adapters: list[AdapterReport]
    dtype: str | None
    #: component name -> its scheme, for the components of a quantized base (fp8).
    schemes: dict[str, Any] = field(default_factory=dict)
    #: (component, tensor) left out of the output: scales and markers of a dequantized base.
    dropped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def dequantized(self) -> bool:
        """The output dequantizes a quantized base (``--dtype`` on an fp8 base)."""
        return bool(self.schemes) and self.dtype is not None

    @property
    def output_is_file(self) -> bool:
        return self.base.kind == "file"

    @property
    def total_bytes(self) -> int:
        return sum(job.out_nbytes for f in self.files for job in f.jobs)

    @property
    def total_tensors(self) -> int:
        return sum(len(f.jobs) for f in self.files)


def _check_update_fits(match: ModuleMatch, weight: float, role: str, out_dtype: str) -> None:
    """AdapterError when ``weight`` times a module's update cannot be held by ``out_dtype``.

    Checked while planning, so nothing is written. Half the dtype's range is left for the
    base weight the update is added to.
    """
    module = match.module
    if isinstance(module, DeltaModule) and role in ("weight", "bias_scale"):
        return  # checked on each row block as it is computed (RowsTerm / WeightTerm limit)
    scale = (1.0 if isinstance(module, DeltaModule) else module.scale) * weight
    limit = LARGEST.get(out_dtype, LARGEST_F32) / 2
    if role in ("bias", "bias_diff"):
        values = module.bias if role == "bias" else module.bias_diff
        assert values is not None
        with np.errstate(over="ignore", invalid="ignore"):
            peak = float(np.abs(values.numpy().astype(np.float64)).max(initial=0.0))
            peak *= abs(scale if role == "bias" else weight)
    else:
        harm = f"merging it would make {match.target.key!r} non-finite"
        up, down = module.finite_factors(consequence=harm)
        peak = max_abs_update(up, down, scale, limit)
    if not peak < limit:
        raise AdapterError(
            f"module {module.key!r}: its update times weight {weight:g} reaches {peak:.3g} "
            f"(scale {scale:.3g}), beyond what {out_dtype} can hold next to the base weight "
            f"({limit:.3g}); merging would write inf into {match.target.key!r}",
            path=getattr(getattr(getattr(module, "down", None), "file", None), "path", None),
            hint="use a smaller --weight, or fix the adapter's alpha",
            kind="non-finite",
        )


def _scales_bias(module: object) -> bool:
    """The module's merge scales the layer's bias (IA3 on the outputs)."""
    return isinstance(module, DeltaModule) and module.spec.scales_bias(module)


def _check_in_memory(adapter: Adapter) -> Adapter:
    """The checks :func:`lora_tools.formats.load_adapter` makes on what it reads, made on an
    adapter built or changed in memory."""
    if not adapter.modules and not adapter.foreign:
        raise AdapterError(
            "the in-memory adapter holds no LoRA module (both factors) to merge",
            path=adapter.source,
            kind="no-modules",
        )
    adapter.require_usable_scales()
    return adapter


def _check_mergeable(adapter: Adapter, weight: float) -> None:
    adapter.require_plain_lora("merge", deltas_ok=True)
    for m in adapter.deltas.values():
        if not m.computed:
            raise UnsupportedAdapterError(
                f"unsupported adapter type {m.type} (e.g. {m.key!r}); loratool does not "
                "compute its update, so merge cannot fold it into the base",
                path=adapter.source,
                hint="ComfyUI applies it at load time",
                kind="unsupported-type",
            )
    adapter.require_known_scale("merge")
    config = adapter.config or {}
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise UnsupportedAdapterError(
            f"adapter was initialised with {config['init_lora_weights']!r}, which also changes "
            "the base weights; merging it into the original base gives a wrong model",
            path=adapter.config_source or adapter.source,
            hint="convert it to a plain LoRA with PEFT first (save_pretrained with "
            "path_initial_model_for_weight_conversion)",
            kind="unsupported-type",
        )
    for key in ("layer_replication", "alora_invocation_tokens"):
        if config.get(key):
            raise UnsupportedAdapterError(
                f"adapter uses {key}, which cannot be folded into the base weights",
                path=adapter.config_source or adapter.source,
                kind="unsupported-type",
            )
    for m in adapter.modules.values():
        if m.dora and m.kind == EMBEDDING:
            raise UnsupportedAdapterError(
                f"module {m.key!r} is a DoRA embedding; its norm runs over whole columns of the "
                "table, which loratool does not merge",
                path=adapter.source,
                hint="merge this adapter with PEFT's merge_and_unload",
                kind="unsupported-type",
            )
    if weight != 1.0 and adapter.modules and any(m.dora for m in adapter.modules.values()):
        raise UsageError(
            f"DoRA adapter with weight {weight:g}: DoRA rescales whole rows, so a weighted "
            "DoRA merge is not defined",
            path=adapter.source,
        )


def _check_placements(match: ModuleMatch, adapter: Adapter) -> None:
    """A module whose merge reads the weight (kohya DoRA, OFT...) needs that weight in one
    piece: refused where the base splits it over several tensors (a BFL ``qkv`` module on a
    diffusers Flux folder's ``to_q`` / ``to_k`` / ``to_v``)."""
    module = match.module
    if isinstance(module, DeltaModule) and not module.row_local and len(match.parts) > 1:
        names = ", ".join(repr(p.target.key) for p in match.parts)
        raise UnsupportedAdapterError(
            f"module {module.key!r} ({module.type}) reads the weight it updates, which this "
            f"base splits into {len(match.parts)} tensors ({names})",
            path=adapter.source,
            hint="merge it into a base in the adapter's own layout (a single-file checkpoint)",
            kind="unsupported-type",
        )


# -- planning -----------------------------------------------------------------------------


def _out_dtype(dtype: str, target: str | None) -> str:
    return target if target is not None and dtype in FLOAT_DTYPES else dtype


def plan_merge(
    base: str | os.PathLike[str],
    adapters: list[AdapterSpec],
    *,
    dtype: str | None = None,
    allow_unmatched: bool = False,
    base_spec: str | None = None,
) -> MergePlan:
    """Resolve every adapter against the base and decide what happens to each base tensor.

    Args:
        base: a local base checkpoint (file, HF folder, diffusers folder).
        adapters: adapters in merge order with their weights.
        dtype: output dtype for float tensors (safetensors name) or None to keep.
        allow_unmatched: modules that match no base weight are skipped (and counted).
        base_spec: how the user named the base (a Hub id), for the provenance record.

    Raises:
        ResolveError / ShapeError: a module matches nothing, several weights, or does not fit.
        UnsupportedAdapterError: types loratool does not compute, base-changing PEFT
            variants, DoRA embeddings.
    """
    from lora_tools.formats import load_adapter

    if not adapters:
        raise UsageError("no adapter to merge", hint="name at least one adapter")
    _refuse_gguf(Path(base))
    ckpt = open_checkpoint(base)
    try:
        for comp in ckpt.components.values():
            _refuse_unsupported_scheme(comp)
    except BaseException:
        ckpt.close()
        raise
    reports: list[AdapterReport] = []
    per_tensor: dict[tuple[str, str], list[Source]] = {}
    replacements: dict[tuple[str, str], Tensor] = {}
    replaced_by: dict[tuple[str, str], tuple[Any, str]] = {}
    for spec in adapters:
        if not math.isfinite(spec.weight):
            raise UsageError(
                f"weight {spec.weight!r} for {spec.label} is not a finite number",
                hint="give each weight as a finite number such as 0.8 or -0.5",
                kind="weight-not-finite",
            )
        if spec.adapter is not None:
            adapter = _check_in_memory(spec.adapter)
        elif spec.path is not None:
            adapter = load_adapter(spec.path)
        else:
            raise UsageError("an AdapterSpec names no adapter (path and adapter are None)")
        _check_mergeable(adapter, spec.weight)
        res = resolve(adapter, ckpt)
        res.raise_for_problems(adapter, allow_unmatched=allow_unmatched)
        reports.append(AdapterReport(spec, adapter, res))
        # a tied head after the input embedding, as PEFT merges them (in the model's order)
        items = sorted(
            (*res.matches.items(), *res.deltas.items()), key=lambda kv: kv[0] in res.tied_heads
        )
        for key, match in items:
            if key in res.shared:
                continue  # PEFT ties it to the input embedding's module: applied through that
            module = match.module
            _check_placements(match, adapter)
            for part in match.placements:
                roles = (
                    ("weight", part.target),
                    ("bias", part.bias if module.bias is not None else None),
                    ("bias_diff", part.bias if module.bias_diff is not None else None),
                    ("bias_scale", part.bias if _scales_bias(module) else None),
                )
                for role, t in roles:
                    if t is not None:
                        source = (match, spec.weight, role, part.rows)
                        per_tensor.setdefault((t.component, t.key), []).append(source)
        for key, target in res.replacements.items():
            rows = res.full.token_rows.get(key)
            what = "trainable tokens" if rows is not None else "modules_to_save"
            if spec.weight != 1.0:
                raise UsageError(
                    f"{key!r} is a full tensor that replaces the base's {target.key!r} "
                    f"({what}); a merge weight of {spec.weight} is not defined for it",
                    path=adapter.source,
                    hint="merge this adapter with weight 1",
                )
            where = (target.component, target.key)
            tensor = adapter.passthrough[key]
            if where in replacements:
                earlier_spec, earlier_key = replaced_by[where]
                if earlier_spec is spec and _same_bytes(tensor, adapter.passthrough[earlier_key]):
                    continue  # a tied weight saved under both names (lm_head and the embedding)
                whose = "this adapter's" if earlier_spec is spec else "another adapter's"
                raise UsageError(
                    f"{key!r} replaces the base's {target.key!r}, and so does {whose} "
                    f"{earlier_key!r} with other values; which one wins is not defined",
                    path=adapter.source,
                    hint="merge the adapters one at a time, in the order you mean",
                )
            replaced_by[where] = (spec, key)
            if rows is not None:
                tensor = TokenRows(ckpt, target, rows, tensor)
            replacements[where] = tensor
        for key in res.full.token_rows:
            target = res.replacements[key]
            if (target.component, target.key) in per_tensor:
                raise UsageError(
                    f"{key!r}: trainable tokens and a LoRA both change the base's "
                    f"{target.key!r}; loratool does not know PEFT's order for the two",
                    path=adapter.source,
                    hint="merge them with PEFT's merge_and_unload",
                )

    files: list[FilePlan] = []
    schemes: dict[str, Any] = {}
    dropped: list[tuple[str, str]] = []
    root = ckpt.path.parent if ckpt.kind == "file" else ckpt.path
    for comp in ckpt.components.values():
        quant = _quant_jobs(comp, per_tensor, replacements, dtype)
        if quant.scheme is not None:
            schemes[comp.name] = quant.scheme
        for path in comp.files:
            reader = comp.open(path)
            infos = sorted(reader.header.tensors.values(), key=lambda i: (i.begin, i.end))
            jobs = []
            for info in infos:
                key = (comp.name, info.name)
                if info.name in quant.dropped:
                    dropped.append(key)
                    continue
                sources = per_tensor.get(key, [])
                replacement = replacements.get(key)
                qjob = quant.weights.get(info.name)
                scale_of = quant.scales.get(info.name)
                if qjob is not None:
                    out_dtype = qjob.to_dtype or info.dtype
                    job = TensorJob(info, out_dtype, sources, None, quant=qjob)
                    qjob.job = job
                    for match, weight, role, _ in sources:
                        _check_update_fits(match, weight, role, qjob.to_dtype or "F32")
                    jobs.append(job)
                    continue
                if (sources or replacement is not None) and info.dtype not in FLOAT_DTYPES:
                    _refuse_quantized(comp, reader, info, path)
                out_dtype = info.dtype if scale_of is not None else _out_dtype(info.dtype, dtype)
                for match, weight, role, _ in sources:
                    _check_update_fits(match, weight, role, out_dtype)
                jobs.append(TensorJob(info, out_dtype, sources, replacement, scale_of=scale_of))
            metadata = reader.header.metadata
            if quant.scheme is not None and dtype is not None and metadata:
                metadata = {k: v for k, v in metadata.items() if k != _COMFY_METADATA}
            files.append(FilePlan(path, path.relative_to(root), jobs, metadata))
    return MergePlan(ckpt, base_spec or str(base), files, reports, dtype, schemes, dropped)


#: ComfyUI's safetensors metadata key naming each quantized layer's format.
_COMFY_METADATA = "_quantization_metadata"


@dataclass
class _QuantPlan:
    """What a quantized component's merge does: the fp8 weights merged or dequantized (name
    -> job), the scale tensors rewritten (name -> the weight's job), the tensors dropped."""

    scheme: Any = None
    weights: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, Any] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)


def _quant_jobs(
    comp: Any,
    per_tensor: dict[tuple[str, str], list[Source]],
    replacements: dict[tuple[str, str], Tensor],
    dtype: str | None,
) -> _QuantPlan:
    """The quantized side of one component's plan (empty for a float component).

    Keep (``dtype`` None): each merged fp8 weight is requantized and its scale rewritten.
    ``--dtype``: every fp8 weight is dequantized, the scales, input scales and markers dropped.

    Raises:
        UnsupportedBaseError: a merged fp8 weight of an unsupported scheme, one without its
            scale tensor, or one an adapter replaces (modules_to_save).
    """
    from lora_tools.ops.merge.quantized import QuantJob
    from lora_tools.quant import FP8_MAX

    fp8 = [n for n in comp if comp.info(n).dtype in FP8_MAX]
    if not fp8:
        return _QuantPlan()
    scheme = component_scheme(comp)
    if not scheme.quantized:
        return _QuantPlan()  # unsupported: merging an fp8 tensor is refused by the caller
    plan = _QuantPlan(scheme)
    dequantize = dtype is not None
    for name in (n for n in fp8 if not scheme.is_scale(n)):  # the marker is fp8 too
        key = (comp.name, name)
        merged = key in per_tensor or key in replacements
        if not (merged or dequantize):
            continue
        path = comp.file_for(name)
        if key in replacements:
            raise UnsupportedBaseError(
                f"base tensor {name!r} is {comp.info(name).dtype} ({scheme.describe()}); an "
                "adapter replaces it with a full tensor (modules_to_save), which loratool does "
                "not quantize",
                path=path,
                hint="merge into the unquantized base",
                kind="unsupported-base",
            )
        scale = scheme.weight_scale_name(name)
        if scale is not None and scale not in comp:
            raise UnsupportedBaseError(
                f"base tensor {name!r} is {comp.info(name).dtype} ({scheme.describe()}) but "
                f"its scale {scale!r} is not in the checkpoint; merging without it would "
                "ignore the scale",
                path=path,
                hint="check that every shard of the base is present",
                kind="unsupported-base",
            )
        expected = scale and scheme.scale_mismatch(comp.info(name).shape, comp.info(scale).shape)
        if expected:
            raise UnsupportedBaseError(
                f"base tensor {name!r} is {comp.info(name).dtype} {list(comp.info(name).shape)} "
                f"({scheme.describe()}) but its scale {scale!r} is "
                f"{list(comp.info(scale).shape)}, expected {expected}; merging would misread "
                "the scale",
                path=comp.file_for(scale),
                hint="check the base's config.json quantization_config against its tensors",
                kind="unsupported-base",
            )
        job = QuantJob(
            scheme,
            path,
            scale,
            comp.file_for(scale) if scale else None,
            comp.info(scale) if scale else None,
            dtype,
        )
        plan.weights[name] = job
        if scale is not None and not dequantize:
            plan.scales[scale] = job
    if dequantize:
        _refuse_packed(comp, scheme)
        plan.dropped = {n for n in comp if scheme.is_scale(n) or n.endswith(".comfy_quant")} - set(
            plan.weights
        )
    return plan


def _refuse_packed(comp: Any, scheme: Any) -> None:
    """UnsupportedBaseError for ``--dtype`` on a base with weights packed in integers beside
    their scales (DeepSeek-V4's FP4 experts: I8, two e2m1 values a byte, ``expert_dtype:
    fp4``): loratool does not dequantize them, and dropping their scales and
    ``quantization_config`` would leave them unreadable."""
    for name in comp:
        scale = scheme.weight_scale_name(name)
        if comp.info(name).dtype in ("I8", "U8") and scale is not None and scale in comp:
            raise UnsupportedBaseError(
                f"base tensor {name!r} is {comp.info(name).dtype} with its scale {scale!r} "
                f"(packed fp4 beside {scheme.describe()}), which --dtype cannot dequantize; "
                "dropping the scales would leave it unreadable",
                path=comp.file_for(name),
                hint="merge keeping the base's scheme (leave out --dtype)",
                kind="unsupported-base",
            )


def _refuse_gguf(base: Path) -> None:
    """UnsupportedBaseError for a GGUF file given as the base (llama.cpp's format)."""
    from lora_tools.quant.schemes import is_gguf

    if base.is_file():
        with open(base, "rb") as fh:
            head = fh.read(4)
        if is_gguf(head):
            raise UnsupportedBaseError(
                "the base is a GGUF file (llama.cpp's quantized format); loratool merges into "
                "safetensors checkpoints only",
                path=base,
                hint="merge into the safetensors checkpoint the GGUF file was made from",
                kind="unsupported-base",
            )


def _refuse_unsupported_scheme(comp: Any) -> None:
    """UnsupportedBaseError for a component quantized in a scheme loratool cannot requantize
    (GPTQ, AWQ, bitsandbytes, int / block compressed-tensors, ComfyUI's non-fp8 formats...),
    named as :func:`lora_tools.quant.detect_scheme` names it: merging its float layers alone
    would leave a model whose quantized layers the adapter should have changed."""
    scheme = component_scheme(comp)
    if not scheme.supported:
        where = comp.index_path or (comp.files[0] if len(comp.files) == 1 else comp.root)
        raise UnsupportedBaseError(
            f"the base is quantized as {scheme.unsupported}; loratool merges into float "
            "checkpoints and fp8 ones (plain, ComfyUI scaled, Hugging Face block, "
            "compressed-tensors FP8) only",
            path=where,
            hint="merge into the unquantized (bf16 / fp16 / fp32) base",
            kind="unsupported-base",
        )


def _refuse_quantized(comp: Any, reader: Any, info: Any, path: Path) -> NoReturn:
    """UnsupportedBaseError naming the quantization scheme the base's tensors and config say
    (:func:`~lora_tools.quant.schemes.component_scheme`, header-only), for a merged tensor that is neither a float
    weight nor an fp8 weight of a supported scheme."""
    scheme = component_scheme(comp)
    raise UnsupportedBaseError(
        f"base tensor {info.name!r} is {info.dtype} ({scheme.describe()}); loratool merges "
        "into float weights (F16, BF16, F32, F64) and fp8 weights of the schemes it knows "
        "(plain, ComfyUI scaled, Hugging Face block, compressed-tensors), never past a scale",
        path=path,
        hint="merge into the unquantized (bf16 / fp16 / fp32) base",
        kind="unsupported-base",
    )


def output_path(out: str | os.PathLike[str], base: Path) -> Path:
    """Where ``-o OUT`` puts the merged model of ``base`` (a local path).

    The output has the base's shape. A single-file base gives one file: OUT itself when it
    ends in ``.safetensors``; inside OUT, under the base's file name, when OUT ends in ``/`` or
    names an existing folder. A folder base gives a folder: OUT, which must not end in
    ``.safetensors``.

    Example:
        >>> output_path("merged/", Path("fixtures/bases/tiny-flux.safetensors"))  # doctest: +SKIP
        PosixPath('merged/tiny-flux.safetensors')
    """
    text = os.fspath(out)
    given = Path(text)
    if base.is_file():
        if text.endswith(("/", os.sep)) or given.is_dir():
            if not given.is_dir():
                raise OutputError(
                    "the folder the output goes in does not exist",
                    path=text,
                    hint="create it first, or give -o NAME.safetensors",
                )
            return given / base.name
        if given.suffix != ".safetensors":
            raise UsageError(
                "the base is a single file, so the merged model is one .safetensors file, but "
                "OUT does not end in .safetensors",
                path=text,
                hint="give -o NAME.safetensors, or -o FOLDER/ to write it there under the "
                f"base's name ({base.name})",
            )
        return given
    if given.suffix == ".safetensors":
        raise UsageError(
            "the base is a folder, so the merged model is a folder, but OUT ends in .safetensors",
            path=text,
            hint="give a folder path for -o (the weight files keep the base's names)",
        )
    return given


def _same_bytes(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and bytes, compared chunk by chunk."""
    if (a.dtype, tuple(a.shape)) != (b.dtype, tuple(b.shape)):
        return False
    left, right = b"", b""
    chunks_a, chunks_b = iter(a.iter_bytes()), iter(b.iter_bytes())
    while True:
        if not left:
            left = bytes(next(chunks_a, b""))
        if not right:
            right = bytes(next(chunks_b, b""))
        if not left or not right:
            return not left and not right
        n = min(len(left), len(right))
        if left[:n] != right[:n]:
            return False
        left, right = left[n:], right[n:]


class TokenRows(Tensor):
    """A base weight with some rows replaced by PEFT's trainable tokens (values in the base's
    dtype, cast as ``TrainableTokensLayer.merge`` casts them: ``.to(weight)``), read when the
    merge reaches it."""

    def __init__(self, ckpt: Checkpoint, target: Any, rows: tuple[int, ...], values: Tensor):
        self.ckpt, self.target, self.rows, self.values = ckpt, target, rows, values
        self.dtype = target.info.dtype
        self.shape = tuple(target.info.shape)

    def numpy(self) -> np.ndarray:
        from lora_tools.io.safetensors import numpy_dtype

        comp = self.ckpt.components[self.target.component]
        # a fresh array (the reader allocates it): its rows can be set in place
        weight = comp.open(comp.file_for(self.target.key)).read(self.target.key)
        values = np.asarray(self.values.numpy())
        weight[list(self.rows)] = values.astype(numpy_dtype(self.dtype))
        return weight

    def tobytes(self) -> bytes:
        return self.numpy().tobytes()
