"""Structure rules (``LT1xx``): which format names the tensors, and whether every module's
tensors make a LoRA module (both factors, one rank, shapes of a layer kind, float dtypes, a
usable alpha), or a module of the other type they name (LoHa, LoKr, Tucker LoCon, full diff,
kohya DoRA, GLoRA: partners present, shapes that make an update, ranks, alpha), from the header
alone (plus kohya's scalar alpha tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tools.adapter import LARGEST_F32
from lora_tools.deltas import LOKR, TYPES, DeltaError, DeltaModule, build, module_type, role_of
from lora_tools.deltas.peft_types import PEFT_TYPE_NAMES, peft_modules
from lora_tools.errors import FormatError
from lora_tools.formats import best_format
from lora_tools.formats.base import AdapterFormat, bias_diff_keys, classify_foreign, shared_foreign
from lora_tools.formats.kohya import KohyaFormat
from lora_tools.formats.peft import PeftFormat
from lora_tools.io.jsonfile import parse_json
from lora_tools.io.safetensors import DTYPES, Header, SafetensorsFile, TensorInfo, scalar_value
from lora_tools.naming import PEFT_PREFIX, split_stem
from lora_tools.ops.validate.context import Context, fmt_number, fmt_shape
from lora_tools.ops.validate.rules import ERROR

FLOAT_DTYPES = frozenset(
    name for name in DTYPES if name.startswith(("F", "BF")) or name in ("C64",)
)


#: Textual-inversion embeddings bundled into a kohya LoRA file (``bundle_emb.<name>.*``): A1111's
#: Lora extension loads them as embeddings, so they are no unknown keys.
BUNDLED_EMBEDDING_PREFIX = "bundle_emb."


@dataclass
class Stem:
    """The tensors of one module stem as the format names them (role -> key)."""

    roles: dict[str, str] = field(default_factory=dict)
    embedding: bool = False


def detect_format(ctx: Context, names: list[str], metadata: dict[str, str]) -> AdapterFormat | None:
    """The format loading would detect (:func:`lora_tools.formats.best_format`), or None after
    an LT113 finding."""
    best = best_format(names, metadata)
    if best is None:
        sample = ", ".join(repr(k) for k in names[:3]) or "no tensors at all"
        ctx.add(
            "LT113",
            f"tensor names match no LoRA naming scheme (peft, diffusers, kohya, "
            f"diffusers-old, comfyui, xlabs, mlx); first keys: {sample}",
            hint="is this a LoRA adapter? exclude base checkpoints from the hook",
        )
    return best


def check_structure(
    ctx: Context,
    fmt: AdapterFormat,
    names: list[str],
    header: Header,
    untrusted: set[str],
    file: SafetensorsFile,
    config: dict[str, Any] | None = None,
) -> tuple[set[str], dict[str, Stem]]:
    """Check every module stem's tensors (LT101-LT115).

    Args:
        ctx: the target's context.
        fmt: the detected format.
        names: every tensor name of the header, untrusted ones included.
        header: the trusted tensors (no container problem names them).
        untrusted: tensors a container rule already reported.
        file: the weights over ``header``; only kohya's scalar alphas are read from it.
        config: the adapter's config, which may turn a module into a LoRA variant loratool
            does not compute (:meth:`~lora_tools.formats.base.AdapterFormat.foreign_kind`).

    Returns:
        The stems that cannot be loaded, and every stem's tensors by role.
    """
    stems: dict[str, Stem] = {}
    foreign: dict[str, dict[str, None]] = {}  # stems in file order: messages name the same one
    unknown: list[str] = []
    no_alpha: list[str] = []  # kohya modules without an alpha tensor, reported once (LT105)
    bias_diffs = bias_diff_keys(names, fmt)  # a LoRA module's .diff_b is no full diff
    for key in names:
        if shared_foreign(key) is not None:
            continue  # a matrix every module of a PEFT type shares (VeRA's vera_A / vera_B)
        found = None if key in bias_diffs else classify_foreign(key)
        if found is not None:
            foreign.setdefault(found[0], {})[found[1]] = None
            continue
        parsed = fmt.parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        entry = stems.setdefault(parsed.stem, Stem())
        entry.roles[parsed.role] = key
        entry.embedding = entry.embedding or parsed.embedding
    info = header.tensors
    for stem, entry in stems.items():
        shapes = {role: info[key].shape for role, key in entry.roles.items() if key in info}
        kind = fmt.foreign_kind(stem, shapes, config)
        if kind is not None:
            foreign.setdefault(kind, {})[stem] = None
    foreign_stems = {s for group in foreign.values() for s in group}
    computed, broken = _check_deltas(ctx, fmt, names, foreign, stems, header, file, no_alpha)
    bad: set[str] = set(broken)
    for stem, entry in stems.items():
        if stem in foreign_stems:
            continue
        if any(key in untrusted for key in entry.roles.values()):
            bad.add(stem)  # already reported by a container rule
            continue
        if not _check_stem(ctx, fmt, stem, entry, info, file, no_alpha):
            bad.add(stem)
    # LyCORIS IA3 keeps its vector as ``<stem>.weight`` beside ``<stem>.on_input``
    ia3 = foreign.get("IA3", {})
    unknown = [key for key in unknown if key.removesuffix(".weight") not in ia3]
    _unknown_keys(ctx, fmt, unknown)
    if no_alpha:
        count = len(no_alpha)
        ctx.add(
            "LT105",
            f"{count} module{'s have' if count > 1 else ' has'} no alpha tensor (e.g. "
            f"{no_alpha[0]!r}): kohya-style loaders use alpha = rank (scale 1)",
            module=no_alpha[0],
            hint="fine if scale 1 is intended; store .alpha tensors to make it explicit",
        )
    loaded = [s for s in stems if s not in foreign_stems and s not in bad]
    if foreign:
        kinds = ", ".join(f"{kind} ({len(group)} modules)" for kind, group in foreign.items())
        example = next(iter(next(iter(foreign.values()))))
        if loaded:
            ctx.add(
                "LT111",
                f"{len(loaded)} LoRA modules are mixed with {kinds}, e.g. {example!r}; "
                "tools that handle one type silently drop the other",
                module=example,
                hint="split the file by adapter type, or keep it for LyCORIS-aware loaders",
            )
        uncomputed = {
            kind: [s for s in group if s not in computed and s not in broken]
            for kind, group in foreign.items()
        }
        uncomputed = _boft_apart(
            {kind: group for kind, group in uncomputed.items() if group}, names, header
        )
        if uncomputed and not loaded:
            kinds = ", ".join(
                f"{kind} ({len(group)} modules)" for kind, group in uncomputed.items()
            )
            example = next(iter(uncomputed.values()))[0]
            ctx.add(
                "LT110",
                f"adapter type {kinds}, e.g. {example!r}: detected, not a plain LoRA, and not "
                "a type loratool computes; loratool's math operations refuse it",
                module=example,
            )
    elif not loaded and not _explained(ctx):
        ctx.add(
            "LT114",
            f"no complete LoRA module among {len(names)} tensors",
            hint="is this a LoRA adapter?",
        )
    return bad, stems


#: Per type, the tensors a module needs: each entry a set of alternatives, one of which must be
#: complete (LoKr's ``w1`` is ``lokr_w1`` or ``lokr_w1_a`` + ``lokr_w1_b``); and the tensors
#: that need others (a Tucker core needs both halves' factors).
_NEEDS: dict[str, tuple[tuple[frozenset[str], ...], ...]] = {
    "LoHa": (
        (frozenset({"hada_w1_a", "hada_w1_b"}),),
        (frozenset({"hada_w2_a", "hada_w2_b"}),),
    ),
    "LoKr": (
        (frozenset({"lokr_w1"}), frozenset({"lokr_w1_a", "lokr_w1_b"})),
        (frozenset({"lokr_w2"}), frozenset({"lokr_w2_a", "lokr_w2_b"})),
    ),
    "Tucker LoCon": ((frozenset({"lora_up", "lora_down", "lora_mid"}),),),
    "kohya DoRA": ((frozenset({"lora_up", "lora_down"}),),),
    "GLoRA": ((frozenset({"a1", "a2", "b1", "b2"}),),),
}
_PARTNERS = {
    "hada_t1": {"hada_t2"},
    "hada_t2": {"hada_t1"},
    "lokr_t2": {"lokr_w2_a", "lokr_w2_b"},
}
#: Types whose alpha is a scale (``alpha / r``): zero and negative values matter. OFT's alpha is
#: its constraint (0: none), a full diff has none.
_ALPHA_SCALES = frozenset({"LoHa", "LoKr", "Tucker LoCon", "kohya DoRA", "GLoRA"})


def _computed(kind: str) -> bool:
    """Whether loratool computes modules of ``kind`` (the types the core registers but does not
    compute yet raise for every module)."""
    spec = TYPES.get(kind)
    return spec is not None and spec.computed


def _check_deltas(
    ctx: Context,
    fmt: AdapterFormat,
    names: list[str],
    foreign: dict[str, dict[str, None]],
    stems: dict[str, Stem],
    header: Header,
    file: SafetensorsFile,
    no_alpha: list[str],
) -> tuple[set[str], set[str]]:
    """Check every module of another type (LT103, LT105-LT109, LT115-LT119), in the formats
    whose reader builds them (:attr:`~lora_tools.adapter.Adapter.deltas`).

    Returns:
        The modules of a computed type that make an update, and the modules that are broken
        (reported; ``stems`` gets their tensors so that the reader leaves them out).
    """
    if isinstance(fmt, PeftFormat):
        return _check_peft_deltas(ctx, names, foreign, stems, header, file)
    if not isinstance(fmt, KohyaFormat):
        return set(), set()  # the kohya and PEFT readers build them
    kind_of = {stem: kind for kind, group in foreign.items() for stem in group}
    parts: dict[str, dict[str, str]] = {}
    for key in names:
        found = classify_foreign(key)
        parsed = None if found is not None else fmt.parse_key(key)
        # kohya names hold no dot: a key's first part is its module (IA3's <stem>.weight)
        stem = found[1] if found else parsed.stem if parsed else key.partition(".")[0]
        if stem in kind_of:
            parts.setdefault(stem, {})[role_of(key[len(stem) + 1 :])] = key
    computed: set[str] = set()
    broken: set[str] = set()
    ignored: list[tuple[str, float]] = []  # whole LoKr modules' alphas, reported once (LT118)
    for stem, roles in parts.items():
        # A LoHa with a dora_scale is listed as both: its tensors say which it is.
        kind = module_type(roles) or kind_of[stem]
        if kind not in _NEEDS and not _computed(kind):
            continue  # OFT, IA3, VeRA...: LT110 names the type
        if any(key not in header.tensors for key in roles.values()):
            broken.add(stem)  # a container rule already reported it
        elif _check_delta(ctx, stem, kind, roles, header, file, (no_alpha, ignored)):
            if _computed(kind):
                computed.add(stem)
            continue
        broken.add(stem)
        stems[stem] = Stem(roles=dict(roles))
    if ignored:
        count, (example, value) = len(ignored), ignored[0]
        ctx.add(
            "LT118",
            f"{count} LoKr module{'s store an alpha' if count > 1 else ' stores an alpha'} "
            f"(e.g. {example!r}: {fmt_number(value)}) with both factors whole (lokr_w1, "
            "lokr_w2): LyCORIS and ComfyUI ignore it (scale 1, which loratool follows); a PEFT "
            "LoKr would scale by alpha / r",
            module=example,
            found=f"alpha {fmt_number(value)}",
            hint="fine for LyCORIS-aware loaders; a conversion to PEFT's LoKr must not carry "
            "the alpha over",
        )
    return computed, broken


def _check_peft_deltas(
    ctx: Context,
    names: list[str],
    foreign: dict[str, dict[str, None]],
    stems: dict[str, Stem],
    header: Header,
    file: SafetensorsFile,
) -> tuple[set[str], set[str]]:
    """The modules of PEFT's other types (its config's ``peft_type``: LoHa, LoKr, IA3, OFT,
    BOFT, AdaLoRA, VeRA): LT116 for a missing tensor, LT117 for shapes that make no update or
    a rank the config's ``r`` / ``rank_pattern`` contradicts. A config that cannot be read is
    the config rules' finding: no module is checked here then."""
    kind_stems = {stem for group in foreign.values() for stem in group}
    if not kind_stems:
        return set(), set()
    config = _peft_config(ctx)
    tensors = {key: file.tensor(key) for key in names if key in header.tensors}
    found = peft_modules(tensors, kind_stems, config)
    computed: set[str] = set()
    broken: set[str] = set()
    for stem, module in found.items():
        if isinstance(module, DeltaModule):
            computed.add(stem)
            continue
        kind = PEFT_TYPE_NAMES[str(config["peft_type"]).upper()]  # type: ignore[index]
        missing = " has no " in str(module)
        ctx.add(
            "LT116" if missing else "LT117",
            f"{module}: the tensors make no {kind} update; PEFT fails to load the adapter",
            module=stem,
            hint="re-export the adapter; the file lost tensors or they come from another "
            "module or config",
        )
        broken.add(stem)
        keys = [k for k in names if k.startswith(stem + ".")]
        stems[stem] = Stem(roles={k[len(stem) + 1 :]: k for k in keys})
    return computed, broken


