"""``LT5xx``: the rules a deployment target applies when it loads an adapter (``--profile``).

One function per consumer turns the facts of :mod:`lora_tools.consumers` into findings: the
consumer refuses the adapter, or loads it and serves something else than PEFT would (a module
left out, a scale not applied). Both are errors. Each rule family is ``LT5`` + the consumer's
digit: ``LT50x`` vLLM, ``LT51x`` SGLang, ``LT52x`` TGI, ``LT53x`` llama.cpp, ``LT54x``
diffusers, ``LT55x`` ComfyUI, ``LT56x`` PEFT.

Everything is decided from the header, the config and the folder's file names, but for the
saved base layers (LT508, LT517, LT527, LT536): those compare the adapter's copy of a base
embedding with ``--base``'s, as :func:`lora_tools.ops.validate.checks.consumers.
compare_saved_layers` read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_tools.adapter import EMBEDDING, Adapter, LoraModule
from lora_tools.consumers import Profile, fmt_version
from lora_tools.consumers import comfyui as comfyui_facts
from lora_tools.consumers import diffusers as diffusers_facts
from lora_tools.consumers import llamacpp as llamacpp_facts
from lora_tools.consumers import peft as peft_facts
from lora_tools.consumers import sglang as sglang_facts
from lora_tools.consumers import tgi as tgi_facts
from lora_tools.consumers import vllm as vllm_facts
from lora_tools.errors import UsageError
from lora_tools.ops.base_copies import BASE_LAYER_SUFFIX, EMBEDDING_BASE_SUFFIXES
from lora_tools.ops.validate.checks.consumers import saved_layer_finding
from lora_tools.ops.validate.context import Context, fmt_number

#: Modules a finding lists by name before it says "and N more".
SHOWN_MODULES = 4


@dataclass(frozen=True)
class Deployment:
    """What ``--profile`` asks: the consumers, and the server settings they are checked with.

    Attributes:
        profiles: consumers at their versions.
        max_lora_rank: the server's ``--max-lora-rank``, or None for the consumer's default.
        target_modules: the server's ``--lora-target-modules``, or None (no restriction).
    """

    profiles: tuple[Profile, ...]
    max_lora_rank: int | None = None
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise UsageError(f"--max-lora-rank {self.max_lora_rank}: expected a positive integer")
        for profile in self.profiles:
            name = profile.consumer.name
            if name == "vllm" and self.max_lora_rank is not None:
                allowed = vllm_facts.max_lora_ranks(profile.version)
                if self.max_lora_rank not in allowed:
                    raise UsageError(
                        f"--max-lora-rank {self.max_lora_rank}: {profile.label} accepts only "
                        f"{', '.join(map(str, allowed))}",
                        hint="pass one of those values",
                    )
            if (
                name == "vllm"
                and self.target_modules is not None
                and not profile.since(vllm_facts.TARGET_MODULES_SINCE)
            ):
                raise UsageError(
                    f"--target-modules: {profile.label} has no server list of target modules "
                    "(`vllm serve --lora-target-modules` appeared in vLLM "
                    f"{fmt_version(vllm_facts.TARGET_MODULES_SINCE)})",
                    hint="leave out --target-modules, or name a later version",
                )

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(profile.consumer.family for profile in self.profiles)


def check_profiles(ctx: Context, adapter: Adapter, deployment: Deployment) -> None:
    """Every enabled ``LT5xx`` rule of every profile, on an adapter that was read."""
    for profile in deployment.profiles:
        check = _CHECKS.get(profile.consumer.name)
        if check is not None and ctx.runs(profile.consumer.family):
            check(ctx, adapter, profile, deployment)


# -- helpers -------------------------------------------------------------------------------------


def tensor_names(adapter: Adapter) -> list[str]:
    """Every tensor key of the file the adapter was read from, modules first."""
    names = [key for m in adapter.modules.values() for key in m.keys.values()]
    return names + list(adapter.passthrough)


def listed(names: list[str]) -> str:
    """``a, b, c, d and 3 more``."""
    shown = ", ".join(names[:SHOWN_MODULES])
    rest = len(names) - SHOWN_MODULES
    return f"{shown} and {rest} more" if rest > 0 else shown


def module_name(m: LoraModule) -> str:
    return m.full_path or m.key


def base_vocab_size(ctx: Context) -> int | None:
    """Rows of the ``--base`` checkpoint's input embedding (``*embed_tokens.weight``), or its
    config's ``vocab_size``; None without a base."""
    if ctx.checkpoint is None:
        return None
    for component in ctx.checkpoint.components.values():
        for key in component:
            if key.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")):
                shape = component.info(key).shape
                if len(shape) == 2:
                    return int(shape[0])
        vocab = (component.config or {}).get("vocab_size")
        if isinstance(vocab, int):
            return vocab
    return None


def skipped_copies(ctx: Context, code: str, who: str, suffixes: tuple[str, ...]) -> None:
    """``code`` for each saved base layer the consumer skips (keys ending in ``suffixes``)
    whose ``--base`` tensor differs (:attr:`Context.copy_differences`)."""
    for d in ctx.copy_differences:
        if d.key.endswith(suffixes):
            saved_layer_finding(ctx, code, who, d)


