"""``rescale``: change alpha without changing the update, or change the update's strength.

Every module applies ``dW = scale * up @ down`` with ``scale = alpha / r`` (rsLoRA:
``alpha / sqrt(r)``). Three modes:

- ``alpha=A``: set every module's alpha to A and multiply the factors by ``scale_old /
  scale_new``: dW is unchanged.
- ``normalize=True``: set every module's scale to 1 (alpha = r, rsLoRA: alpha = sqrt(r)) and
  fold the old scale into the factors: dW is unchanged.
- ``factor=F``: multiply the factors by F (alpha unchanged): dW becomes ``F * dW``.

A multiplier ``c`` is split as ``c_up * c_down`` with ``c_down`` a power of two (exact in binary
floating point), so fp16 factors stay in range. PEFT ``lora_B.bias`` terms are scaled with the
update (PEFT adds ``bias * scale``).

DoRA: alpha and normalize leave ``dW`` and so ``W' = m * (W + dW) / ||W + dW||`` unchanged and are
allowed; ``factor`` is refused, since DoRA renormalises ``W + F dW`` and F would not be the change
in strength.

The other adapter types (:mod:`lora_tools.deltas`) keep their type; ``factor`` scales each
update exactly by scaling factors it is linear in, split as above: LoHa ``hada_w1_a`` and
``hada_w2_a`` (one per Hadamard half: ``(c1 A1 B1) * (c2 A2 B2) = c1 c2 dW``), LoKr the ``w1``
and ``w2`` sides (``kron(c1 w1, c2 w2) = c1 c2 kron(w1, w2)``), Tucker LoCon ``lora_up`` and
``lora_down``, a full diff ``diff`` (and ``diff_b``) itself. ``alpha`` / ``normalize`` fold the
scale change the same way on the types whose scale is ``alpha / r`` (LoHa, Tucker LoCon, a
decomposed LoKr, kohya DoRA); a whole LoKr (scale 1 whatever alpha says) and a full diff have
no alpha and are kept. Types whose update reads the base weight (a weight decomposition
``dora_scale``, OFT, IA3, GLoRA) refuse ``factor``: their update is no multiple of their
tensors, so no tensor scaled makes ``F * dW``; ``loratool convert --to lora --base BASE``
turns them into a LoRA that rescales exactly.

Example:
    >>> from lora_tools.formats import load_adapter                    # doctest: +SKIP
    >>> result = rescale_adapter(load_adapter("fixtures/peft/llama-lora"), normalize=True)
    >>> {m.scale for m in result.adapter.modules.values()}             # doctest: +SKIP
    {1.0}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_tools.adapter import LARGEST_F32, Adapter, LoraModule
from lora_tools.deltas import DORA_LORA, FULL, LOHA, LOKR, PEFT, TUCKER_LOCON, DeltaModule
from lora_tools.errors import UnsupportedAdapterError, UsageError
from lora_tools.io.safetensors import ArrayTensor
from lora_tools.lowrank import split_scalar
from lora_tools.ops._algebra import Progress, add_history, cast_like, with_factors
from lora_tools.results import WrittenResult, adapter_inputs

SMALLEST_F32 = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True, repr=False)
class RescaleResult(WrittenResult):
    """The rescaled adapter and what changed.

    Attributes:
        adapter: the new adapter (unchanged modules keep their original tensors).
        changed: keys of modules whose tensors changed.
        old_alphas / new_alphas: per-module alpha before and after (effective values;
            ``"none"`` for a type without one: a full diff, a whole LoKr).
        notes: things the user should know (tensors the operation could not scale).
    """

    command = "rescale"

    adapter: Adapter
    changed: tuple[str, ...] = ()
    old_alphas: dict[str, float | str] = dataclasses.field(default_factory=dict)
    new_alphas: dict[str, float | str] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def fields(self) -> dict[str, Any]:
        changed = set(self.changed)
        return {
            "format": self.adapter.format,
            "counts": {"modules": len(self.new_alphas), "changed": len(changed)},
            "modules": [
                {
                    "module": key,
                    "old_alpha": self.old_alphas[key],
                    "new_alpha": new,
                    "changed": key in changed,
                }
                for key, new in self.new_alphas.items()
            ],
            "notes": list(self.notes),
        }


def _check_number(name: str, value: float, *, positive: bool) -> None:
    if not math.isfinite(value) or (positive and value <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise UsageError(f"--{name} must be {need}, got {value!r}")


def rescale_adapter(
    adapter: Adapter,
    *,
    alpha: float | None = None,
    factor: float | None = None,
    normalize: bool = False,
    progress: Progress | None = None,
) -> RescaleResult:
    """Rescale every module of ``adapter`` (exactly one of ``alpha``, ``factor``, ``normalize``).

    Args:
        adapter: the adapter to rescale (not modified).
        alpha: new alpha for every module; the update is unchanged.
        factor: multiply every update by this (may be negative); alpha unchanged.
        normalize: make every scale 1; the update is unchanged.
        progress: optional ``progress(done, total)`` callback.

    Returns:
        A :class:`RescaleResult`; write ``result.adapter`` with ``save_adapter``.

    Raises:
        UsageError: not exactly one mode, or a bad number.
        UnsupportedAdapterError: LyCORIS modules, or DoRA with ``factor``.
    """
    if sum(x is not None and x is not False for x in (alpha, factor, normalize or None)) != 1:
        raise UsageError("give exactly one of --alpha, --factor, --normalize")
    adapter.require_plain_lora("rescale", deltas_ok=True)
    adapter.require_known_scale("rescale")
    if alpha is not None:
        _check_number("alpha", alpha, positive=True)
        if not SMALLEST_F32 <= alpha <= LARGEST_F32:
            # A subnormal alpha makes alpha / r round to (nearly) 0, and the factors that
            # keep the update unchanged overflow to inf.
            raise UsageError(
                f"--alpha must lie between {SMALLEST_F32:.3g} and {LARGEST_F32:.3g} (the normal "
                f"float32 range consumers compute the scale in), got {alpha!r}"
            )
    if factor is not None:
        _check_number("factor", factor, positive=False)
        adapter.require_no_dora("rescale --factor")
        _refuse_base_dependent(adapter)

    modules: dict[str, LoraModule] = {}
    changed: list[str] = []
    old_alphas: dict[str, float | str] = {}
    new_alphas: dict[str, float | str] = {}
    notes: list[str] = []
    total = len(adapter.modules)
    for i, (key, m) in enumerate(adapter.modules.items()):
        new_alpha: float | None
        if factor is not None:
            multiplier, new_alpha = factor, m.alpha
        elif normalize:
            new_alpha = math.sqrt(m.rank) if m.rslora else float(m.rank)
            multiplier = m.scale
            if m.alpha is None:
                new_alpha = None  # a missing alpha already means scale 1
        else:
            assert alpha is not None
            new_alpha = float(alpha)
            new_scale = new_alpha / (math.sqrt(m.rank) if m.rslora else m.rank)
            multiplier = m.scale / new_scale
        old_alphas[key] = m.effective_alpha
        if multiplier == 1.0:
            modules[key] = dataclasses.replace(m, alpha=new_alpha)
        else:
            modules[key] = _scaled(m, multiplier, new_alpha, 1.0 if factor is None else factor)
            changed.append(key)
        new_alphas[key] = modules[key].effective_alpha
        if progress is not None:
            progress(i + 1, total)

    deltas, passthrough = _rescale_deltas(
        adapter, alpha, factor, normalize, changed, old_alphas, new_alphas, notes
    )
    own = {key for m in adapter.deltas.values() for key in m.keys.values()}
    if factor is not None and set(adapter.passthrough) - own:
        names = [k for k in adapter.passthrough if k not in own]
        notes.append(
            f"{len(names)} full tensors (e.g. {names[0]!r}: modules_to_save or saved layers) "
            f"replace base weights instead of adding to them; --factor cannot scale them "
            "without the base, so they are kept unchanged"
        )
    out = dataclasses.replace(
        adapter,
        modules=modules,
        deltas=deltas,
        passthrough=passthrough,
        metadata=dict(adapter.metadata),
    )
    if out.config is not None:
        out.config = dict(out.config)
    add_history(
        out,
        "rescale",
        alpha=alpha,
        factor=factor,
        normalize=normalize or None,
    )
    return RescaleResult(
        out,
        tuple(changed),
        old_alphas,
        new_alphas,
        tuple(notes),
        source_inputs=adapter_inputs(adapter),
    )


def _scaled(
    m: LoraModule, multiplier: float, new_alpha: float | None, gain: float = 1.0
) -> LoraModule:
    """``m`` with factors (and lora bias) multiplied by ``multiplier``, alpha set to new_alpha;
    a bias difference (``.diff_b``, added at the merge strength, no alpha / r) times ``gain``,
    the update's own gain (``--factor``; 1 for a new alpha or ``--normalize``)."""
    c_up, c_down = split_scalar(multiplier)
    up, down = m.finite_factors()
    bias = None
    if m.bias is not None:
        # PEFT adds scale * bias. With the update's gain g (F, or 1 for alpha / normalize) the
        # new bias is bias * g * scale_old / scale_new, which is bias * multiplier in every mode.
        bias = np.asarray(m.bias.numpy(), dtype=np.float64) * multiplier
    new = with_factors(m, up * c_up, down * c_down, alpha=new_alpha, bias=bias)
    if m.bias_diff is not None and gain != 1.0:
        diff = np.asarray(m.bias_diff.numpy(), np.float64) * gain
        new.bias_diff = cast_like(diff, m.bias_diff)
    return new


