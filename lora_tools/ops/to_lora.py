"""What ``convert --to lora``, ``resize`` and ``combine`` share: the modules of the other
adapter types (:mod:`lora_tools.deltas`) as plain LoRA modules in the adapter's own naming.

Each module's factors come from :func:`lora_tools.deltas.factors.to_lora` (exact, or the
optimal LoRA of the rank a rule picks); this module places them: names (kohya names stay
kohya), layout (a convolution's kernel from the type's tensors or the base weight), alpha (one
per component in kohya files, the scale in the factors), metadata and config of a plain LoRA.

Example:
    >>> from lora_tools.formats import load_adapter                          # doctest: +SKIP
    >>> lora, rows, notes = as_lora(load_adapter("tests/data/lycoris/lokr.safetensors"), None,
    ...                             operation="convert")                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_tools.adapter import CONV, LINEAR, Adapter, LoraModule
from lora_tools.deltas import LOHA, DeltaError, DeltaModule
from lora_tools.deltas.peft_types import VERA
from lora_tools.errors import (
    AdapterError,
    ResolveError,
    ShapeError,
    UnsupportedAdapterError,
    UsageError,
)
from lora_tools.formats.peft import DIFFUSERS_METADATA_KEY, peft_config_for
from lora_tools.io.safetensors import ArrayTensor, numpy_dtype
from lora_tools.lowrank import split_scalar
from lora_tools.naming import target_paths
from lora_tools.ops._algebra import Progress, output_alphas, with_factors

#: Formats that store one alpha tensor per module (kohya-style keys).
_ALPHA_TENSORS = ("kohya", "comfyui")
#: PEFT config fields that describe the model and the training, not the tensors.
_CONFIG_FIELDS_TO_KEEP = (
    "base_model_name_or_path",
    "task_type",
    "bias",
    "lora_dropout",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
)

#: kohya ``ss_network_args`` that describe a LyCORIS type or a weight decomposition, which a
#: plain LoRA has not (conv_dim / conv_alpha, dropout and the rest stay).
_LYCORIS_NETWORK_ARGS = (
    "algo",
    "factor",
    "use_tucker",
    "use_scalar",
    "decompose_both",
    "full_matrix",
    "unbalanced_factorization",
    "dora_wd",
    "wd_on_output",
    "block_size",
    "constraint",
    "rescaled",
    "bypass_mode",
    "rs_lora",
    "train_norm",
    "preset",
)


@dataclass(frozen=True)
class ModuleToLora:
    """What ``convert --to lora`` did to one module.

    Attributes:
        key: the module's key.
        type: its adapter type (``LoHa``, ``LoKr``...).
        rank: the LoRA's rank.
        exact_rank: the update's rank (None where a randomized SVD does not tell it).
        retained_energy / relative_error: of the LoRA against the module's exact update
            (relative Frobenius; before the factors are rounded to the file's dtype).
        frobenius: ``||dW||_F``.
        method: ``factors`` (factor space), ``randomized`` or ``dense`` (SVD of the update).
    """

    key: str
    type: str
    rank: int
    exact_rank: int | None
    retained_energy: float
    relative_error: float
    frobenius: float
    method: str

    def as_dict(self) -> dict[str, Any]:
        """The row as in ``convert --to lora --json`` (the key is ``module`` there)."""
        row = dataclasses.asdict(self)
        return {"module": row.pop("key"), **row}


def base_weights(
    adapter: Adapter, base: str | os.PathLike[str], read: set[str]
) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """Each delta module's base weight shape, as its update is laid out (``[out, in, *k]``),
    and the weight itself for the stems in ``read``, resolved against ``base`` as merge and
    validate resolve them (:func:`lora_tools.resolve.resolve`; a module on rows of fused
    weights gets those rows).

    Raises:
        ResolveError / ShapeError: a module in ``read`` matches no base weight, several, or
            one whose shape its update does not fit.
    """
    from lora_tools.io.checkpoint import open_checkpoint
    from lora_tools.resolve import resolve

    shapes: dict[str, tuple[int, ...]] = {}
    arrays: dict[str, np.ndarray] = {}
    with open_checkpoint(base) as ckpt:
        res = resolve(adapter, ckpt)
        for stem, message in res.shape_errors.items():
            if stem in adapter.deltas:
                raise ShapeError(message, path=adapter.source, hint="is this the right base model?")
        for stem in read:
            if stem in res.ambiguous:
                cands = res.ambiguous[stem]
                raise ResolveError(
                    f"module {stem!r} matches {len(cands)} base weights ({', '.join(cands[:3])})",
                    path=adapter.source,
                    hint="give the one component's checkpoint as the base",
                    kind="ambiguous",
                )
            if stem not in res.deltas:
                raise ResolveError(
                    f"module {stem!r} ({adapter.deltas[stem].type}) matches no base weight; "
                    "its update depends on the base weight",
                    path=adapter.source,
                    hint="is this adapter made for this base model?",
                    kind="unmatched",
                )
        comps = {c.name: c for c in ckpt.components.values()}

        def weight(target: Any) -> np.ndarray:
            return comps[target.component].open(target.file).read(target.key)

        for stem, match in res.deltas.items():
            m = adapter.deltas[stem]
            bias = match.placements[0].bias
            if (
                stem in read
                and m.spec.scales_bias(m)
                and bias is not None
                and np.any(weight(bias) != 0)
            ):
                raise UnsupportedAdapterError(
                    f"module {stem!r} ({m.type} on the outputs) also scales the base layer's "
                    f"bias {bias.key!r}, which a plain LoRA cannot carry",
                    path=adapter.source,
                    hint="`loratool merge` applies it, bias included",
                    kind="unsupported-type",
                )
            if any(part.rows is not None for part in match.parts):
                # rows of one fused weight, or of several (a native qkv on to_q / to_k / to_v)
                rest = tuple(match.target.info.shape[1:])
                shapes[stem] = (adapter.deltas[stem].update_dims[0], *rest)
                if stem in read:
                    rows = []
                    for part in sorted(match.parts, key=lambda p: p.rows.update_start):
                        r = part.rows
                        rows.append(weight(part.target)[r.start : r.start + r.count])
                    arrays[stem] = np.concatenate(rows)
                continue
            shape = tuple(match.target.info.shape)
            shapes[stem] = shape[::-1] if match.transpose else shape
            if stem in read:
                w = weight(match.target)
                arrays[stem] = w.T if match.transpose else w
    return shapes, arrays


def require_base(
    adapter: Adapter, base: str | os.PathLike[str] | None, operation: str
) -> list[DeltaModule]:
    """The delta modules whose update reads the base weight; UsageError (kind
    ``needs-base``) naming the first when there are any and no ``base``."""
    needy = [m for m in adapter.deltas.values() if m.needs_base]
    if needy and base is None:
        m = needy[0]
        what = "a weight decomposition (dora_scale)" if m.dora_scale is not None else m.type
        raise UsageError(
            f"{len(needy)} modules' updates depend on the base weight (e.g. {m.key!r}, "
            f"{what}); {operation} needs it",
            path=adapter.source,
            hint="give the base checkpoint the adapter was trained on",
            kind="needs-base",
        )
    return needy


def as_lora(
    adapter: Adapter,
    rule: dict[str, Any] | None,
    *,
    base: str | os.PathLike[str] | None = None,
    seed: int = 0,
    distribute: str = "sqrt",
    progress: Progress | None = None,
    operation: str,
) -> tuple[Adapter, tuple[ModuleToLora, ...], tuple[str, ...]]:
    """``adapter`` with every delta module replaced by its plain LoRA (``rule``: keyword
    arguments of :func:`~lora_tools.lowrank.select_rank`; None: the exact LoRA), the row of
    each, and notes. resize and combine go through here for the other types.

    Raises:
        UsageError: modules whose update reads the base weight, without ``base`` (kind
            ``needs-base``: each command says how it takes a base).
        UnsupportedAdapterError: a type loratool does not compute.
    """
    from lora_tools.deltas.factors import to_lora

    adapter.require_plain_lora(operation, deltas_ok=True)
    deltas = adapter.deltas
    needy = require_base(adapter, base, operation)
    shapes: dict[str, tuple[int, ...]] = {}
    arrays: dict[str, np.ndarray] = {}
    if base is not None:
        shapes, arrays = base_weights(adapter, base, {m.key for m in needy})
    rows: list[ModuleToLora] = []
    built: list[tuple[LoraModule, np.ndarray, np.ndarray]] = []
    for n, m in enumerate(deltas.values()):
        try:
            lora = to_lora(m, rule, base=arrays.get(m.key), seed=seed, distribute=distribute)
        except DeltaError as exc:
            raise AdapterError(
                f"module {m.key!r}: {exc}", path=adapter.source, kind="type-shape-mismatch"
            ) from None
        _require_finite(adapter, m, lora.up, lora.down)
        rows.append(
            ModuleToLora(
                m.key,
                m.type,
                lora.rank,
                lora.exact_rank,
                lora.retained_energy,
                lora.relative_error,
                lora.frobenius,
                lora.method,
            )
        )
        built.append((_lora_template(adapter, m, shapes.get(m.key)), lora.up, lora.down))
        if progress is not None:
            progress(n + 1, len(deltas))
    modules = dict(adapter.modules)
    alphas = output_alphas(adapter.format, [(t, up.shape[1]) for t, up, _ in built])
    for (template, up, down), alpha in zip(built, alphas, strict=True):
        c_up, c_down = split_scalar(up.shape[1] / alpha)
        modules[template.key] = with_factors(template, up * c_up, down * c_down, alpha=alpha)
    gone = {key for m in deltas.values() for key in m.keys.values()}
    if any(m.type == VERA for m in deltas.values()):
        # the projections VeRA's modules share, which no LoRA module reads
        gone |= {"base_model.vera_A", "base_model.vera_B"}
    out = dataclasses.replace(
        adapter,
        modules=modules,
        passthrough={k: t for k, t in adapter.passthrough.items() if k not in gone},
        foreign={},
        deltas={},
        metadata=_lora_metadata(adapter.metadata),
        config=_lora_config(adapter, list(modules.values())),
    )
    notes = []
    flat = [
        m.key
        for m in deltas.values()
        if m.type == LOHA and "hada_t1" not in m.tensors and m.key not in shapes
    ]
    if flat:
        notes.append(
            f"{len(flat)} LoHa modules do not say a kernel shape (LoHa stores a convolution's "
            f"flattened, e.g. {flat[0]!r}: update {list(deltas[flat[0]].delta_shape)}); a "
            "convolution among them gets 2-D factors [out, in * kh * kw], which ComfyUI "
            "reads and kohya / diffusers loaders do not: with the base checkpoint each module "
            "is laid out as its base weight"
        )
    return out, tuple(rows), tuple(notes)


def _require_finite(adapter: Adapter, m: Any, up: np.ndarray, down: np.ndarray) -> None:
    if not (np.isfinite(up).all() and np.isfinite(down).all()):
        raise AdapterError(
            f"module {m.key!r} ({m.type}): its tensors hold NaN/Inf values; the LoRA would "
            "be non-finite",
            path=adapter.source,
            hint="run `loratool validate` on the adapter; use an earlier checkpoint",
            kind="non-finite",
        )


def _lora_template(adapter: Adapter, m: Any, base_shape: tuple[int, ...] | None) -> LoraModule:
    """A LoRA module in ``m``'s place: its name, path, dtype and layout (the base weight's
    shape when known, else what the type's tensors say), with placeholder factors."""
    shape = base_shape or m.delta_shape
    kernel = tuple(shape[2:])
    like = next(t for role, t in m.tensors.items() if role not in ("alpha", "dora_scale"))
    keys = {}
    if adapter.format in _ALPHA_TENSORS or m.path is None:
        keys = {
            "down": f"{m.key}.lora_down.weight",
            "up": f"{m.key}.lora_up.weight",
            "alpha": f"{m.key}.alpha",
        }
        if m.bias_diff is not None:
            keys["bias_diff"] = m.keys.get("diff_b", f"{m.key}.diff_b")
    dtype = numpy_dtype(like.dtype)
    return LoraModule(
        key=m.key,
        down=ArrayTensor(np.zeros((1, *shape[1:]), dtype), like.dtype),
        up=ArrayTensor(np.zeros((shape[0], 1, *[1] * len(kernel)), dtype), like.dtype),
        alpha=None,
        kind=CONV if kernel else LINEAR,
        path=m.path,
        component=m.component,
        keys=keys,
        bias_diff=m.bias_diff,
    )


def _lora_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata of a plain LoRA: LyCORIS' network module and type arguments (``algo``,
    ``dora_wd``...) no longer describe the tensors; the diffusers config is rebuilt by the
    writer."""
    out = {k: v for k, v in metadata.items() if k != DIFFUSERS_METADATA_KEY}
    if out.get("ss_network_module", "").startswith("lycoris"):
        out["ss_network_module"] = "networks.lora"
    raw = out.get("ss_network_args")
    if raw:
        try:
            args = json.loads(raw)
        except ValueError:
            args = None
        if isinstance(args, dict) and set(args) & set(_LYCORIS_NETWORK_ARGS):
            kept = {k: v for k, v in args.items() if k not in _LYCORIS_NETWORK_ARGS}
            if kept:
                out["ss_network_args"] = json.dumps(kept)
            else:
                del out["ss_network_args"]
    return out


def _lora_config(adapter: Adapter, modules: list[LoraModule]) -> dict[str, Any] | None:
    """A PEFT adapter's config as a LoRA's (peft_type LORA; scale fields filled by the writer),
    keeping what describes the model and the training."""
    if adapter.config is None:
        return None
    probe = Adapter(format=adapter.format, modules={m.key: m for m in modules}, config={})
    fresh = peft_config_for(probe) or {}
    fresh["peft_type"] = "LORA"
    fresh["target_modules"] = target_paths(modules)
    for key in _CONFIG_FIELDS_TO_KEEP:
        value = adapter.config.get(key)
        if value is not None:
            fresh[key] = value
    return fresh


__all__ = ["ModuleToLora", "as_lora", "base_weights", "require_base"]