def peft_folder_problem(ctx: Context, adapter: Adapter, weights_names: tuple[str, ...]) -> str:
    """Why the target is not a PEFT folder a server loads ("" when it is)."""
    if adapter.format != "peft":
        return f"the file is in {adapter.format} format, not a PEFT folder"
    if ctx.target.config is None:
        return "there is no adapter_config.json beside the weights"
    weights = ctx.target.weights
    if weights is not None and weights_names and weights.name not in weights_names:
        return f"the weights file is named {weights.name}, not {' or '.join(weights_names)}"
    return ""


def base_changing_init(config: dict[str, Any]) -> str | None:
    """The config's ``init_lora_weights`` when it is one that changes the base weights as PEFT
    loads the adapter (PiSSA, OLoRA, CorDA, LoftQ...), else None. The inits that set only the
    initial factors are those vLLM 0.32+ lists as supported."""
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in vllm_facts.SUPPORTED_INITS:
        return init
    return None


def init_finding(ctx: Context, code: str, who: str, init: str) -> None:
    ctx.add(
        code,
        f"{who} does not read init_lora_weights {init!r}: PEFT changes the base weights for this "
        "init when it loads the adapter, the server applies the adapter to the unchanged ones "
        "(wrong output)",
        path=ctx.target.config_display,
        hint="save the adapter with PEFT's path_initial_model_for_weight_conversion (a plain "
        "LoRA of the original base)",
    )


