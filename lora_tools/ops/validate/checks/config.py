"""Config and metadata rules (``LT3xx``): adapter_config.json, diffusers'
``lora_adapter_metadata`` and kohya's ``ss_network_*`` training metadata against the tensors.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from lora_tools import patterns
from lora_tools.adapter import CONV, UNKNOWN_SCALE_HINT, Adapter, LoraModule
from lora_tools.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHT_NAMES
from lora_tools.errors import FormatError
from lora_tools.formats import peft as peft_format
from lora_tools.formats.base import AdapterFormat
from lora_tools.io.jsonfile import parse_json
from lora_tools.naming import config_number, pattern_key
from lora_tools.ops.validate.checks.structure import check_alpha_value
from lora_tools.ops.validate.context import Context, fmt_number, fmt_shape


def check_config_only(ctx: Context) -> None:
    """Checks of the config alone, when the weights could not be read (LT302, LT303)."""
    if ctx.target.config is None:
        return
    config = read_config(ctx)
    if config is not None:
        _check_peft_type(ctx, config, ctx.target.config_display or "")


def read_config(ctx: Context) -> dict[str, Any] | None:
    """The target's adapter_config.json as a dict, or None after an LT302 finding."""
    assert ctx.target.config is not None
    display = ctx.target.config_display or str(ctx.target.config)
    try:
        data = ctx.target.config.read_bytes()
    except OSError as exc:
        ctx.add("LT302", f"cannot read config: {exc}", path=display)
        return None
    try:
        doc = parse_json(data, what="config")
    except FormatError as exc:
        ctx.add(
            "LT302",
            exc.message,
            path=display,
            hint="fix or regenerate adapter_config.json (PEFT's save_pretrained writes it)",
        )
        return None
    if not isinstance(doc, dict):
        ctx.add(
            "LT302",
            f"config is a JSON {type(doc).__name__}, expected an object",
            path=display,
        )
        return None
    return doc