def _peft_config(ctx: Context) -> dict[str, Any] | None:
    path = ctx.target.config
    if path is None:
        return None
    try:
        config = parse_json(Path(path).read_text(encoding="utf-8"), what=str(path))
    except (OSError, ValueError, FormatError):
        return None  # the config rules report it
    return config if isinstance(config, dict) else None


def _check_delta(
    ctx: Context,
    stem: str,
    kind: str,
    roles: dict[str, str],
    header: Header,
    file: SafetensorsFile,
    notes: tuple[list[str], list[tuple[str, float]]],
) -> bool:
    """One module of another type; False when it makes no usable update. ``notes``: the
    modules without an alpha (LT105) and the whole LoKr modules with one (LT118), reported once
    per file."""
    info = header.tensors
    present = ", ".join(sorted(roles))
    if not _float_tensors(ctx, stem, roles, info, f"{kind} tensors", ("alpha", "on_input")):
        return False
    missing = []
    for alternatives in _NEEDS.get(kind, ()):
        if not any(need <= roles.keys() for need in alternatives):
            best = min(alternatives, key=lambda need: len(need - roles.keys()))
            missing += sorted(best - roles.keys())
    for role, partners in _PARTNERS.items():
        if role in roles:
            missing += sorted(partners - roles.keys() - set(missing))
    if missing:
        ctx.add(
            "LT116",
            f"{kind} module {stem!r} has {present} but no {', '.join(missing)}: its tensors "
            "make no update; loaders skip the module or fail on it",
            module=stem,
            expected=", ".join(missing),
            found=present,
            hint="re-export the adapter; the file lost tensors",
        )
        return False
    if not _computed(kind):
        return True
    tensors = {role: file.tensor(key) for role, key in roles.items() if role != "alpha"}
    module = build(stem, {role: (roles[role], t) for role, t in tensors.items()})
    if module is None:
        return True
    try:
        module.update_dims  # noqa: B018 - the core's shape checks
        rank = module.rank
        shape = module.delta_shape
        core = _tucker_mismatch(roles, info)
        problem = None if core is None else f"{kind} module {stem!r}: {core}"
    except DeltaError as exc:
        problem = str(exc)
    if problem is not None:
        shapes = ", ".join(f"{role} {fmt_shape(info[key].shape)}" for role, key in roles.items())
        ctx.add(
            "LT117",
            f"{problem} ({shapes}): the tensors make no {kind} update",
            module=stem,
            expected=f"the shapes of a {kind} module",
            found=shapes,
            hint="re-export the adapter; its tensors come from different modules or a bad "
            "conversion",
        )
        return False
    if rank == 0:
        ctx.add(
            "LT103",
            f"{kind} module {stem!r} has rank 0: its update is empty and its scale alpha / r "
            "divides by zero",
            module=stem,
            hint="drop the module, or re-train it with r >= 1",
        )
        return False
    if not _dora_scale_fits(ctx, stem, kind, module, shape):
        return False
    if kind == LOKR and {"lokr_w1_b", "lokr_w2_b"} <= roles.keys():
        r1, r2 = info[roles["lokr_w1_b"]].shape[0], info[roles["lokr_w2_b"]].shape[0]
        if r1 != r2:
            ctx.add(
                "LT119",
                f"LoKr module {stem!r} decomposes both factors, with ranks {r1} (lokr_w1_b) "
                f"and {r2} (lokr_w2_b): which rank divides alpha is ambiguous (ComfyUI and "
                "loratool take lokr_w1_b's; LyCORIS builds both with one rank and fails to load "
                "it)",
                module=stem,
                expected=f"one rank ({r1})",
                found=f"{r1} and {r2}",
                hint="re-export the adapter with one rank",
            )
            return False
    return _check_delta_alpha(ctx, stem, kind, module, roles, info, file, notes)


