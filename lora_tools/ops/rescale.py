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
in strength. LyCORIS types are refused.

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
from lora_tools.errors import UsageError
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
        old_alphas / new_alphas: per-module alpha before and after (effective values).
        notes: things the user should know (tensors the operation could not scale).
    """

    command = "rescale"

    adapter: Adapter
    changed: tuple[str, ...] = ()
    old_alphas: dict[str, float] = dataclasses.field(default_factory=dict)
    new_alphas: dict[str, float] = dataclasses.field(default_factory=dict)
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
    adapter.require_plain_lora("rescale")
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

    modules: dict[str, LoraModule] = {}
    changed: list[str] = []
    old_alphas: dict[str, float] = {}
    new_alphas: dict[str, float] = {}
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

    if factor is not None and adapter.passthrough:
        names = list(adapter.passthrough)
        notes.append(
            f"{len(names)} full tensors (e.g. {names[0]!r}: modules_to_save or saved layers) "
            f"replace base weights instead of adding to them; --factor cannot scale them "
            "without the base, so they are kept unchanged"
        )
    out = dataclasses.replace(adapter, modules=modules, metadata=dict(adapter.metadata))
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