def global_scale(config: dict[str, Any], *, rslora: bool) -> float | None:
    """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) from the config, or None if unusable."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    return float(alpha) / (math.sqrt(r) if rslora else float(r))


def scale_misapplied(adapter: Adapter, served: float) -> list[tuple[LoraModule, float]]:
    """The modules whose scale (as PEFT applies it) differs from ``served``."""
    out = []
    for m in adapter.modules.values():
        if m.alpha_unknown is not None:
            continue
        if not math.isclose(m.scale, served, rel_tol=1e-6, abs_tol=0.0):
            out.append((m, m.scale))
    return out


# -- vLLM (LT50x) --------------------------------------------------------------------------------


def _vllm(ctx: Context, adapter: Adapter, profile: Profile, deployment: Deployment) -> None:
    facts = vllm_facts
    who = profile.label
    problem = peft_folder_problem(ctx, adapter, facts.WEIGHTS_NAMES)
    if problem:
        ctx.add(
            "LT501",
            f"{who} loads PEFT folders only (adapter_config.json + adapter_model.safetensors): "
            f"{problem}",
            hint="convert it with `loratool convert ADAPTER --to peft -o OUT`",
        )
        return
    config = adapter.config or {}
    for feature in _vllm_refused(config, profile):
        ctx.add(
            "LT502",
            f"{who}: {feature}"
            if "not read" in feature
            else f"{who} refuses the adapter: {feature}",
            path=ctx.target.config_display,
            hint="retrain or convert the adapter without it",
        )
    _vllm_rank(ctx, adapter, config, profile, deployment)
    # what LT502 already names (modules_to_save, DoRA magnitudes, LoRA biases) is left out
    named = set(_vllm_named_by_lt502(adapter, config, profile))
    refused = [
        n
        for n in tensor_names(adapter)
        if n not in named and not facts.tensor_accepted(n, profile.version)
    ]
    if refused:
        ctx.add(
            "LT504",
            f"{who} refuses {len(refused)} tensor(s) it cannot parse as LoRA weights "
            f'("is unsupported LoRA weight"): {listed(refused)}',
            module=refused[0],
            hint="remove them, or merge what they hold into the base model",
        )
    if deployment.target_modules is not None:
        outside = [
            module_name(m)
            for m in adapter.modules.values()
            if not facts.served_by(m.target_name.split(".")[-1], deployment.target_modules)
        ]
        if outside:
            ctx.add(
                "LT505",
                f"{who} with --target-modules {','.join(deployment.target_modules)} "
                f"loads {len(outside)} of {len(adapter.modules)} module(s) and never applies "
                f"them (the base model is served there): {listed(outside)}",
                module=outside[0],
                hint="add their layer names to the server's "
                "`vllm serve --lora-target-modules` (and to --target-modules here)",
            )
    if not profile.since(facts.PATTERNS_SINCE):
        served = global_scale(config, rslora=bool(config.get("use_rslora")))
        wrong = [] if served is None else scale_misapplied(adapter, served)
        if wrong:
            m, scale = wrong[0]
            ctx.add(
                "LT506",
                f"{who} scales every module by lora_alpha / r = {fmt_number(served)} and "
                f"ignores rank_pattern / alpha_pattern: {len(wrong)} module(s) are served at "
                f"the wrong strength, e.g. {module_name(m)} (PEFT scale {fmt_number(scale)})",
                module=module_name(m),
                expected=fmt_number(scale),
                found=fmt_number(served),
                hint="bake the scales into the factors (`loratool convert ADAPTER --for vllm`), "
                f"or serve with vLLM {fmt_version(facts.PATTERNS_SINCE)} or later",
            )
    vocab = base_vocab_size(ctx)
    if vocab is not None and profile.since(facts.VOCAB_CHECK_SINCE):
        for m in adapter.modules.values():
            if m.kind == EMBEDDING and m.in_features != vocab:
                ctx.add(
                    "LT507",
                    f"{who} refuses the embedding LoRA {module_name(m)}: lora_embedding_A "
                    f"covers {m.in_features} tokens, the base vocabulary has {vocab}",
                    module=module_name(m),
                    expected=vocab,
                    found=m.in_features,
                    hint="train the embedding LoRA on the base model it is served with",
                )
    if profile.since(facts.SKIPPED_SINCE):  # before, LT504 refuses the saved embeddings
        skipped_copies(ctx, "LT508", who, EMBEDDING_BASE_SUFFIXES)


def _vllm_refused(config: dict[str, Any], profile: Profile) -> list[str]:
    facts = vllm_facts
    out = []
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    if profile.since(facts.CLASSIFIER_SINCE):
        saved = [name for name in saved if name not in facts.CLASSIFIER_MODULES]
    if saved:
        out.append(f"modules_to_save {saved} (full layers; vLLM serves LoRA factors only)")
    if config.get("use_dora"):
        out.append("use_dora (DoRA is not supported)")
    if config.get("bias", "none") != "none":
        out.append(f'bias {config.get("bias")!r} (only "none" is supported)')
    lora_bias = config.get("lora_bias")
    if lora_bias and profile.since(facts.PATTERNS_SINCE):
        out.append("lora_bias (LoRA biases are not supported)")
    elif lora_bias and not profile.since(facts.VOCAB_CHECK_SINCE):
        out.append(
            "lora_bias (LoRA biases are refused unless the server runs "
            "`vllm serve --enable-lora-bias`)"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in facts.SUPPORTED_INITS:
        if profile.since(facts.PATTERNS_SINCE):
            out.append(
                f"init_lora_weights {init!r} (this init changes the base weights; convert it "
                "with PEFT's path_initial_model_for_weight_conversion)"
            )
        else:
            out.append(
                f"init_lora_weights {init!r} is not read: PEFT changes the base weights for "
                "this init, vLLM serves the adapter on the unchanged ones (wrong output); "
                "convert it with PEFT's path_initial_model_for_weight_conversion"
            )
    if profile.since(facts.PATTERNS_SINCE):
        for key, what in (
            ("alora_invocation_tokens", "aLoRA"),
            ("layer_replication", "layer_replication"),
            ("use_bdlora", "block-diagonal LoRA"),
            ("use_qalora", "QALoRA"),
        ):
            if config.get(key):
                out.append(f"{key} ({what} is not supported)")
    return out


def _vllm_named_by_lt502(adapter: Adapter, config: dict[str, Any], profile: Profile) -> list[str]:
    """Tensors of the features :func:`_vllm_refused` reports, so that LT504 does not again."""
    saved = [n for n in config.get("modules_to_save") or [] if isinstance(n, str)]
    out = [n for n in adapter.passthrough if any(f".{s}." in f".{n}" for s in saved)]
    for m in adapter.modules.values():
        if m.magnitude is not None and config.get("use_dora"):
            out.append(m.keys["magnitude"])
        if (
            m.bias is not None
            and config.get("lora_bias")
            and not (vllm_facts.VOCAB_CHECK_SINCE <= profile.version < vllm_facts.PATTERNS_SINCE)
        ):
            out.append(m.keys["bias"])
    return out


def _vllm_rank(
    ctx: Context, adapter: Adapter, config: dict[str, Any], profile: Profile, dep: Deployment
) -> None:
    limit = dep.max_lora_rank or vllm_facts.DEFAULT_MAX_LORA_RANK
    ranks = [config.get("r")]
    if profile.since(vllm_facts.PATTERNS_SINCE):
        ranks += list((config.get("rank_pattern") or {}).values())
    ranks += [m.rank for m in adapter.modules.values()]
    ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    if not ranks or max(ranks) <= limit:
        return
    rank = max(ranks)
    fits = [r for r in vllm_facts.max_lora_ranks(profile.version) if r >= rank]
    hint = (
        f"serve with --max-lora-rank {fits[0]}, or resize the adapter "
        f"(`loratool resize ADAPTER --rank {limit} -o OUT`)"
        if fits
        else f"resize the adapter (`loratool resize ADAPTER --rank {limit} -o OUT`)"
    )
    source = "--max-lora-rank" if dep.max_lora_rank else "the default --max-lora-rank"
    ctx.add(
        "LT503",
        f"{profile.label} refuses rank {rank} above {source} {limit}",
        expected=f"<= {limit}",
        found=rank,
        hint=hint,
    )


# -- SGLang (LT51x) ------------------------------------------------------------------------------


def _sglang(ctx: Context, adapter: Adapter, profile: Profile, deployment: Deployment) -> None:
    facts = sglang_facts
    who = profile.label
    if adapter.format != "peft" or ctx.target.config is None:
        problem = peft_folder_problem(ctx, adapter, ())
        ctx.add(
            "LT511",
            f"{who} loads PEFT folders only (adapter_config.json + weights): {problem}",
            hint="convert it with `loratool convert ADAPTER --to peft -o OUT`",
        )
        return
    config = adapter.config or {}
    refused = []
    if config.get("use_dora"):
        refused.append("use_dora (DoRA adapters are not supported)")
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets not in facts.TARGET_STRINGS:
        refused.append(
            f"target_modules {targets!r} (a regular expression; SGLang needs a list of "
            "module names, or 'all' / 'all-linear')"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in vllm_facts.SUPPORTED_INITS:
        refused.append(
            f"init_lora_weights {init!r} is not read: PEFT changes the base weights for this "
            "init, SGLang serves the adapter on the unchanged ones (wrong output)"
        )
    added = _added_tokens(ctx, base_vocab_size(ctx))
    if added:
        refused.append(f"added_tokens.json adds {added} token(s) to the vocabulary")
    for feature in refused:
        text = (
            f"{who}: {feature}"
            if "not read" in feature
            else f"{who} refuses the adapter: {feature}"
        )
        ctx.add("LT512", text, path=ctx.target.config_display)
    r = config.get("r")
    if deployment.max_lora_rank is not None and isinstance(r, int) and r > deployment.max_lora_rank:
        ctx.add(
            "LT513",
            f"{who} refuses rank {r} above --max-lora-rank {deployment.max_lora_rank}",
            expected=f"<= {deployment.max_lora_rank}",
            found=r,
            hint=f"serve with --max-lora-rank {r} or more, or resize the adapter",
        )
    if deployment.target_modules is not None and "all" not in deployment.target_modules:
        served = facts.normalize(deployment.target_modules)
        names = (
            targets
            if isinstance(targets, list)
            else [m.target_name for m in adapter.modules.values()]
        )
        outside = sorted(facts.normalize([n for n in names if isinstance(n, str)]) - served)
        if outside:
            ctx.add(
                "LT514",
                f"{who} refuses the adapter: its target modules {outside} are not in "
                f"--target-modules {sorted(served)}",
                found=", ".join(outside),
                hint="add them to the server's "
                "`python -m sglang.launch_server --lora-target-modules` (or pass 'all')",
            )
    served_scale = global_scale(config, rslora=False)
    wrong = [] if served_scale is None else scale_misapplied(adapter, served_scale)
    if wrong:
        m, scale = wrong[0]
        why = [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
        if config.get("use_rslora"):
            why.append("use_rslora")
        ctx.add(
            "LT515",
            f"{who} scales every module by lora_alpha / r = {fmt_number(served_scale)} and "
            f"never reads {' / '.join(why) or 'per-module scales'}: {len(wrong)} module(s) are "
            f"served at the wrong strength, e.g. {module_name(m)} (PEFT scale "
            f"{fmt_number(scale)})",
            module=module_name(m),
            expected=fmt_number(scale),
            found=fmt_number(served_scale),
            hint="bake the scales into the factors (`loratool convert ADAPTER --for sglang`)",
        )
    # DoRA magnitudes with use_dora are LT512's finding already
    dropped_roles = ("bias",) if config.get("use_dora") else ("bias", "magnitude")
    dropped = [
        key
        for m in adapter.modules.values()
        for role, key in m.keys.items()
        if role in dropped_roles
    ] + [n for n in adapter.passthrough if not n.endswith(EMBEDDING_BASE_SUFFIXES)]
    if dropped:
        ctx.add(
            "LT516",
            f"{who} loads only lora_A / lora_B of the target modules and drops "
            f"{len(dropped)} tensor(s) without a word: {listed(dropped)}",
            module=dropped[0],
            hint="merge what they hold into the base model, or serve with PEFT",
        )
    skipped_copies(ctx, "LT517", who, EMBEDDING_BASE_SUFFIXES)


def _added_tokens(ctx: Context, vocab: int | None) -> int:
    """Tokens ``added_tokens.json`` beside the adapter adds past ``vocab`` (all, without it)."""
    import json

    folder = ctx.target.config.parent if ctx.target.config is not None else None
    if folder is None or not (folder / "added_tokens.json").is_file():
        return 0
    try:
        tokens = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    if not isinstance(tokens, dict):
        return 0
    ids = [v for v in tokens.values() if isinstance(v, int)]
    return sum(1 for v in ids if vocab is None or v >= vocab)


# -- TGI (LT52x) ---------------------------------------------------------------------------------


def _tgi(ctx: Context, adapter: Adapter, profile: Profile, deployment: Deployment) -> None:
    who = profile.label
    weights = ctx.target.weights
    problem = peft_folder_problem(ctx, adapter, ())
    if not problem and weights is not None and weights.suffix != ".safetensors":
        problem = f"the weights are {weights.name}; TGI reads *.safetensors files only"
    if problem:
        ctx.add(
            "LT521",
            f"{who} loads PEFT folders with safetensors weights only: {problem}",
            hint="convert it with `loratool convert ADAPTER --to peft -o OUT`",
        )
        return
    config = adapter.config or {}
    loaded: dict[str, list[tuple[int, LoraModule]]] = {}
    unused: list[str] = []
    for m in adapter.modules.values():
        where = tgi_facts.layer_of(m.path or "")
        if where is None:
            unused += list(m.keys.values())
            continue
        loaded.setdefault(where[1], []).append((where[0], m))
        unused += [key for role, key in m.keys.items() if role not in ("down", "up")]
    unused += [n for n in adapter.passthrough if not n.endswith(EMBEDDING_BASE_SUFFIXES)]
    if unused:
        what = " (DoRA is served as a plain LoRA)" if config.get("use_dora") else ""
        ctx.add(
            "LT522",
            f"{who} loads only lora_A / lora_B of the decoder layers' projections and logs "
            f"{len(unused)} tensor(s) as unused adapter weights{what}: {listed(unused)}",
            module=unused[0],
            hint="merge what they hold into the base model, or serve with PEFT",
        )
    layers = _base_layers(ctx)
    seen = {i for entries in loaded.values() for i, _ in entries}
    count = layers if layers is not None else (max(seen) + 1 if seen else 0)
    for layer_type, entries in sorted(loaded.items()):
        present = {i for i, _ in entries}
        missing = sorted(set(range(count)) - present)
        if missing:
            ctx.add(
                "LT524",
                f"{who} drops {layer_type} on every layer: the adapter has no {layer_type} "
                f"LoRA on decoder layer(s) {listed([str(i) for i in missing])} of {count}, "
                f"and TGI loads a layer type only when every layer has it",
                module=layer_type,
                hint="train the layer type on every decoder layer, or serve with vLLM / PEFT",
            )
        ranks = sorted({m.rank for _, m in entries})
        if len(ranks) > 1:
            ctx.add(
                "LT525",
                f"{who} refuses {layer_type}: its LoRAs have ranks {ranks} and TGI stacks one "
                "layer type into one tensor",
                module=layer_type,
                found=", ".join(map(str, ranks)),
                hint="resize every module to one rank (`loratool resize ADAPTER --rank N`)",
            )
    init = base_changing_init(config)
    if init is not None:
        init_finding(ctx, "LT526", who, init)
    served = global_scale(config, rslora=bool(config.get("use_rslora")))
    modules = [m for entries in loaded.values() for _, m in entries]
    wrong = [] if served is None else scale_misapplied(adapter, served)
    wrong = [(m, sc) for m, sc in wrong if m in modules]
    if wrong:
        m, scale = wrong[0]
        ctx.add(
            "LT523",
            f"{who} scales every module by lora_alpha / r = {fmt_number(served)} and never "
            f"reads rank_pattern / alpha_pattern: {len(wrong)} module(s) are served at the "
            f"wrong strength, e.g. {module_name(m)} (PEFT scale {fmt_number(scale)})",
            module=module_name(m),
            expected=fmt_number(scale),
            found=fmt_number(served),
            hint="bake the scales into the factors (`loratool convert ADAPTER --for vllm`)",
        )
    skipped_copies(ctx, "LT527", who, EMBEDDING_BASE_SUFFIXES)


def _base_layers(ctx: Context) -> int | None:
    """``num_hidden_layers`` of the ``--base`` config, or None."""
    if ctx.checkpoint is None:
        return None
    for component in ctx.checkpoint.components.values():
        layers = (component.config or {}).get("num_hidden_layers")
        if isinstance(layers, int) and not isinstance(layers, bool):
            return layers
    return None


# -- llama.cpp (LT53x) ---------------------------------------------------------------------------


def _llamacpp(ctx: Context, adapter: Adapter, profile: Profile, deployment: Deployment) -> None:
    facts = llamacpp_facts
    who = profile.label
    problem = peft_folder_problem(ctx, adapter, facts.WEIGHTS_NAMES)
    if problem:
        ctx.add(
            "LT531",
            f"{who}'s convert_lora_to_gguf.py reads PEFT folders only (adapter_config.json + "
            f"adapter_model.safetensors): {problem}",
            hint="convert it with `loratool convert ADAPTER --to peft -o OUT`",
        )
        return
    config = adapter.config or {}
    refused = [n for n in tensor_names(adapter) if not facts.tensor_converted(n)]
    if refused:
        ctx.add(
            "LT532",
            f"{who}'s convert_lora_to_gguf.py stops at {len(refused)} tensor(s) that are not "
            f'lora_A / lora_B ("Not a lora_A or lora_B tensor"): {listed(refused)}',
            module=refused[0],
            hint="merge DoRA, biases and modules_to_save into the base model first "
            "(`loratool merge`), or retrain without them",
        )
    init = base_changing_init(config)
    if init is not None:
        init_finding(ctx, "LT535", who, init)
    alpha = config.get("lora_alpha")
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        wrong = []
        for m in adapter.modules.values():
            if m.alpha_unknown is None and m.rank > 0:
                served = facts.served_scale(float(alpha), m.rank)
                if not math.isclose(m.scale, served, rel_tol=1e-6):
                    wrong.append((m, served))
        if wrong:
            m, served = wrong[0]
            why = [k for k in ("alpha_pattern",) if config.get(k)]
            if config.get("use_rslora"):
                why.append("use_rslora")
            ctx.add(
                "LT533",
                f"{who} stores one lora_alpha ({fmt_number(float(alpha))}) and scales each "
                f"module by alpha / its rank, ignoring {' / '.join(why) or 'per-module alphas'}:"
                f" {len(wrong)} module(s) are served at the wrong strength, e.g. "
                f"{module_name(m)} (PEFT scale {fmt_number(m.scale)}, llama.cpp "
                f"{fmt_number(served)})",
                module=module_name(m),
                expected=fmt_number(m.scale),
                found=fmt_number(served),
                hint="bake the scales into the factors (`loratool convert ADAPTER --for llamacpp`)",
            )
    if _tied_embeddings(ctx):
        heads = [module_name(m) for m in adapter.modules.values() if m.target_name == "lm_head"]
        if heads:
            ctx.add(
                "LT534",
                f'{who} refuses a LoRA on lm_head of a base with tied embeddings ("lm_head is '
                f'present in adapter, but is ignored in base model"): {listed(heads)}',
                module=heads[0],
                hint="retrain without lm_head in target_modules",
            )
    # the converter skips every saved base layer (its other tensors are LT532's)
    skipped_copies(ctx, "LT536", who, (BASE_LAYER_SUFFIX,))


def _tied_embeddings(ctx: Context) -> bool:
    """Whether the ``--base`` config ties lm_head to the input embedding."""
    if ctx.checkpoint is None:
        return False
    return any(
        (component.config or {}).get("tie_word_embeddings") is True
        for component in ctx.checkpoint.components.values()
    )


# -- diffusers (LT54x) ---------------------------------------------------------------------------


def file_tensor_names(adapter: Adapter) -> list[str]:
    """Every tensor key of the file, LyCORIS modules' included."""
    names = [key for d in adapter.deltas.values() for key in d.keys.values()]
    return tensor_names(adapter) + names