def readable_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``config`` without the rank / alpha pattern keys no regex engine can use here.

    :func:`check_adapter_config` reports each such key (LT302); leaving them out lets the
    reader build the modules, so that every other rule still runs.
    """
    if not config:
        return config
    out = dict(config)
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name)
        if isinstance(pattern, dict):
            out[name] = {k: v for k, v in pattern.items() if _usable_key(k)}
    return out


def _usable_key(key: str) -> bool:
    try:
        patterns.check(patterns.peft_pattern(key))
    except patterns.PatternError:
        return False
    return True


def check_adapter_config(
    ctx: Context, fmt: AdapterFormat, adapter: Adapter, config: dict[str, Any] | None
) -> None:
    """The config and metadata rules (LT301-LT310) for the adapter as its format reads it.

    Args:
        ctx: the target's context.
        fmt: the detected format; PEFT files are checked against ``config``, diffusers files
            against their ``lora_adapter_metadata``, kohya files against ``ss_network_*``.
        adapter: the adapter read from the weights.
        config: the parsed adapter_config.json of a PEFT file, if there is one.
    """
    modules = list(adapter.modules.values())
    if fmt.name == "peft":
        # PEFT keys keep r / lora_alpha in the config alone, renamed lone files included.
        weights = ctx.target.weights
        if (
            ctx.target.config is None
            and weights is not None
            and (weights.name == ADAPTER_WEIGHT_NAMES[0] or adapter.alpha_unknown is not None)
        ):
            where = "beside the weights" if weights.name == ADAPTER_WEIGHT_NAMES[0] else "read"
            ctx.add(
                "LT301",
                f"PEFT keys ({len(modules)} modules) but no {ADAPTER_CONFIG_NAME} {where}: PEFT cannot "
                "load the adapter, and r / lora_alpha, so every module's scale, are unknown",
                hint=UNKNOWN_SCALE_HINT,
            )
        elif config is not None:
            display = ctx.target.config_display or str(ctx.target.config)
            if _is_other_peft_type(config, adapter):
                return  # an intact PEFT LoHa / LoKr / IA3... adapter; LT110 reports its type
            _check_peft_type(ctx, config, display, adapter)
            _check_config(ctx, config, modules, display)
    elif fmt.name == "mlx":
        _check_mlx_config(ctx, config, modules)
    elif fmt.name == "diffusers":
        _check_diffusers_metadata(ctx, adapter, modules)
    elif fmt.name == "kohya":
        _check_kohya_metadata(ctx, adapter, modules)


#: PEFT's peft_type for the adapter types loratool detects but does not compute with.
PEFT_TYPE_KINDS = peft_format.OTHER_PEFT_TYPES
#: The LoRA variants of PEFT's own LoRA type that loratool does not compute.
VARIANTS = frozenset(peft_format.VARIANT_KINDS.values())


def _is_other_peft_type(config: dict[str, Any], adapter: Adapter) -> bool:
    """A PEFT adapter of another type whose tensors are of that type: what PEFT loads."""
    kind = PEFT_TYPE_KINDS.get(config.get("peft_type"))  # type: ignore[arg-type]
    return kind is not None and not adapter.modules and set(adapter.foreign) == {kind}


def _check_peft_type(
    ctx: Context, config: dict[str, Any], display: str, adapter: Adapter | None = None
) -> None:
    peft_type = config.get("peft_type")
    # PEFT's own LoRA variants (KaSA, BD-LoRA, target_parameters) are LoRA modules to PEFT
    others = [k for k in adapter.foreign if k not in VARIANTS] if adapter is not None else []
    if peft_type == "LORA" and others:
        kinds = ", ".join(others)
        ctx.add(
            "LT303",
            f"peft_type is 'LORA' but the file holds {kinds} tensors; PEFT creates LoRA "
            "layers and drops them silently",
            module="peft_type",
            expected=f"the peft_type of {kinds}",
            found="'LORA'",
            path=display,
            hint="set peft_type to the adapter's type",
        )
        return
    if peft_type != "LORA":
        ctx.add(
            "LT303",
            f"peft_type is {peft_type!r}, expected 'LORA'"
            + ("; PEFT cannot load a config without it" if peft_type is None else ""),
            module="peft_type",
            expected="LORA",
            found=repr(peft_type),
            path=display,
            hint="loratool handles LoRA adapters only"
            if peft_type is not None
            else 'add "peft_type": "LORA"',
        )


def _check_config(
    ctx: Context, config: dict[str, Any], modules: list[LoraModule], display: str
) -> None:
    """r / lora_alpha / patterns / target_modules / use_dora of one config vs its modules."""
    paths = [m.path or m.key for m in modules]
    bad_keys: set[str] = set()
    r = config.get("r")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict):
            ctx.add(
                "LT302",
                f"{name} is a {type(pattern).__name__}, expected an object",
                module=name,
                path=display,
            )
            continue
        for key in pattern:
            try:
                patterns.check(patterns.peft_pattern(key))
            except patterns.PatternError as exc:
                ctx.add(
                    "LT302",
                    f"{name} key {key!r} {exc}; loratool refuses the config (PEFT fails on "
                    "an invalid pattern)",
                    module=f"{name}[{key!r}]",
                    path=display,
                )
                bad_keys.add(key)
                continue
            if paths and not any(patterns.peft_pattern_matches(key, p) for p in paths):
                ctx.add(
                    "LT305",
                    f"{name} key {key!r} matches none of the {len(paths)} modules; PEFT "
                    "ignores it silently, so its value applies nowhere",
                    module=f"{name}[{key!r}]",
                    path=display,
                    hint="PEFT matches keys as (.*\\.)?(KEY)$ against module paths such as "
                    f"{paths[0]!r}",
                )
    if not isinstance(rank_pattern, dict):
        rank_pattern = {}
    if not isinstance(alpha_pattern, dict):
        alpha_pattern = {}
    # Keys already reported as unusable are left out of the per-module checks below.
    rank_pattern = {k: v for k, v in rank_pattern.items() if k not in bad_keys}
    alpha_pattern = {k: v for k, v in alpha_pattern.items() if k not in bad_keys}

    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        ctx.add(
            "LT304",
            f"r is {r!r}, expected a positive integer",
            module="r",
            expected="a positive integer",
            found=repr(r),
            path=display,
        )
        r = None
    for m in modules:
        key = pattern_key(rank_pattern, m.path or "")
        expected = rank_pattern[key] if key is not None else r
        if expected is None or expected == m.rank:
            continue
        source = f"rank_pattern[{key!r}]" if key is not None else "r"
        ctx.add(
            "LT304",
            f"module {m.key!r} has rank {m.rank} (down {fmt_shape(m.down.shape)}) but the "
            f"config's {source} says {expected}; PEFT refuses to load it (size mismatch)",
            module=m.key,
            expected=str(expected),
            found=str(m.rank),
            path=display,
            hint=f"set {source} to {m.rank}",
        )

    alpha = config.get("lora_alpha", r)
    checks = [("lora_alpha", alpha)] + [
        (f"alpha_pattern[{k!r}]", v) for k, v in alpha_pattern.items()
    ]
    for name, value in checks:
        if value is None:
            continue
        check_alpha_value(ctx, name, config_number(value), "config value", path=display)

    _check_targets(ctx, config, modules, display)
    _check_dora(ctx, config, modules, display)


def _check_targets(
    ctx: Context, config: dict[str, Any], modules: list[LoraModule], display: str
) -> None:
    targets = config.get("target_modules")
    if targets is None or not modules:
        return
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return  # PEFT resolves it at creation; any linear layer qualifies

        try:
            patterns.check(targets)
        except patterns.PatternError as exc:
            ctx.add(
                "LT302",
                f"target_modules {targets!r} {exc}; loratool refuses the config (PEFT "
                "fails on an invalid pattern)",
                module="target_modules",
                path=display,
            )
            return

        def covered(path: str) -> bool:
            return patterns.fullmatch(targets, path)
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        names = set(targets)

        def covered(path: str) -> bool:
            # PEFT: path == t or path.endswith("." + t); as set lookups of the path and of each
            # suffix after a ".", O(depth) instead of O(len(targets)) per module
            return path in names or any(
                path[i + 1 :] in names for i, c in enumerate(path) if c == "."
            )
    else:
        ctx.add(
            "LT302",
            f"target_modules is {targets!r}, expected a list of names or a regex string",
            module="target_modules",
            path=display,
        )
        return
    excluded = _excluded_modules(config)
    tied = _tied_head_covered(config, modules, covered)
    missing = [
        m
        for m in modules
        if not (covered(m.path or m.key) or tied(m.path or m.key)) or excluded(m.path or m.key)
    ]
    shown = targets if isinstance(targets, str) else ", ".join(targets)
    if config.get("exclude_modules"):
        shown += f"; exclude_modules: {config['exclude_modules']}"
    if len(missing) == len(modules):
        ctx.add(
            "LT306",
            f"target_modules ({shown}) covers none of the {len(modules)} saved modules "
            f"(e.g. {modules[0].path!r}); PEFT creates other layers and ignores every "
            "saved tensor",
            module="target_modules",
            expected=f"names matching e.g. {modules[0].target_name!r}",
            found=shown,
            path=display,
            hint="set target_modules to the layers the adapter was trained on",
        )
        return
    for m in missing:
        if excluded(m.path or m.key):
            ctx.add(
                "LT307",
                f"module {m.key!r} ({m.path}) is excluded by exclude_modules "
                f"({config['exclude_modules']}); PEFT creates no layer for it and drops its "
                "tensors silently",
                module=m.key,
                path=display,
                hint="remove it from exclude_modules",
            )
            continue
        ctx.add(
            "LT307",
            f"module {m.key!r} ({m.path}) is not covered by target_modules ({shown}); "
            "PEFT creates no layer for it and drops its tensors silently",
            module=m.key,
            path=display,
            hint=f"add {m.target_name!r} to target_modules",
        )


def _tied_head_covered(
    config: dict[str, Any], modules: list[Any], covered: Callable[[str], bool]
) -> Callable[[str], bool]:
    """With ``ensure_weight_tying``, PEFT saves a tied head's LoRA (``lm_head``) beside the
    input embedding's and rewrites target_modules to the embedding alone; loading, it ties the
    head's layer to the embedding's again, so the head's tensors are not dropped."""
    if not config.get("ensure_weight_tying"):
        return lambda path: False
    from lora_tools.resolve import HEAD_NAMES, INPUT_EMBEDDING_NAMES  # resolve is not light

    embedding = any(
        covered(m.path or m.key) and (m.path or m.key).rpartition(".")[2] in INPUT_EMBEDDING_NAMES
        for m in modules
    )
    return lambda path: embedding and path.rpartition(".")[2] in HEAD_NAMES


