"""Base rules (``LT4xx``, with ``--base``): every module resolves to exactly one base weight
that its update fits (resolution itself lives in :mod:`lora_tools.resolve`).
"""

from __future__ import annotations

from collections import Counter

from lora_tools.adapter import Adapter
from lora_tools.ops.validate.context import Context


def check_base(ctx: Context, adapter: Adapter) -> None:
    """Resolve every module against ``ctx.checkpoint`` (LT401-LT405).

    The modules of the other types loratool computes (LoHa, LoKr, kohya DoRA...) resolve as
    ``merge`` resolves them (:func:`~lora_tools.resolve.resolve`, fused rows included); the
    types it only detects resolve by name, their update's outer shape checked where the type
    fixes it (:func:`~lora_tools.resolve.resolve_foreign`).
    """
    from lora_tools.resolve import resolve, resolve_foreign

    if not adapter.modules and not adapter.foreign:
        return
    res = resolve(adapter, ctx.checkpoint)
    other = resolve_foreign(adapter, ctx.checkpoint)
    base = str(ctx.checkpoint.path)
    unmatched = [(key, _describe(adapter, key)) for key in res.unmatched]
    unmatched += [(key, f" ({other.kinds[key]})") for key in other.unmatched]
    for key, where in unmatched:
        ctx.add(
            "LT401",
            f"module {key!r}{where} resolves to no weight of the base {base}: loaders "
            "skip it silently",
            module=key,
            expected="one base weight",
            found="none",
            hint="is this adapter made for this base model?",
        )
    for key, candidates in {**res.ambiguous, **other.ambiguous}.items():
        ctx.add(
            "LT402",
            f"module {key!r} matches {len(candidates)} base weights: {', '.join(candidates[:3])}",
            module=key,
            expected="one base weight",
            found=", ".join(candidates),
            hint="use an adapter format with component prefixes (PEFT / diffusers)",
        )
    for key, message in {**res.shape_errors, **other.shape_errors}.items():
        ctx.add("LT403", message, module=key, hint="is this the right base model?")
    total = res.total + other.total
    if total and len(unmatched) == total:
        ctx.add(
            "LT404",
            f"0 of {total} modules match this base ({base}): the adapter would load with no effect",
            expected=f"{total} matching modules",
            found="0",
            hint="the adapter was made for another model; check base_model_name_or_path",
        )
    pairs = Counter()
    for match in res.matches.values():
        dtype = match.module.up.dtype
        if dtype != match.target.info.dtype:
            pairs[(dtype, match.target.info.dtype)] += 1
    for (ours, theirs), count in pairs.items():
        ctx.add(
            "LT405",
            f"{count} modules are {ours} while their base weights are {theirs}; merges "
            f"compute in float32 and round to {theirs}",
            expected=theirs,
            found=ours,
        )


def _describe(adapter: Adapter, key: str) -> str:
    if key in adapter.deltas:
        return f" ({adapter.deltas[key].type})"
    m = adapter.modules[key]
    return f" ({m.full_path})" if m.full_path and m.full_path != key else ""