def scale_findings(
    ctx: Context,
    code: str,
    who: str,
    adapter: Adapter,
    consumer: str,
    hint: str,
    left_out: frozenset[str] = frozenset(),
    version_scales: dict[str, float] | None = None,
    version_rule: str = "",
) -> None:
    """One finding for the modules ``consumer`` (:mod:`lora_tools.consumers.scales`) applies
    at another scale than loratool's (the trainer's); modules in ``left_out`` (keys), which
    another finding says the consumer never applies, are not counted. ``version_scales``
    replaces the current version's scale of the modules it names (an older version's rule,
    ``version_rule``)."""
    from lora_tools.consumers.scales import consumer_scales, same_scale

    (scales,) = consumer_scales(adapter, [consumer]).consumers
    if not scales.loads:
        return
    rule = scales.rule
    applied = dict(scales.scales)
    if version_scales:
        applied.update(version_scales)
        rule = version_rule
    wrong = []
    for m in adapter.modules.values():
        if m.key in left_out:
            continue
        served = applied.get(m.key)
        if m.alpha_unknown is None and served is not None and not same_scale(served, m.scale):
            wrong.append((m, served))
    if wrong:
        m, served = wrong[0]
        ctx.add(
            code,
            f"{who} applies {len(wrong)} module(s) at another scale than the file's alpha / r, "
            f"e.g. {module_name(m)} at {fmt_number(served)} instead of {fmt_number(m.scale)}; "
            f"its rule here: {rule}",
            module=module_name(m),
            expected=fmt_number(m.scale),
            found=fmt_number(served),
            hint=hint,
        )