#: Tucker core -> the factors it contracts with: ``tucker(core, a, b)`` sums ``core[i, j]``
#: against ``a[i]`` and ``b[j]``, and the cores of one module share their kernel.
_CORES = {
    "hada_t1": ("hada_w1_a", "hada_w1_b"),
    "hada_t2": ("hada_w2_a", "hada_w2_b"),
    "lokr_t2": ("lokr_w2_a", "lokr_w2_b"),
}


def _tucker_mismatch(roles: dict[str, str], info: dict[str, TensorInfo]) -> str | None:
    """What is wrong with a module's Tucker cores (their ranks are not their factors', or the
    two cores' kernels differ), or None."""
    kernels = set()
    for core, (a, b) in _CORES.items():
        if core not in roles or a not in roles or b not in roles:
            continue
        shape = info[roles[core]].shape
        ranks = (info[roles[a]].shape[0], info[roles[b]].shape[0])
        if len(shape) < 2 or tuple(shape[:2]) != ranks:
            return (
                f"{core} {fmt_shape(shape)} does not match the ranks {ranks[0]} of {a} and "
                f"{ranks[1]} of {b}"
            )
        kernels.add(tuple(shape[2:]))
    if len(kernels) > 1:
        return "hada_t1 and hada_t2 have different kernels"
    return None


