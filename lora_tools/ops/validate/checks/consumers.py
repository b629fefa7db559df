"""Consumer rules (``LT59x``): what the programs that load the file do with it, from the
consumer models of :mod:`lora_tools.consumers`.

- LT590: the consumers that load the file do not all apply loratool's scale to a module
  (:func:`lora_tools.consumers.scales.consumer_scales`; header only).
- LT591: with ``--base``, a base layer PEFT saved in the adapter (an embedding) holds other
  values than the base's: PEFT loads the saved one, the servers serve the base's
  (:func:`compare_saved_layers` reads both, block by block of rows).
"""

from __future__ import annotations

from lora_tools.adapter import Adapter
from lora_tools.consumers.scales import CONSUMERS, Disagreement, consumer_scales
from lora_tools.ops.base_copies import CopyDifference, differing_copies, saved_base_layers
from lora_tools.ops.validate.context import Context, fmt_number

#: The rule of each server profile that reports :attr:`Context.copy_differences` (LT591
#: reports them without ``--profile``).
SAVED_LAYER_RULES = {"vllm": "LT508", "sglang": "LT517", "tgi": "LT527", "llamacpp": "LT536"}
#: What a finding about a differing saved layer tells the user to do.
SAVED_LAYER_HINT = (
    "serve the adapter on the base it was saved with, or merge it into this base "
    "(`loratool merge BASE ADAPTER -o OUT`: the merged model is what PEFT computes) and serve "
    "the merged model"
)

#: Modules named in one LT590 finding's message before "and N more".
_NAMED = 3


def check_consumer_scales(
    ctx: Context, adapter: Adapter, consumers: list[str] | None = None
) -> None:
    """LT590: one finding per way the consumers disagree (the same consumers, the same
    scales), naming its modules, the consumers and the scale each applies.

    Not reported on a file with structure or config errors: the scales of a file that a rule
    already calls broken (an alpha of 0, LT106; a config rank that contradicts the tensors,
    LT304...) are those rules' findings.

    Args:
        consumers: the consumers to compare (default: every one modelled).
    """
    if "LT590" not in ctx.rules or not adapter.modules:
        return
    if ctx.has_errors("LT1") or ctx.has_errors("LT3"):
        return
    groups: dict[tuple, list[Disagreement]] = {}
    for d in consumer_scales(adapter, consumers).disagreements():
        shape = (d.intended, d.differ, tuple(sorted(d.scales.items())))
        groups.setdefault(shape, []).append(d)
    for found in groups.values():
        first = found[0]
        names = ", ".join(repr(d.module) for d in found[:_NAMED])
        more = f" and {len(found) - _NAMED} more" if len(found) > _NAMED else ""
        noun = "module" if len(found) == 1 else "modules"
        intended = "unknown" if first.intended is None else fmt_number(first.intended)
        agree = [CONSUMERS[n].title for n in first.scales if n not in first.differ]
        ctx.add(
            "LT590",
            f"{noun} {names}{more}: {_applied(first)} where loratool's scale is {intended}"
            + (
                f" ({_join(agree)} {'applies' if len(agree) == 1 else 'apply'} it)" if agree else ""
            ),
            module=first.module,
            expected=intended,
            found="; ".join(f"{n} {fmt_number(first.scales[n])}" for n in first.differ),
            hint="`loratool inspect FILE --consumers` shows each consumer's scale for every "
            "module and why; serve the adapter where its scale is applied",
        )


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _applied(d: Disagreement) -> str:
    """``vLLM, SGLang and TGI apply 2; llama.cpp applies 4``: the differing consumers by scale."""
    by_scale: dict[float, list[str]] = {}
    for name in d.differ:
        by_scale.setdefault(d.scales[name], []).append(CONSUMERS[name].title)
    return "; ".join(
        f"{_join(titles)} {'applies' if len(titles) == 1 else 'apply'} {fmt_number(scale)}"
        for scale, titles in by_scale.items()
    )


def compare_saved_layers(ctx: Context, adapter: Adapter) -> None:
    """Fill :attr:`Context.copy_differences` from ``--base``, when a rule reports them and the
    adapter holds saved base layers (reads both tensors, block by block of rows)."""
    if ctx.checkpoint is None:
        return
    if ctx.deployment is None:
        wanted = {"LT591"}
    else:
        names = [profile.consumer.name for profile in ctx.deployment.profiles]
        wanted = {SAVED_LAYER_RULES[n] for n in names if n in SAVED_LAYER_RULES}
    if not wanted & ctx.rules:
        return
    if saved_base_layers(adapter):
        ctx.copy_differences = differing_copies(
            adapter, ctx.checkpoint, chunk_bytes=ctx.chunk_bytes
        )


def check_saved_layers(ctx: Context) -> None:
    """LT591: one finding per saved base layer that differs from the base's (without
    ``--profile``; each server profile reports its own, as an error)."""
    for d in ctx.copy_differences:
        ctx.add(
            "LT591",
            f"tensor {d.key!r} is a saved copy of the base's {d.base_key!r} and differs from "
            f"this base's ({d.describe()}): PEFT loads the saved copy over the base's, vLLM, "
            "SGLang, TGI and llama.cpp skip it and serve the base's, so they compute another "
            "model on this base",
            module=d.key,
            expected=f"{d.base_key} of {d.base_file}",
            found=d.describe(),
            hint=SAVED_LAYER_HINT,
        )


def saved_layer_finding(ctx: Context, code: str, who: str, d: CopyDifference) -> None:
    """One server profile's finding (``code``) for a saved base layer it skips."""
    ctx.add(
        code,
        f"{who} skips tensor {d.key!r}, the adapter's saved copy of {d.base_key!r}, and serves "
        f"this base's, which differs ({d.describe()}); PEFT loads the saved copy over it: "
        "wrong output on this base",
        module=d.key,
        expected=f"{d.base_key} of {d.base_file}",
        found=d.describe(),
        hint=SAVED_LAYER_HINT,
    )