def _diffusers(ctx: Context, adapter: Adapter, profile: Profile, deployment: Deployment) -> None:
    from lora_tools.consumers.scales import consumer_scales

    facts = diffusers_facts
    who = profile.label
    if adapter.format == "xlabs":
        return  # FluxLoraLoaderMixin converts XLabs files (_convert_xlabs_flux_lora_to_diffusers)
    (scales,) = consumer_scales(adapter, ["diffusers"]).consumers
    if not scales.loads:
        ctx.add(
            "LT541",
            f"{who}'s load_lora_weights loads nothing from a {adapter.format} file, with only a "
            "warning: no key is under a pipeline component's prefix (unet., text_encoder., "
            "transformer.) or in a naming it converts (kohya, old diffusers, ComfyUI)",
            hint="convert it with `loratool convert ADAPTER --to diffusers -o OUT`",
        )
        return
    names = file_tensor_names(adapter)
    kohya_sd = adapter.format == "kohya" and any(
        n.startswith(facts.KOHYA_SD_PREFIXES) for n in names
    )
    if kohya_sd and not any(n.startswith(facts.FLUX_KOHYA_PREFIXES) for n in names):
        outside = facts.kohya_sd_unprefixed(names)
        if outside:
            ctx.add(
                "LT544",
                f"{who} converts a kohya file only when every key starts with lora_unet_ / "
                f"lora_te_ / lora_te1_ / lora_te2_; {len(outside)} key(s) do not "
                f"({listed(outside)}), so no key is converted and nothing loads",
                module=outside[0],
                hint="remove those tensors, or convert the file with "
                "`loratool convert ADAPTER --to diffusers --base BASE -o OUT`",
            )
            return
        left = facts.kohya_sd_left(names)
        if left:
            ctx.add(
                "LT542",
                f"{who}'s kohya converter takes lora_down / lora_up / alpha only and refuses "
                f'the file ("The following keys have not been correctly renamed"): '
                f"{len(left)} tensor(s) such as {listed(left)}",
                module=left[0],
                hint="merge the adapter into the base (`loratool merge`), or load it with ComfyUI",
            )
            return
        for prefix, (dropped, refused) in facts.kohya_te_attention_dropped(
            list(adapter.modules)
        ).items():
            what = (
                'refuses the file ("Could not automatically infer state dict type")'
                if refused
                else "leaves them as unexpected keys (not loaded; transformers' load report "
                "lists them)"
            )
            ctx.add(
                "LT547",
                f"{who} renames a kohya text encoder's q/k/v modules only when the same text "
                f"encoder ({prefix}) has a self_attn_out_proj module; it has none, so diffusers "
                f"{what}: {len(dropped)} module(s) such as {listed(dropped)}",
                module=dropped[0],
                hint="convert the file to diffusers names (`loratool convert ADAPTER --to "
                "diffusers --base BASE -o OUT`), or load it with ComfyUI",
            )
    if adapter.format == "kohya" and any(n.startswith(facts.FLUX_KOHYA_PREFIXES) for n in names):
        dropped, refused = facts.kohya_flux_dropped(names)
        if refused:
            ctx.add(
                "LT542",
                f"{who}'s Flux kohya converter takes no full diff tensors and refuses the file "
                f'("Incompatible keys detected"): {len(refused)} tensor(s) such as '
                f"{listed(refused)}",
                module=refused[0],
                hint="merge the adapter into the base (`loratool merge`), or load it with ComfyUI",
            )
            return
        if dropped:
            ctx.add(
                "LT546",
                f"{who}'s Flux kohya converter filters out {len(dropped)} diff tensor(s) with an "
                f"info log only (a bias or norm change the file holds is not applied): "
                f"{listed(dropped)}",
                module=dropped[0],
                hint="merge the adapter into the base (`loratool merge`), or load it with ComfyUI",
            )
    dora = [n for n in names if n.endswith(facts.DORA_SUFFIX)]
    if dora:
        ctx.add(
            "LT543",
            f"{who} filters out the {len(dora)} dora_scale tensor(s) of this kohya DoRA file "
            f"with only a warning and applies the modules as plain LoRAs: {listed(dora)}",
            module=dora[0],
            hint="merge the adapter into the base (`loratool merge`), or load it with ComfyUI",
        )
    legacy: dict[str, float] = {}
    if adapter.format == "diffusers" and not profile.since(facts.MIRRORED_ALPHAS_SINCE):
        from lora_tools.formats.peft import diffusers_component_configs

        configs = diffusers_component_configs(adapter.metadata)
        components: dict[str, list[LoraModule]] = {}
        for m in adapter.modules.values():
            if m.component not in configs:
                components.setdefault(m.component or "", []).append(m)
        for members in components.values():
            legacy.update(facts.first_rank_scales(members))
    scale_findings(
        ctx,
        "LT545",
        who,
        adapter,
        "diffusers",
        "give every module its own alpha tensor, or convert the file to diffusers names "
        "(`loratool convert ADAPTER --to diffusers --base BASE -o OUT`)",
        version_scales=legacy,
        version_rule="no lora_adapter_metadata: lora_alpha is the rank of the component's "
        "first lora_B key and no alpha_pattern is written (before diffusers "
        f"{fmt_version(facts.MIRRORED_ALPHAS_SINCE)})",
    )