def _dora_scale_fits(
    ctx: Context, stem: str, kind: str, module: DeltaModule, shape: tuple[int, ...]
) -> bool:
    """LT117 for a ``dora_scale`` that is neither ``[out, 1, ...]`` (LyCORIS ``wd_on_output``)
    nor ``[1, in, ...]``."""
    scale = module.dora_scale
    if scale is None:
        return True
    got = tuple(scale.shape)
    out, inp = shape[0], shape[1] if len(shape) > 1 else 1
    on_output = len(got) >= 1 and got[0] == out and math.prod(got) == out
    on_input = (
        len(got) >= 2 and got[0] == 1 and math.prod(got) == got[1] and inp % max(got[1], 1) == 0
    )
    if on_output or on_input:
        return True
    ctx.add(
        "LT117",
        f"{kind} module {stem!r}: dora_scale {fmt_shape(got)} fits neither the {out} outputs "
        f"nor the inputs of its update {fmt_shape(shape)}: the weight decomposition cannot "
        "be applied",
        module=stem,
        expected=f"[{out}, 1, ...] or [1, in, ...]",
        found=fmt_shape(got),
        hint="re-export the adapter; dora_scale belongs to another module",
    )
    return False


def _check_delta_alpha(
    ctx: Context,
    stem: str,
    kind: str,
    module: DeltaModule,
    roles: dict[str, str],
    info: dict[str, TensorInfo],
    file: SafetensorsFile,
    notes: tuple[list[str], list[tuple[str, float]]],
) -> bool:
    key = roles.get("alpha")
    whole_lokr = kind == LOKR and module.rank is None
    if key is None:
        if kind in _ALPHA_SCALES and not whole_lokr:
            notes[0].append(stem)
        return True
    tinfo = info[key]
    if tinfo.numel != 1 or not DTYPES[tinfo.dtype].decodable or tinfo.dtype == "BOOL":
        return _check_kohya_alpha(ctx, stem, key, info, file, [])
    value = scalar_value(file.read_bytes(key), tinfo.dtype)
    if whole_lokr:
        notes[1].append((stem, value))
        return True
    if kind not in _ALPHA_SCALES and math.isfinite(value):
        return True  # not a scale (OFT's constraint): only a non-finite value is wrong
    return check_alpha_value(
        ctx,
        stem,
        value,
        f"alpha tensor {key!r}",
        zero_reading="LyCORIS reads it as alpha = rank (scale 1, as loratool does), ComfyUI "
        "as scale 0 (no effect)",
    )


