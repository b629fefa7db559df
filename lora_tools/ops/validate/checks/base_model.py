"""Base rules (``LT4xx``, with ``--base``): every module resolves to exactly one base weight
that its update fits (resolution itself lives in :mod:`lora_tools.resolve`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lora_tools.adapter import Adapter
from lora_tools.ops.validate.context import Context
from lora_tools.quant.schemes import FP8_MAX, Scheme, component_scheme

#: The dtypes merge adds into as they are (lora_tools.ops.merge.arithmetic.FLOAT_DTYPES; that
#: module is not imported here: it loads the merge engine).
_MERGED_DTYPES = ("F16", "BF16", "F32", "F64")


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
    schemes = _Schemes(ctx.checkpoint)
    problems = bool(unmatched or res.shape_errors or other.shape_errors)
    # a base in a scheme loratool does not read (GPTQ, bitsandbytes...) has no weight a module
    # can be checked against: say so rather than blame the adapter
    refused = schemes.refused() if problems else None
    packed = f"; the base is quantized as {refused}, whose weights loratool does not read"
    unread_hint = "check the adapter against the unquantized base model"
    for key, where in unmatched:
        ctx.add(
            "LT401",
            f"module {key!r}{where} resolves to no weight of the base {base}"
            + (packed if refused else ": loaders skip it silently"),
            module=key,
            expected="one base weight",
            found="none",
            hint=unread_hint if refused else "is this adapter made for this base model?",
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
        ctx.add(
            "LT403",
            message + (packed if refused else ""),
            module=key,
            hint=unread_hint if refused else "is this the right base model?",
        )
    # full tensors PEFT loads over the base's (modules_to_save, saved layers)
    for key, message in res.full.shape_errors.items():
        ctx.add(
            "LT403",
            message + "; PEFT's load_state_dict refuses it (a size mismatch)",
            module=key,
            hint="is this the right base model?",
        )
    for key, message in res.full.token_errors.items():
        ctx.add("LT403", message, module=key, hint="is this the right base model?")
    for key in res.full.unmatched:
        ctx.add(
            "LT401",
            f"full tensor {key!r} (modules_to_save or a saved layer) names no tensor of the "
            f"base {base}: loaders skip it silently",
            module=key,
            expected="one base tensor of that name",
            found="none",
            hint="is this adapter made for this base model?",
        )
    total = res.total + other.total
    if total and len(unmatched) == total:
        ctx.add(
            "LT404",
            f"0 of {total} modules match this base ({base})"
            + (packed if refused else ": the adapter would load with no effect"),
            expected=f"{total} matching modules",
            found="0",
            hint=unread_hint
            if refused
            else "the adapter was made for another model; check base_model_name_or_path",
        )
    pairs = Counter()
    for match in res.matches.values():
        dtype, info = match.module.up.dtype, match.target.info
        if dtype != info.dtype:
            pairs[(dtype, info.dtype, schemes.of(match.target.component, info.dtype))] += 1
    for (ours, theirs, scheme), count in pairs.items():
        ctx.add(
            "LT405",
            f"{count} modules are {ours} while their base weights are "
            + _merge_note(theirs, scheme),
            expected=scheme.describe() if scheme and scheme.quantized else theirs,
            found=ours,
        )


class _Schemes:
    """The quantization scheme of each component of a base (from its headers, metadata and
    config.json: :func:`lora_tools.quant.component_scheme`), read once, when a rule asks."""

    def __init__(self, checkpoint: Any) -> None:
        self.checkpoint = checkpoint
        self.found: dict[str, Scheme] = {}

    def of(self, component: str, dtype: str) -> Scheme | None:
        """None for a float weight; else the scheme its component's tensors say."""
        return None if dtype in _MERGED_DTYPES else self.component(component)

    def refused(self) -> str | None:
        """The scheme loratool does not read (``GPTQ``, ``bitsandbytes NF4``...) of a component
        of the base, if one has such a scheme."""
        for name in self.checkpoint.components:
            scheme = self.component(name)
            if not scheme.supported:
                return scheme.unsupported
        return None

    def component(self, component: str) -> Scheme:
        if component not in self.found:
            self.found[component] = component_scheme(self.checkpoint.components[component])
        return self.found[component]


def _merge_note(theirs: str, scheme: Scheme | None) -> str:
    """The base weights' dtype (and scheme), and what ``loratool merge`` does with them."""
    if scheme is None:
        return f"{theirs}; merges compute in float32 and round to {theirs}"
    if not scheme.supported:
        return f"{theirs} ({scheme.describe()}); loratool merge refuses this base"
    if not scheme.quantized:  # a weight neither float nor fp8, in no scheme loratool knows
        return f"{theirs}; loratool merge refuses this base"
    if scheme.weight_scale_suffix is None:
        return (
            f"{scheme.describe()}; merges add the update and round to {theirs} (no scale: "
            f"values past ±{FP8_MAX[theirs]:g} saturate; `loratool merge --dtype` writes float weights instead)"
        )
    return (
        f"{scheme.describe()}; merges dequantize each weight with its "
        f"{scheme.weight_scale_suffix!r}, add the update and requantize to {theirs} with a "
        "recomputed scale (`loratool merge --dtype` dequantizes instead)"
    )


def _describe(adapter: Adapter, key: str) -> str:
    if key in adapter.deltas:
        return f" ({adapter.deltas[key].type})"
    m = adapter.modules[key]
    return f" ({m.full_path})" if m.full_path and m.full_path != key else ""