# -- ComfyUI (LT55x) -----------------------------------------------------------------------------


def _comfyui(ctx: Context, adapter: Adapter, profile: Profile, deployment: Deployment) -> None:
    facts = comfyui_facts
    who = profile.label
    if adapter.format == "mlx":
        ctx.add(
            "LT551",
            f"{who} does not load this mlx file: load_lora maps no key of MLX's naming and no "
            'language model\'s module; every key is logged as "lora key not loaded" and dropped',
            hint="for a diffusion model, convert it with `loratool convert ADAPTER --to comfyui "
            "--base BASE -o OUT`",
        )
        return
    unmapped: dict[str, str] = {}
    family = ""
    if adapter.format == "peft":
        found = _comfyui_peft_unmapped(ctx, adapter, who)
        if found is None:
            return
        unmapped, family = found
        named = "PEFT-named"
    elif adapter.format in ("kohya", "diffusers", "diffusers-old", "comfyui"):
        unmapped = {
            m.key: facts.module_stem(m.keys["up"])
            for m in adapter.modules.values()
            if adapter.format in ("diffusers", "diffusers-old")
            and "up" in m.keys
            and facts.diffusers_name_unmapped(m.keys["up"])
        }
        named = "diffusers-named"
    else:
        return
    unread = [n for n in file_tensor_names(adapter) if not facts.tensor_read(n)]
    if unread:
        ctx.add(
            "LT552",
            f'{who}\'s load_lora does not read {len(unread)} tensor(s) ("lora key not loaded"; '
            f"dropped, the rest of the module applied without them): {listed(unread)}",
            module=unread[0],
            hint="merge what they hold into the base (`loratool merge`), or load the file "
            "with diffusers",
        )
    if unmapped and adapter.format == "peft":
        stems = list(unmapped.values())
        ctx.add(
            "LT554",
            f"{who} maps {len(stems)} of {len(adapter.modules)} {named} module(s) to no model "
            f"weight (the --base is {facts.family_title(family)}; its map holds no "
            'base_model.model.<path> for them): their tensors are "lora key not loaded", '
            f"dropped: {listed(stems)}",
            module=stems[0],
            hint="convert it with `loratool convert ADAPTER --to comfyui --base BASE -o OUT`",
        )
    elif unmapped:
        stems = list(unmapped.values())
        ctx.add(
            "LT554",
            f"{who} maps {len(stems)} of {len(adapter.modules)} {named} module(s) to "
            "no model weight (an SD UNet's attention projections only as unet.<path>.processor."
            "to_q..., text encoders only as text_encoder.text_model.encoder.layers.N...): their "
            f'tensors are "lora key not loaded", dropped: {listed(stems)}',
            module=stems[0],
            hint="convert it with `loratool convert ADAPTER --to comfyui --base BASE -o OUT`",
        )
    scale_findings(
        ctx,
        "LT553",
        who,
        adapter,
        "comfyui",
        "store each module's alpha as a <module>.alpha tensor (`loratool convert ADAPTER "
        "--to comfyui --base BASE -o OUT`)",
        left_out=frozenset(unmapped),
    )