def _boft_apart(
    kinds: dict[str, list[str]], names: list[str], header: Header
) -> dict[str, list[str]]:
    """``kinds`` with the OFT modules whose ``oft_blocks`` are 4-D (LyCORIS BOFT's butterfly
    factors) listed as BOFT: the tensor names are OFT's."""
    oft = kinds.get("OFT")
    if not oft:
        return kinds
    blocks = {key.removesuffix(".oft_blocks"): key for key in names if key.endswith(".oft_blocks")}
    four_d = {
        s
        for s, key in blocks.items()
        if key in header.tensors and len(header.tensors[key].shape) == 4
    }
    boft = [s for s in oft if s in four_d]
    if not boft:
        return kinds
    out = {kind: group for kind, group in kinds.items() if kind != "OFT"}
    rest = [s for s in oft if s not in four_d]
    return {**({"OFT": rest} if rest else {}), "BOFT": boft, **out}


def _explained(ctx: Context) -> bool:
    """Whether an error already says why the file has no LoRA module (an unknown key does not:
    it says what a tensor is not)."""
    return any(
        f.severity == ERROR and f.rule.code[:3] in ("LT0", "LT1") and f.rule.code != "LT112"
        for f in ctx.report.findings
    )


def _unknown_keys(ctx: Context, fmt: AdapterFormat, unknown: list[str]) -> None:
    for key in unknown:
        if fmt.name in ("peft", "diffusers"):
            component, _ = split_stem(key)
            if key.startswith(PEFT_PREFIX) or component is not None:
                # Full tensors under the adapter's prefix: modules_to_save and saved
                # embedding layers, which PEFT loads as replacements.
                continue
        elif fmt.name not in (
            "kohya",
            "diffusers-old",
            "comfyui",
            "xlabs",
            "mlx",
        ) or key.startswith(BUNDLED_EMBEDDING_PREFIX):
            continue
        ctx.add(
            "LT112",
            f"tensor {key!r} is not a {fmt.name} LoRA tensor (no module of the file uses "
            "it); loaders ignore it silently",
            module=key,
            hint="remove it, or check that the file was converted completely",
        )