def _excluded_modules(config: dict[str, Any]) -> Callable[[str], bool]:
    """PEFT's ``exclude_modules`` test (tuners_utils.check_target_module_exists): a regex matched
    in full, or names matched exactly or as a ``.name`` suffix. PEFT creates no layer for an
    excluded module, whatever target_modules says."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and exclude:

        def excluded(path: str) -> bool:
            try:
                return patterns.fullmatch(exclude, path)
            except patterns.PatternError:
                return False

        return excluded
    if isinstance(exclude, list) and exclude and all(isinstance(e, str) for e in exclude):
        return lambda path: any(path == e or path.endswith("." + e) for e in exclude)
    return lambda path: False


def _check_dora(
    ctx: Context, config: dict[str, Any], modules: list[LoraModule], display: str
) -> None:
    if not modules:
        return
    use_dora = bool(config.get("use_dora", False))
    with_magnitude = [m for m in modules if m.dora]
    if use_dora and not with_magnitude:
        ctx.add(
            "LT308",
            f"use_dora is true but none of the {len(modules)} modules has a "
            "lora_magnitude_vector; PEFT would initialise magnitudes from the base",
            module="use_dora",
            expected="lora_magnitude_vector per module",
            found="none",
            path=display,
            hint="set use_dora to false, or save the DoRA adapter again",
        )
    elif not use_dora and with_magnitude:
        ctx.add(
            "LT308",
            f"{len(with_magnitude)} modules carry lora_magnitude_vector but use_dora is "
            "false; PEFT loads them as plain LoRA and drops the magnitudes silently",
            module="use_dora",
            expected="use_dora: true",
            found="false",
            path=display,
            hint="set use_dora to true",
        )


def _check_diffusers_metadata(ctx: Context, adapter: Adapter, modules: list[LoraModule]) -> None:
    raw = adapter.metadata.get(peft_format.DIFFUSERS_METADATA_KEY)
    if raw is None:
        return
    try:
        flat = parse_json(raw)
    except FormatError as exc:
        flat = None
        problem = f"is {exc.message}"
    else:
        problem = "is not a JSON object"
    if not isinstance(flat, dict):
        ctx.add(
            "LT302",
            f"__metadata__[{peft_format.DIFFUSERS_METADATA_KEY!r}] {problem}; diffusers "
            "falls back to guessing rank and alpha",
            module=f"__metadata__[{peft_format.DIFFUSERS_METADATA_KEY!r}]",
        )
        return
    configs = peft_format.diffusers_component_configs(adapter.metadata)
    by_component: dict[str, list[LoraModule]] = {}
    for m in modules:
        by_component.setdefault(m.component or "", []).append(m)
    for component, config in configs.items():
        members = by_component.get(component, [])
        if not members:
            continue
        _check_config(ctx, config, members, ctx.path)


def _check_kohya_metadata(ctx: Context, adapter: Adapter, modules: list[LoraModule]) -> None:
    if not modules:
        return
    meta = adapter.metadata
    try:
        args = parse_json(meta.get("ss_network_args") or "{}")
    except FormatError:
        args = {}
    if not isinstance(args, dict):
        args = {}
    # kohya trains 3x3 (and larger) convolutions with conv_dim / conv_alpha, everything else
    # (linear layers and 1x1 convolutions) with network_dim / network_alpha.
    is_wide = [m.kind == CONV and math.prod(m.kernel) > 1 for m in modules]
    wide = [m for m, w in zip(modules, is_wide, strict=True) if w]
    narrow = [
        m for m, w in zip(modules, is_wide, strict=True) if not w
    ]  # not `m not in wide`: O(n^2)
    groups = (
        (narrow, meta.get("ss_network_dim"), meta.get("ss_network_alpha"), "ss_network"),
        (wide, args.get("conv_dim"), args.get("conv_alpha"), "ss_network_args conv"),
    )
    for members, dim, alpha, label in groups:
        if not members:
            continue
        dim_value = _parse_number(dim)
        if dim_value is not None:
            # Per-block and per-type dims (block_dims, type_dims) legitimately vary, with
            # the metadata naming the default: only a value no module has is stale.
            ranks = Counter(m.rank for m in members)
            if all(m.rank != dim_value for m in members):
                ctx.add(
                    "LT309",
                    f"{label}_dim says {fmt_number(dim_value)} but none of the {len(members)} "
                    f"modules has that rank ({_hist(ranks)})",
                    module=members[0].key,
                    expected=fmt_number(dim_value),
                    found=_hist(ranks),
                    hint="the metadata is stale (resized or merged file); update it, or "
                    "set it to Dynamic",
                )
        alpha_value = _parse_number(alpha)
        # Stored alphas may be fp16-rounded: compare with a relative tolerance.
        if alpha_value is not None and not any(
            math.isclose(m.effective_alpha, alpha_value, rel_tol=1e-3, abs_tol=1e-6)
            for m in members
        ):
            alphas = Counter(fmt_number(m.effective_alpha) for m in members)
            ctx.add(
                "LT310",
                f"{label}_alpha says {fmt_number(alpha_value)} but none of the {len(members)} "
                f"modules has that alpha ({_hist(alphas)})",
                module=members[0].key,
                expected=fmt_number(alpha_value),
                found=_hist(alphas),
                hint="the metadata is stale (rescaled or merged file); update it",
            )


def _hist(counter: Counter) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counter.items(), key=lambda kv: str(kv[0])))


def _parse_number(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None  # "Dynamic" and friends: nothing to compare
    return number if math.isfinite(number) else None


def _check_mlx_config(
    ctx: Context, config: dict[str, Any] | None, modules: list[LoraModule]
) -> None:
    """mlx-lm's adapter_config.json against the tensors: mlx-lm builds every LoRA layer with
    ``lora_parameters.rank`` and refuses tensors of another shape; ``fine_tune_type`` says
    whether the layers are DoRA (and so expect ``.m``)."""
    if config is None:
        ctx.add(
            "LT301",
            f"mlx-lm keys ({len(modules)} modules) but no {ADAPTER_CONFIG_NAME} beside the "
            "weights: mlx-lm cannot load the adapter, and its scale is unknown",
            hint="put the adapter_config.json mlx_lm.lora wrote beside adapters.safetensors",
        )
        return
    display = ctx.target.config_display or str(ctx.target.config)
    params = config.get("lora_parameters")
    rank = params.get("rank") if isinstance(params, dict) else None
    for m in modules:
        if m.rank != rank:
            ctx.add(
                "LT304",
                f"module {m.key!r} has rank {m.rank} but lora_parameters.rank is {rank!r}; "
                "mlx-lm refuses to load it (shape mismatch)",
                module=m.key,
                expected=repr(rank),
                found=str(m.rank),
                path=display,
                hint=f"set lora_parameters.rank to {m.rank}",
            )
            break
    dora = config.get("fine_tune_type") == "dora"
    for m in modules:
        if m.dora != dora:
            ctx.add(
                "LT308",
                f"module {m.key!r} {'has' if m.dora else 'has no'} magnitude vector but "
                f"fine_tune_type is {config.get('fine_tune_type')!r}; mlx-lm "
                + ("refuses the .m tensors" if m.dora else "merges it as plain LoRA"),
                module=m.key,
                path=display,
                hint=f"set fine_tune_type to {'dora' if m.dora else 'lora'}",
            )
            break