def _comfyui_base_family(ctx: Context) -> str | None:
    """The ``--base`` model's family as :func:`comfyui_facts.base_family` tells it, or None
    (no base, or one loratool cannot place)."""
    components = getattr(ctx.checkpoint, "components", None)
    if not components:
        return None
    models = [c for name, c in components.items() if name in ("", "transformer", "unet")]
    configs = [c.config or {} for c in models]
    return comfyui_facts.base_family(
        [key for c in models for key in c],
        [config.get("_class_name", "") for config in configs],
        [config.get("model_type", "") for config in configs],
    )


#: LT551's hint for a PEFT file.
_COMFYUI_PEFT_HINT = (
    "for a diffusion model, convert it with `loratool convert ADAPTER --to comfyui --base BASE "
    "-o OUT`"
)


def _comfyui_peft_unmapped(
    ctx: Context, adapter: Adapter, who: str
) -> tuple[dict[str, str], str] | None:
    """The modules of a PEFT file ComfyUI maps to no weight (key -> stem) and the model family
    they were judged for, or None after an ``LT551`` finding: nothing of the file loads.

    The model is the ``--base``'s when loratool can tell its family; without one, the module
    paths alone decide, and every module must be one family's (``peft_family``)."""
    facts = comfyui_facts
    paths = {m.key: m.path or m.key for m in adapter.modules.values()}
    families = "; ".join(map(facts.family_title, facts.PEFT_FAMILIES))
    base = _comfyui_base_family(ctx)
    if base is not None and base not in facts.PEFT_FAMILIES:
        ctx.add(
            "LT551",
            f"{who} does not load this peft file on the --base model ({base}): "
            "model_lora_keys_unet maps base_model.model.* keys only for "
            f'{families}; every key is logged as "lora key not loaded" and dropped',
            hint=_COMFYUI_PEFT_HINT,
        )
        return None
    family = base or facts.peft_family(list(paths.values()))
    if family is None:
        closest = facts.peft_closest(list(paths.values()))
        outside = [
            p for p in paths.values() if closest is None or not facts.peft_mapped(p, closest)
        ]
        ctx.add(
            "LT551",
            f"{who} does not load this peft file: model_lora_keys_unet maps "
            f"base_model.model.* keys only for {families}, and no text encoder's; judged "
            "from the module paths alone ("
            + ("no --base" if ctx.checkpoint is None else "loratool cannot tell the --base's model")
            + "), "
            + (
                f"{len(outside)} of {len(paths)} module(s) are not {closest}'s"
                if closest
                else "they are none of those models'"
            )
            + f' ({listed(outside)}): every key is logged as "lora key not loaded" and dropped',
            module=outside[0] if outside else None,
            hint=_COMFYUI_PEFT_HINT,
        )
        return None
    unmapped = {
        k: m.key for k, m in adapter.modules.items() if not facts.peft_mapped(paths[k], family)
    }
    if len(unmapped) == len(paths):
        ctx.add(
            "LT551",
            f"{who} does not load this peft file on the --base model "
            f"({facts.family_title(family)}): none of its {len(paths)} module path(s) is one "
            f"that model's map holds under base_model.model. ({listed(list(paths.values()))}); "
            'every key is logged as "lora key not loaded" and dropped',
            module=next(iter(paths.values()), None),
            hint=_COMFYUI_PEFT_HINT,
        )
        return None
    return unmapped, family