def _check_stem(
    ctx: Context,
    fmt: AdapterFormat,
    stem: str,
    entry: Stem,
    info: dict[str, TensorInfo],
    file: SafetensorsFile,
    no_alpha: list[str],
) -> bool:
    roles = entry.roles
    down_key, up_key = roles.get("down"), roles.get("up")
    if down_key is None or up_key is None:
        present = ", ".join(sorted(k.removeprefix(stem + ".") for k in roles.values()))
        missing = "up (lora_B / lora_up)" if up_key is None else "down (lora_A / lora_down)"
        if down_key is None and up_key is None:
            missing = "both factors"
        ctx.add(
            "LT101",
            f"module {stem!r} has {present} but no {missing} factor; loaders skip it "
            "silently or keep a zero-initialised partner",
            module=stem,
            expected="both factors",
            found=present,
            hint="re-export the adapter; the file lost tensors",
        )
        return False
    down, up = info[down_key], info[up_key]
    down_shape = fmt.canonical_shape("down", down.shape)
    up_shape = fmt.canonical_shape("up", up.shape)
    ok = _float_tensors(ctx, stem, roles, info, "LoRA factors", ("alpha",))
    nd, nu = len(down_shape), len(up_shape)
    if entry.embedding:
        shape_ok = nd == 2 and nu == 2
    elif nd == 2 and nu == 2:
        shape_ok = True
    else:
        shape_ok = nd >= 3 and nu == nd and all(d == 1 for d in up_shape[2:])
    if not shape_ok:
        ctx.add(
            "LT104",
            f"module {stem!r}: down {fmt_shape(down.shape)} and up {fmt_shape(up.shape)} "
            "fit no layer kind (linear [r, in] + [out, r]; conv [r, in, *k] + [out, r, 1...]; "
            "embedding [r, n] + [d, r])",
            module=stem,
            found=f"{fmt_shape(down.shape)} / {fmt_shape(up.shape)}",
        )
        return False
    rank_down, rank_up = down_shape[0], up_shape[1]
    if rank_down != rank_up:
        ctx.add(
            "LT102",
            f"module {stem!r}: down {fmt_shape(down.shape)} has rank {rank_down} but up "
            f"{fmt_shape(up.shape)} has rank {rank_up}",
            module=stem,
            expected=f"up.shape[1] == {rank_down}",
            found=str(rank_up),
            hint="the factors come from different adapters or a bad resize; re-export it",
        )
        return False
    if rank_down == 0:
        report_rank_zero(ctx, stem)
        return False
    out = up_shape[0]
    for role, expected in (("magnitude", out), ("bias", out), ("bias_diff", out)):
        key = roles.get(role)
        if key is None:
            continue
        shape = info[key].shape
        fits = math.prod(shape) == expected and (
            len(shape) == 1 or (role == "magnitude" and sum(d != 1 for d in shape) <= 1)
        )
        if not fits:
            ctx.add(
                "LT104",
                f"module {stem!r}: {role} {fmt_shape(shape)} does not match the "
                f"{expected} outputs of up {fmt_shape(up.shape)}",
                module=stem,
                expected=f"[{expected}]",
                found=fmt_shape(shape),
            )
            ok = False
    if fmt.name in ("kohya", "comfyui") and ok:
        ok = _check_kohya_alpha(ctx, stem, roles.get("alpha"), info, file, no_alpha)
    return ok