#: Per type, the tensors ``factor`` splits its multiplier over: the update is linear in each
#: (the first role present of each group). A full diff has one.
_LINEAR_ROLES: dict[str, tuple[tuple[str, ...], ...]] = {
    LOHA: (("hada_w1_a",), ("hada_w2_a",)),
    LOKR: (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
    TUCKER_LOCON: (("lora_up",), ("lora_down",)),
    DORA_LORA: (("lora_up",), ("lora_down",)),
    FULL: (("diff",),),
}


def _refuse_base_dependent(adapter: Adapter) -> None:
    for m in adapter.deltas.values():
        if m.needs_base:
            what = (
                "its weight decomposition (dora_scale) renormalises W + F dW"
                if m.dora_scale is not None
                else f"its {m.type} update is computed from the base weight"
            )
            raise UnsupportedAdapterError(
                f"module {m.key!r} ({m.type}): rescale --factor is not defined for it: {what}, "
                "so no tensor scaled makes F times the update",
                path=adapter.source,
                hint="convert it to a plain LoRA first (`loratool convert ADAPTER --to lora "
                "--base BASE --energy 1 -o OUT`), then rescale that",
                kind="unsupported-type",
            )


def _alpha_scaled(m: DeltaModule) -> bool:
    """The module's scale is ``alpha / r`` (a whole LyCORIS LoKr and a full diff have none)."""
    if m.type == LOKR:
        return m.rank is not None or m.convention == PEFT
    return m.type in (LOHA, TUCKER_LOCON, DORA_LORA)


def _rescale_deltas(
    adapter: Adapter,
    alpha: float | None,
    factor: float | None,
    normalize: bool,
    changed: list[str],
    old_alphas: dict[str, float | str],
    new_alphas: dict[str, float | str],
    notes: list[str],
) -> tuple[dict[str, DeltaModule], dict[str, Any]]:
    """Every delta module rescaled in its own type; its tensors stay in the pass-through."""
    passthrough = dict(adapter.passthrough)
    deltas: dict[str, DeltaModule] = {}
    kept: list[DeltaModule] = []
    for key, m in adapter.deltas.items():
        scaled = _alpha_scaled(m)
        old = m.alpha if m.alpha is not None else float(m.rank or 0) if scaled else "none"
        old_alphas[key] = old
        new_alpha = m.alpha
        if factor is not None:
            multiplier = factor
        elif not scaled or (m.needs_base and m.dora_scale is None):
            deltas[key], new_alphas[key] = m, old
            kept.append(m)
            continue
        else:
            if m.convention == PEFT:
                raise UsageError(
                    f"module {m.key!r} is PEFT's {m.type}, whose alpha lives in "
                    "adapter_config.json; rescale --alpha / --normalize rewrite kohya-style "
                    "alpha tensors only",
                    path=adapter.source,
                    hint="use --factor, or convert it to a LoRA first "
                    "(`loratool convert ADAPTER --to lora -o OUT`)",
                )
            rank = float(m.rank or 1)
            new_alpha = (
                float(alpha)
                if alpha is not None
                else (math.sqrt(rank) if m.options.get("rs_lora") else rank)
            )
            multiplier = m.scale / dataclasses.replace(m, alpha=new_alpha).scale
        new = _scaled_delta(m, multiplier, new_alpha, passthrough)
        deltas[key] = new
        new_alphas[key] = new_alpha if new_alpha is not None else old
        if multiplier != 1.0 or new_alpha != m.alpha:
            changed.append(key)
    if kept:
        kinds = sorted({m.type for m in kept})
        notes.append(
            f"{len(kept)} modules ({', '.join(kinds)}, e.g. {kept[0].key!r}) have no alpha / r "
            "scale, so --alpha / --normalize leave them unchanged"
        )
    return deltas, passthrough


def _scaled_delta(
    m: DeltaModule, multiplier: float, new_alpha: float | None, passthrough: dict[str, Any]
) -> DeltaModule:
    """``m`` with its update times ``multiplier`` (split over the tensors it is linear in) and
    its alpha set to ``new_alpha``; the new tensors replace the old ones in ``passthrough``."""
    groups = _LINEAR_ROLES.get(m.type)
    if groups is None:
        raise UnsupportedAdapterError(
            f"module {m.key!r}: rescale does not know which {m.type} tensors its update is "
            "linear in",
            hint="convert it to a plain LoRA first (`loratool convert ADAPTER --to lora -o OUT`)",
            kind="unsupported-type",
        )
    parts = split_scalar(multiplier) if len(groups) == 2 else (multiplier,)
    tensors = dict(m.tensors)
    keys = dict(m.keys)
    for group, c in zip(groups, parts, strict=True):
        if c == 1.0:
            continue
        role = next(r for r in group if r in tensors)
        old = tensors[role]
        tensors[role] = cast_like(np.asarray(old.numpy(), np.float64) * c, old)
        passthrough[keys[role]] = tensors[role]
    bias_diff = m.bias_diff
    if bias_diff is not None and m.type == FULL and multiplier != 1.0:
        bias_diff = cast_like(np.asarray(bias_diff.numpy(), np.float64) * multiplier, bias_diff)
        passthrough[keys["diff_b"]] = bias_diff
    if new_alpha is not None and new_alpha != m.alpha:
        key = keys.setdefault("alpha", f"{m.key}.alpha")
        stored = passthrough.get(key)
        shape = tuple(stored.shape) if stored is not None else ()
        passthrough[key] = ArrayTensor(np.full(shape, new_alpha, np.float64), "F32")
    return dataclasses.replace(m, tensors=tensors, keys=keys, alpha=new_alpha, bias_diff=bias_diff)
