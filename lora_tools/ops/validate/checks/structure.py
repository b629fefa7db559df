"""Structure rules (``LT1xx``): which format names the tensors, and whether every module's
tensors make a LoRA module (both factors, one rank, shapes of a layer kind, float dtypes, a
usable alpha), from the header alone (plus kohya's scalar alpha tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lora_tools.adapter import LARGEST_F32
from lora_tools.formats import best_format
from lora_tools.formats.base import AdapterFormat, bias_diff_keys, classify_foreign, shared_foreign
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
) -> tuple[set[str], dict[str, Stem]]:
    """Check every module stem's tensors (LT101-LT115).

    Args:
        ctx: the target's context.
        fmt: the detected format.
        names: every tensor name of the header, untrusted ones included.
        header: the trusted tensors (no container problem names them).
        untrusted: tensors a container rule already reported.
        file: the weights over ``header``; only kohya's scalar alphas are read from it.

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
        kind = fmt.foreign_kind(stem, shapes)
        if kind is not None:
            foreign.setdefault(kind, {})[stem] = None
    foreign_stems = {s for group in foreign.values() for s in group}
    bad: set[str] = set()
    for stem, entry in stems.items():
        if stem in foreign_stems:
            continue
        if any(key in untrusted for key in entry.roles.values()):
            bad.add(stem)  # already reported by a container rule
            continue
        if not _check_stem(ctx, fmt, stem, entry, info, file, no_alpha):
            bad.add(stem)
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
        else:
            ctx.add(
                "LT110",
                f"adapter type {kinds}, e.g. {example!r}: detected, not a plain LoRA; "
                "loratool's math operations refuse it",
                module=example,
            )
    elif not loaded and not _explained(ctx):
        ctx.add(
            "LT114",
            f"no complete LoRA module among {len(names)} tensors",
            hint="is this a LoRA adapter?",
        )
    return bad, stems


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
    ok = True
    for role, key in roles.items():
        if role == "alpha":
            continue
        dtype = info[key].dtype
        if dtype not in FLOAT_DTYPES or not DTYPES[dtype].decodable:
            ctx.add(
                "LT115",
                f"tensor {key!r} has dtype {dtype}; LoRA factors are floating point "
                "(F32, F16, BF16, F64, F8)",
                module=stem,
                expected="a float dtype",
                found=dtype,
            )
            ok = False
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
        ctx.add(
            "LT103",
            f"module {stem!r} has rank 0: its update is empty and its scale alpha / r "
            "divides by zero",
            module=stem,
            hint="drop the module, or re-train it with r >= 1",
        )
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
    ctx: Context, module: str, value: float, what: str, path: str | None = None
) -> bool:
    """Report an alpha that is not finite (LT108), zero (LT106) or negative (LT107).

    Args:
        ctx: the target's context.
        module: the module, or the config key (``lora_alpha``), the alpha belongs to.
        value: the alpha.
        what: how messages name the value (``alpha tensor 'x.alpha'``, ``config value``).
        path: the file to report, when it is not the weights (a config).

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
            f"{what} of {module!r} is 0: kohya-style loaders read it as alpha = rank "
            "(scale 1), PEFT-style loaders as scale 0 (no effect)",
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