def _float_tensors(
    ctx: Context,
    stem: str,
    roles: dict[str, str],
    info: dict[str, TensorInfo],
    what: str,
    skip: tuple[str, ...],
) -> bool:
    """LT115 for each tensor of a module (but the roles in ``skip``) whose dtype is no
    decodable float; False if any."""
    ok = True
    for role, key in roles.items():
        dtype = info[key].dtype
        if role in skip or (dtype in FLOAT_DTYPES and DTYPES[dtype].decodable):
            continue
        ctx.add(
            "LT115",
            f"tensor {key!r} has dtype {dtype}; {what} are floating point "
            "(F32, F16, BF16, F64, F8)",
            module=stem,
            expected="a float dtype",
            found=dtype,
        )
        ok = False
    return ok


def _check_kohya_alpha(
    ctx: Context,
    stem: str,
    key: str | None,
    info: dict[str, TensorInfo],
    file: SafetensorsFile,
    no_alpha: list[str],
) -> bool:
    if key is None:
        no_alpha.append(stem)
        return True
    tinfo = info[key]
    if tinfo.numel != 1:
        ctx.add(
            "LT109",
            f"alpha {key!r} has shape {fmt_shape(tinfo.shape)}; alpha is one number "
            "(shape [] or [1])",
            module=stem,
            expected="[] or [1]",
            found=fmt_shape(tinfo.shape),
        )
        return False
    if not DTYPES[tinfo.dtype].decodable or tinfo.dtype == "BOOL":
        ctx.add(
            "LT115",
            f"alpha {key!r} has dtype {tinfo.dtype}, which holds no usable number",
            module=stem,
            found=tinfo.dtype,
        )
        return False
    value = scalar_value(file.read_bytes(key), tinfo.dtype)
    return check_alpha_value(ctx, stem, value, f"alpha tensor {key!r}")


def check_alpha_value(
    ctx: Context,
    module: str,
    value: float,
    what: str,
    path: str | None = None,
    zero_reading: str = "kohya-style loaders read it as alpha = rank (scale 1), PEFT-style "
    "loaders as scale 0 (no effect)",
) -> bool:
    """Report an alpha that is not finite (LT108), zero (LT106) or negative (LT107).

    Args:
        ctx: the target's context.
        module: the module, or the config key (``lora_alpha``), the alpha belongs to.
        value: the alpha.
        what: how messages name the value (``alpha tensor 'x.alpha'``, ``config value``).
        path: the file to report, when it is not the weights (a config).
        zero_reading: how the consumers read an alpha of 0 (LT106's message).

    Returns:
        False when the alpha makes the module unusable (not finite), else True.
    """
    if not math.isfinite(value) or abs(value) > LARGEST_F32:
        ctx.nonfinite_alphas.add(module)
        ctx.add(
            "LT108",
            f"{what} of {module!r} is {value}; every scale alpha / r becomes {value}"
            if not math.isfinite(value)
            else f"{what} of {module!r} is {value}, beyond float32's range (consumers compute "
            "the update in float32 and get inf)",
            module=module,
            expected="a finite number",
            found=str(value),
            path=path,
        )
        return False
    if value == 0:
        ctx.add(
            "LT106",
            f"{what} of {module!r} is 0: {zero_reading}",
            module=module,
            found="0",
            hint="store the intended alpha (usually the rank, or the training alpha)",
            path=path,
        )
    elif value < 0:
        ctx.add(
            "LT107",
            f"{what} of {module!r} is {fmt_number(value)}: the update is applied with its sign "
            "flipped",
            module=module,
            found=fmt_number(value),
            hint="negative alphas are almost always a conversion bug",
            path=path,
        )
    return True


def report_rank_zero(ctx: Context, stem: str) -> None:
    """LT103 for a module whose factors have rank 0 (the GGUF rules share it)."""
    ctx.add(
        "LT103",
        f"module {stem!r} has rank 0: its update is empty and its scale alpha / r divides by zero",
        module=stem,
        hint="drop the module, or re-train it with r >= 1",
    )