# -- PEFT (LT56x) --------------------------------------------------------------------------------


def _peft(ctx: Context, adapter: Adapter, profile: Profile, deployment: Deployment) -> None:
    facts = peft_facts
    who = profile.label
    problem = peft_folder_problem(ctx, adapter, facts.WEIGHTS_NAMES)
    if problem:
        ctx.add(
            "LT561",
            f"{who}'s PeftModel.from_pretrained loads PEFT folders only (adapter_config.json + "
            f"adapter_model.safetensors): {problem}",
            hint="convert it with `loratool convert ADAPTER --to peft -o OUT`",
        )
        return
    config = adapter.config or {}
    unknown = facts.unknown_keys(config, profile.version)
    if not unknown:
        return
    if not profile.since(facts.TOLERANT_SINCE):
        ctx.add(
            "LT562",
            f"{who} refuses the config: LoraConfig has no field {listed(unknown)} "
            '("got an unexpected keyword argument"; the adapter was saved by a newer PEFT)',
            path=ctx.target.config_display,
            module=unknown[0],
            hint=f"load it with PEFT {fmt_version(facts.TOLERANT_SINCE)} or later, or delete "
            "the keys that hold their defaults from adapter_config.json",
        )
        return
    dropped = [key for key in unknown if facts.matters(key, config[key])]
    if dropped:
        ctx.add(
            "LT563",
            f"{who} drops config key(s) it does not know, with only a warning: "
            f"{', '.join(f'{k}={config[k]!r}' for k in dropped[:SHOWN_MODULES])} (the adapter "
            "loads without those features)",
            path=ctx.target.config_display,
            module=dropped[0],
            hint="load it with a PEFT version that knows them ("
            + ", ".join(
                f"{k}: {fmt_version(facts.FIELDS_SINCE[k])}"
                for k in dropped[:SHOWN_MODULES]
                if k in facts.FIELDS_SINCE
            )
            + ")",
        )


_CHECKS: dict[str, Callable[[Context, Adapter, Profile, Deployment], None]] = {
    "vllm": _vllm,
    "sglang": _sglang,
    "tgi": _tgi,
    "llamacpp": _llamacpp,
    "diffusers": _diffusers,
    "comfyui": _comfyui,
    "peft": _peft,
}
