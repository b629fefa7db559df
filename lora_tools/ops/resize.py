"""``resize``: re-rank every module by truncating the SVD of its update, in factor space.

For each module, the SVD of ``dW = scale * up @ down`` comes from the factors (QR of ``up`` and
``down^T``, SVD of the small ``r x r`` core; see :func:`lora_tools.lowrank.low_rank_approx`);
the dense ``d x k`` update is never formed. Conv modules are handled flattened
(``[out, in * kh * kw]``), embeddings in their stored orientation (the truncation of a matrix
and of its transpose are the same). The result is the optimal rank-k approximation
(Eckart-Young) for the chosen k.

Each module keeps its scale (sd-scripts' convention): the new alpha is ``scale * k``
(rsLoRA: ``scale * sqrt(k)``), so adapters with one scale keep one alpha per rank. kohya files
keep each module's alpha instead, the scale going into the factors: diffusers' kohya loader
applies one alpha per component to attention and text-encoder layers, so the per-rank alphas
of a dynamic resize would load at the wrong strength there. Modules already at or below the
chosen rank keep their tensors byte for byte.

DoRA is refused: the magnitude vector renormalises ``W + dW``, so the best rank-k ``dW`` is no
longer the best rank-k DoRA update and the reported errors would not describe the result.

The other adapter types (LoHa, LoKr, Tucker LoCon, full, and with ``base`` the types whose
update reads the base weight) have no rank of their own to truncate: each such module becomes
the optimal plain LoRA of the chosen rank (:func:`lora_tools.deltas.factors.to_lora`, in
factor space where the algebra allows), as ``convert --to lora`` writes it.

Example:
    >>> from lora_tools.formats import load_adapter                 # doctest: +SKIP
    >>> result = resize_adapter(load_adapter("fixtures/peft/llama-all-linear"), rank=4)
    >>> {row.new_rank for row in result.modules}                    # doctest: +SKIP
    {4}
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import UsageError
from lora_tools.lowrank import (
    DISTRIBUTIONS,
    low_rank_approx,
    select_rank,
    singular_values,
    split_scalar,
)
from lora_tools.ops._algebra import Progress, add_history, with_factors
from lora_tools.results import WrittenResult, adapter_inputs, input_ref


@dataclass(frozen=True)
class ModuleResize:
    """What resize did to one module.

    Attributes:
        key: module key as in the file.
        kind: linear, conv or embedding.
        old_rank / new_rank: ranks before and after.
        retained_energy: ``sum(S[:k]^2) / sum(S^2)`` of the scaled update.
        relative_error: ``||dW - dW_k||_F / ||dW||_F``.
        frobenius: ``||dW||_F`` before.
        changed: False when the module was kept as is (chosen rank >= current rank).
    """

    key: str
    kind: str
    old_rank: int
    new_rank: int
    retained_energy: float
    relative_error: float
    frobenius: float
    changed: bool

    def as_dict(self) -> dict[str, Any]:
        """The row as in ``resize --json`` (the key is ``module`` there)."""
        row = dataclasses.asdict(self)
        return {"module": row.pop("key"), **row}


@dataclass(frozen=True, repr=False)
class ResizeResult(WrittenResult):
    """The resized adapter (None for a dry run), per-module rows and a summary.

    ``original`` is the adapter that was resized (the summary compares against it).
    """

    command = "resize"

    adapter: Adapter | None
    modules: tuple[ModuleResize, ...] = ()
    rule: dict[str, Any] = dataclasses.field(default_factory=dict)
    distribute: str = "sqrt"
    dry_run: bool = False
    original: Adapter | None = dataclasses.field(default=None, repr=False, compare=False)
    notes: tuple[str, ...] = ()

    def fields(self) -> dict[str, Any]:
        summary = self.summary(self.original) if self.original is not None else {}
        counts = {k: summary.pop(k) for k in ("modules", "changed", "unchanged") if k in summary}
        return {
            "dry_run": self.dry_run,
            "rule": dict(self.rule),
            "distribute": self.distribute,
            "counts": counts,
            "modules": [row.as_dict() for row in self.modules],
            "summary": summary,
            "notes": list(self.notes),
        }

    @property
    def changed(self) -> list[ModuleResize]:
        return [row for row in self.modules if row.changed]

    def summary(self, original: Adapter) -> dict[str, Any]:
        """Totals: modules changed, parameters before / after, energy and error extremes.

        ``overall_relative_error`` is ``sqrt(sum_modules ||dW - dW_k||^2 / sum ||dW||^2)``.
        """
        rows = self.modules
        total_sq = sum(r.frobenius**2 for r in rows)
        err_sq = sum((r.relative_error * r.frobenius) ** 2 for r in rows)
        before = sum(m.down.numel + m.up.numel for m in original.modules.values())
        before += sum(m.parameters for m in original.deltas.values())
        after = 0
        for r in rows:
            if r.key in original.modules:
                m = original.modules[r.key]
                per_rank = (m.down.numel + m.up.numel) // max(m.rank, 1)
            elif self.adapter is not None and r.key in self.adapter.modules:
                m = self.adapter.modules[r.key]  # the LoRA written (its shape is the base's)
                per_rank = (m.down.numel + m.up.numel) // max(m.rank, 1)
            else:  # a dry run: the update's dims, where the type fixes them
                out, inp = original.deltas[r.key].update_dims
                per_rank = (out or 0) + (inp or 0)
            after += per_rank * r.new_rank
        return {
            "modules": len(rows),
            "changed": len(self.changed),
            "unchanged": len(rows) - len(self.changed),
            "lora_parameters_before": before,
            "lora_parameters_after": after,
            "ranks_before": _hist(r.old_rank for r in rows),
            "ranks_after": _hist(r.new_rank for r in rows),
            "min_retained_energy": min((r.retained_energy for r in rows), default=1.0),
            "max_relative_error": max((r.relative_error for r in rows), default=0.0),
            "overall_relative_error": math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0,
        }


def _hist(values: Any) -> dict[str, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return {str(k): out[k] for k in sorted(out)}


def check_rule(
    *,
    rank: int | None,
    energy: float | None,
    sv_ratio: float | None,
    sv_cumulative: float | None,
    min_rank: int | None,
    max_rank: int | None,
) -> dict[str, Any]:
    """Validate a rank rule; return it as keyword arguments for :func:`select_rank`."""
    given = {
        name: value
        for name, value in (
            ("rank", rank),
            ("energy", energy),
            ("sv_ratio", sv_ratio),
            ("sv_cumulative", sv_cumulative),
        )
        if value is not None
    }
    if len(given) != 1:
        raise UsageError("give exactly one of --rank, --energy, --sv-ratio, --sv-cumulative")
    name, value = next(iter(given.items()))
    if name == "rank" and (not isinstance(value, int) or value < 1):
        raise UsageError(f"--rank must be an integer >= 1, got {value!r}")
    if name in ("energy", "sv_cumulative") and not (0 < value <= 1):
        raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1], got {value!r}")
    if name == "sv_ratio" and not (value >= 1 and math.isfinite(value)):
        raise UsageError(f"--sv-ratio must be a finite number >= 1, got {value!r}")
    if name == "rank" and (min_rank is not None or max_rank is not None):
        raise UsageError(
            "--min-rank / --max-rank bound the dynamic rules (--energy, --sv-ratio, "
            "--sv-cumulative); with --rank the rank is fixed"
        )
    for label, bound in (("--min-rank", min_rank), ("--max-rank", max_rank)):
        if bound is not None and bound < 1:
            raise UsageError(f"{label} must be >= 1, got {bound}")
    if min_rank is not None and max_rank is not None and min_rank > max_rank:
        raise UsageError(f"--min-rank {min_rank} is larger than --max-rank {max_rank}")
    rule = dict(given)
    if name != "rank":
        rule["min_rank"] = min_rank or 1
        rule["max_rank"] = max_rank
    return rule


def resize_adapter(
    adapter: Adapter,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
    distribute: str = "sqrt",
    dry_run: bool = False,
    base: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> ResizeResult:
    """Re-rank every module by SVD truncation (exactly one rule).

    Args:
        adapter: the adapter (not modified).
        rank: fixed rank; modules at or below it are kept.
        energy: keep the smallest rank holding this fraction of ``||dW||_F^2``.
        sv_ratio: keep singular values ``>= S_0 / sv_ratio``.
        sv_cumulative: keep the smallest rank whose singular values sum to this fraction.
        min_rank, max_rank: bounds for the dynamic rules.
        distribute: ``sqrt`` (``sqrt(S)`` in both factors) or ``up`` (``S`` in up, as
            sd-scripts does).
        dry_run: compute the plan only (``result.adapter`` is None).
        base: base checkpoint, for modules of other types whose update reads the base weight
            (a weight decomposition, OFT...); it also gives LoHa convolutions their kernel.
        progress: optional ``progress(done, total)`` callback.

    Returns:
        A :class:`ResizeResult`.

    Raises:
        UsageError: a bad rule.
        UnsupportedAdapterError: a type loratool does not compute; PEFT DoRA modules.
    """
    rule = check_rule(
        rank=rank,
        energy=energy,
        sv_ratio=sv_ratio,
        sv_cumulative=sv_cumulative,
        min_rank=min_rank,
        max_rank=max_rank,
    )
    if distribute not in DISTRIBUTIONS:
        raise UsageError(f"--distribute must be one of {', '.join(DISTRIBUTIONS)}")
    adapter.require_plain_lora("resize", deltas_ok=True)
    adapter.require_known_scale("resize")
    adapter.require_no_dora("resize")

    rows: list[ModuleResize] = []
    modules: dict[str, LoraModule] = {}
    source, notes = adapter, ()
    if adapter.deltas:
        from lora_tools.ops.to_lora import as_lora

        source, converted, notes = as_lora(
            adapter, rule, base=base, distribute=distribute, operation="resize"
        )
        for row in converted:
            m = adapter.deltas[row.key]
            exact = row.exact_rank if row.exact_rank is not None else min(m.update_dims)  # type: ignore[type-var]
            rows.append(
                ModuleResize(
                    row.key,
                    m.kind,
                    int(exact or 0),
                    row.rank,
                    row.retained_energy,
                    row.relative_error,
                    row.frobenius,
                    True,
                )
            )
    total = len(adapter.modules)
    for i, (key, m) in enumerate(adapter.modules.items()):
        row, new = _resize_module(
            m, rule, distribute, dry_run, keep_alpha=adapter.format == "kohya"
        )
        rows.append(row)
        modules[key] = new if new is not None else m
        if progress is not None:
            progress(i + 1, total)
    out = None
    if not dry_run:
        modules = {k: modules.get(k, m) for k, m in source.modules.items()}
        out = dataclasses.replace(source, modules=modules, metadata=dict(source.metadata))
        if out.config is not None:
            out.config = dict(out.config)
        add_history(out, "resize", distribute=distribute, **{k: v for k, v in rule.items()})
    return ResizeResult(
        out,
        tuple(rows),
        rule,
        distribute,
        dry_run,
        adapter,
        notes,
        source_inputs=adapter_inputs(adapter)
        + ((input_ref(base, "base"),) if base is not None else ()),
    )


def _resize_module(
    m: LoraModule, rule: dict[str, Any], distribute: str, dry_run: bool, *, keep_alpha: bool
) -> tuple[ModuleResize, LoraModule | None]:
    """The row for one module, and its replacement (None when kept or for a dry run).

    ``keep_alpha``: write the module with its own alpha (the scale moves into the factors)."""
    scale = m.scale
    # The output keeps the module's scale; a zero scale (alpha 0) has no update to keep, so
    # the factors are written for scale 1 and come out zero.
    target = scale if scale != 0 and math.isfinite(scale) else 1.0
    up, down = m.finite_factors()
    fixed = rule.get("rank")
    if fixed is not None and fixed >= m.rank:
        # Nothing to truncate: only the norm is needed for the summary (r x r work).
        S = singular_values(up, down, scale)
        row = ModuleResize(m.key, m.kind, m.rank, m.rank, 1.0, 0.0, _norm(S), False)
        return row, None
    k = fixed
    lr = low_rank_approx(
        up,
        down,
        scale,
        k,
        target_scale=target,
        distribute=distribute,
        rule=None if fixed is not None else rule,
    )
    changed = lr.k < m.rank
    row = ModuleResize(
        key=m.key,
        kind=m.kind,
        old_rank=m.rank,
        new_rank=lr.k if changed else m.rank,
        retained_energy=lr.retained_energy if changed else 1.0,
        relative_error=lr.relative_error if changed else 0.0,
        frobenius=_norm(lr.S),
        changed=changed,
    )
    if not changed or dry_run:
        return row, None
    k = lr.k
    up, down = lr.up, lr.down
    if m.alpha is None and target == 1.0:
        new_alpha = None  # kohya's missing alpha: scale 1 at any rank
    elif keep_alpha and m.alpha is not None and m.alpha > 0 and math.isfinite(m.alpha):
        new_alpha = m.alpha
        c_up, c_down = split_scalar(target * (math.sqrt(k) if m.rslora else k) / m.alpha)
        up, down = up * c_up, down * c_down
    else:
        new_alpha = target * (math.sqrt(k) if m.rslora else k)
    return row, with_factors(m, up, down, alpha=new_alpha)


def _norm(S: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(S))))


__all__ = ["ModuleResize", "ResizeResult", "check_rule", "resize_adapter", "select_rank"]
