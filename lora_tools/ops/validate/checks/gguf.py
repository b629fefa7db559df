"""The rules on a llama.cpp LoRA GGUF: what ``llama_adapter_lora_init`` (llama.cpp
src/llama-adapter.cpp) refuses or aborts on, and the value rules, read through the ``gguf``
package (:mod:`lora_tools.io.gguf`).

The layers are the safetensors ones, on the GGUF's own facts:

1. integrity: the file parses as GGUF (``LT019``; ``LT017`` when it cannot be read), each
   key once (``LT014``);
2. metadata (``LT311``-``LT315``, ``LT107``, ``LT108``): the key-values llama.cpp reads, with
   the types it reads them as (a wrong type aborts it in ``gguf_get_val_*``);
3. structure (``LT101``-``LT104``, ``LT112``, ``LT114``, ``LT115``, ``LT120``): tensor names,
   pairs, ranks and shapes, from the header alone;
4. values (``LT201``-``LT204``): every tensor decoded once (F32, F16, BF16, Q8_0 and the other
   block types through ``gguf.quants.dequantize``);
5. base (``LT401``, ``LT403``, ``LT404``, ``LT406``, with ``--base``): each pair's base tensor
   exists in the base as llama.cpp names it, with the shape llama.cpp checks, and the
   architectures agree; the base is a GGUF model, or a Hugging Face folder whose weights are
   named through llama.cpp's tensor map (``gguf.get_tensor_name_map``);
6. profiles (``--profile``): the serving engines' rules, which refuse a GGUF (llama.cpp's own
   rules are the ones above).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from lora_tools.adapter import EMBEDDING, Adapter
from lora_tools.errors import FormatError
from lora_tools.formats.gguf import (
    ADAPTER_TYPE,
    ALORA_INVOCATION_TOKENS,
    FORMAT_NAME,
    GENERAL_ARCHITECTURE,
    GENERAL_TYPE,
    LORA_ALPHA,
    NORM_SUFFIX,
    build_gguf_adapter,
    parse_key,
)
from lora_tools.formats.gguf_arch import ARCHITECTURES, read_base_config
from lora_tools.io.gguf import GgufFile, gguf_package
from lora_tools.ops.validate.checks.profiles import check_profiles
from lora_tools.ops.validate.checks.structure import report_rank_zero
from lora_tools.ops.validate.checks.values import report_outliers, report_zero_modules
from lora_tools.ops.validate.context import Context, fmt_number, fmt_shape
from lora_tools.ops.validate.scan import Factor

#: The key-values llama.cpp reads, and the GGUF type it reads each as.
READ_TYPES = {
    GENERAL_TYPE: "STRING",
    GENERAL_ARCHITECTURE: "STRING",
    ADAPTER_TYPE: "STRING",
    LORA_ALPHA: "FLOAT32",
    ALORA_INVOCATION_TOKENS: "ARRAY[UINT32]",
}
_SOURCE = "llama.cpp's llama_adapter_lora_init"


def check_gguf(ctx: Context) -> None:
    """Every enabled rule on one GGUF target (its format is ``gguf``)."""
    assert ctx.target.weights is not None
    ctx.report.format = FORMAT_NAME
    try:
        file = GgufFile(ctx.target.weights)
    except FormatError as exc:
        code = {"io": "LT017", "not-regular": "LT017", "duplicate-key": "LT014"}.get(
            exc.kind or "", "LT019"
        )
        ctx.add(code, exc.message, hint=exc.hint)
        return
    try:
        _check_metadata(ctx, file)
        kind = file.kv.get(GENERAL_TYPE)
        if kind is not None and kind.type == "STRING" and kind.value != "adapter":
            return  # a model (or another GGUF): LT311 says so, its tensors are no LoRA's
        bad = _check_structure(ctx, file)
        adapter = build_gguf_adapter(file, keys=set(file.tensors) - bad)
        if ctx.runs("LT2"):
            _check_values(ctx, file, adapter)
        if ctx.checkpoint is not None and ctx.runs("LT4"):
            _check_base(ctx, file, adapter)
        if ctx.deployment is not None:
            others = tuple(
                p for p in ctx.deployment.profiles if p.consumer.name != "llamacpp"
            )  # llama.cpp's own loading rules are this module's
            if others:
                check_profiles(ctx, adapter, replace(ctx.deployment, profiles=others))
    finally:
        file.close()


# -- metadata ------------------------------------------------------------------------------------


def _check_metadata(ctx: Context, file: GgufFile) -> None:
    """LT314 for a key-value of another type than llama.cpp reads it as; LT311 / LT312 /
    LT313 for the values it refuses; LT315, LT107, LT108 for the alpha."""
    typed = {}
    for key, expected in READ_TYPES.items():
        kv = file.kv.get(key)
        if kv is None:
            continue
        if kv.spelled_type != expected:
            aborts = key != ALORA_INVOCATION_TOKENS
            ctx.add(
                "LT314",
                f"key-value {key} is {kv.spelled_type}; {_SOURCE} reads it as {expected} and "
                + (
                    "aborts the process on any other type (GGML_ASSERT in gguf_get_val)"
                    if aborts
                    else "refuses the file (invalid gguf type)"
                ),
                module=key,
                expected=expected,
                found=kv.spelled_type,
                hint=f"re-write the file with {key} as {expected} (`loratool convert --to gguf`)",
            )
            continue
        typed[key] = kv.value
    if _wrong(file, typed, GENERAL_TYPE, "adapter"):
        found = repr(typed[GENERAL_TYPE]) if GENERAL_TYPE in typed else "missing"
        ctx.add(
            "LT311",
            f"general.type is {found}: llama.cpp loads a LoRA only from a GGUF with "
            "general.type 'adapter' (a base model or another GGUF is no adapter)",
            module=GENERAL_TYPE,
            expected="'adapter'",
            found=found,
            hint="pass the adapter GGUF, not a model; `loratool convert --to gguf` writes one",
        )
        if GENERAL_TYPE in typed:
            return  # a model or another kind of GGUF: its other keys are no adapter's
    if _wrong(file, typed, ADAPTER_TYPE, "lora"):
        found = repr(typed[ADAPTER_TYPE]) if ADAPTER_TYPE in typed else "missing"
        ctx.add(
            "LT312",
            f"adapter.type is {found}: llama.cpp loads adapter.type 'lora' only",
            module=ADAPTER_TYPE,
            expected="'lora'",
            found=found,
            hint="a control vector or another adapter type is not a LoRA",
        )
    if GENERAL_ARCHITECTURE not in file.kv or GENERAL_ARCHITECTURE in typed:
        _check_architecture(ctx, typed.get(GENERAL_ARCHITECTURE))
    if LORA_ALPHA in typed:
        _check_alpha(ctx, float(typed[LORA_ALPHA]))
    elif LORA_ALPHA not in file.kv:
        _alpha_means_one(ctx, "missing")


def _wrong(file: GgufFile, typed: dict[str, Any], key: str, wanted: str) -> bool:
    """Whether a string key-value is missing or not ``wanted`` (a wrong type is LT314's)."""
    if key in file.kv and key not in typed:
        return False
    return typed.get(key) != wanted


def _check_architecture(ctx: Context, arch: str | None) -> None:
    gguf = gguf_package()
    known = set(gguf.MODEL_ARCH_NAMES.values())
    if arch in known:
        return
    found = repr(arch) if arch is not None else "missing"
    ctx.add(
        "LT313",
        f"general.architecture is {found}: llama.cpp refuses the adapter for every base model "
        "('model arch and LoRA arch mismatch'); it knows the names of the gguf package "
        "(llama, qwen2, gemma...)",
        module=GENERAL_ARCHITECTURE,
        expected="a llama.cpp architecture name",
        found=found,
        hint="re-write the file with the base model's architecture (`loratool convert --to "
        "gguf --base BASE`)",
    )


def _check_alpha(ctx: Context, alpha: float) -> None:
    if not math.isfinite(alpha):
        ctx.add(
            "LT108",
            f"adapter.lora.alpha is {alpha}: every module's scale alpha / r becomes {alpha}",
            module=LORA_ALPHA,
            expected="a finite number",
            found=str(alpha),
            hint="re-write the file with the training alpha (`loratool convert --to gguf`)",
        )
    elif alpha == 0:
        _alpha_means_one(ctx, "0")
    elif alpha < 0:
        ctx.add(
            "LT107",
            f"adapter.lora.alpha is {fmt_number(alpha)}: llama.cpp applies every update with "
            "its sign flipped",
            module=LORA_ALPHA,
            found=fmt_number(alpha),
            hint="negative alphas are almost always a conversion bug",
        )


def _alpha_means_one(ctx: Context, found: str) -> None:
    ctx.add(
        "LT315",
        f"adapter.lora.alpha is {found}: llama.cpp applies scale 1 to every module "
        "(llama_adapter_lora_weight::get_scale: alpha ? alpha / r : 1)",
        module=LORA_ALPHA,
        found=found,
        hint="fine if the factors already carry their scale; else store the training alpha",
    )


# -- structure -----------------------------------------------------------------------------------


def _check_structure(ctx: Context, file: GgufFile) -> set[str]:
    """LT120 / LT112 for tensors that are no factor, LT101-LT104 and LT115 per module, LT114
    without a complete module. Returns the tensors of the modules that cannot be used."""
    pairs: dict[str, dict[str, str]] = {}
    for key in file.tensors:
        parsed = parse_key(key)
        if parsed is not None:
            pairs.setdefault(parsed.stem, {})[parsed.role] = key
        elif key.endswith(NORM_SUFFIX):
            ctx.add(
                "LT112",
                f"tensor {key!r} is a norm vector: llama.cpp skips it without a word (its LoRA "
                "loader does not apply norm vectors yet)",
                module=key,
                hint="the adapter is served without it; merge it into the base if it matters",
            )
        else:
            ctx.add(
                "LT120",
                f"tensor {key!r} ends in neither .lora_a nor .lora_b: {_SOURCE} refuses the "
                "whole file ('unexpected suffix')",
                module=key,
                expected="<base tensor>.lora_a / .lora_b",
                found=key,
                hint="remove the tensor; a LoRA GGUF holds LoRA factors only",
            )
    bad: set[str] = set()
    complete = 0
    for stem, roles in pairs.items():
        if _check_pair(ctx, file, stem, roles):
            complete += 1
        else:
            bad |= set(roles.values())
    if not complete and not any(
        f.rule.code in ("LT101", "LT102", "LT103", "LT104", "LT115") for f in ctx.report.findings
    ):
        ctx.add(
            "LT114",
            f"no complete LoRA module (a .lora_a / .lora_b pair) among {len(file.tensors)} tensors",
            hint="is this a LoRA GGUF? a base model GGUF is no adapter",
        )
    return bad


def _check_pair(ctx: Context, file: GgufFile, stem: str, roles: dict[str, str]) -> bool:
    """One module's pair: both factors, integer types, 2-D shapes, one rank, rank >= 1."""
    if "down" not in roles or "up" not in roles:
        have, lacks = ("lora_a", "lora_b") if "down" in roles else ("lora_b", "lora_a")
        ctx.add(
            "LT101",
            f"module {stem!r} has {have} but no {lacks}: {_SOURCE} refuses the whole file "
            "('LoRA tensor pair is missing one component')",
            module=stem,
            expected="lora_a and lora_b",
            found=have,
            hint="re-export the adapter; the file lost tensors",
        )
        return False
    a, b = file.tensor(roles["down"]), file.tensor(roles["up"])
    ok = True
    for t in (a, b):
        if t.integer:
            ctx.add(
                "LT115",
                f"tensor {t.name!r} has GGML type {t.dtype}; LoRA factors are floating point "
                "or quantized (F32, F16, BF16, Q8_0...)",
                module=stem,
                expected="a float or quantized type",
                found=t.dtype,
            )
            ok = False
    if len(a.shape) != 2 or len(b.shape) != 2:
        ctx.add(
            "LT104",
            f"module {stem!r}: lora_a {fmt_shape(a.shape)} and lora_b {fmt_shape(b.shape)} are "
            "not both matrices; llama.cpp's LoRA factors are 2-D",
            module=stem,
            expected="2-D lora_a and lora_b",
            found=f"{fmt_shape(a.shape)} / {fmt_shape(b.shape)}",
        )
        return False
    embedding = parse_key(roles["down"]).embedding  # type: ignore[union-attr]
    # numpy order: lora_a [r, in] and lora_b [out, r]; the token embedding's lora_a is
    # [n_vocab, r] (its pair is flipped, llm_build_inp_embd)
    rank_a = a.shape[1] if embedding else a.shape[0]
    rank_b = b.shape[1]
    if rank_a != rank_b:
        ctx.add(
            "LT102",
            f"module {stem!r}: lora_a {fmt_shape(a.shape)} has rank {rank_a} but lora_b "
            f"{fmt_shape(b.shape)} has rank {rank_b}"
            + (
                ""
                if embedding
                else f"; {_SOURCE} refuses the file ('lora_a tensor is not transposed')"
            ),
            module=stem,
            expected=f"lora_b.shape[1] == {rank_a}",
            found=str(rank_b),
            hint="the factors come from different adapters or were written transposed; "
            "re-export it with `loratool convert --to gguf`",
        )
        return False
    if rank_a == 0:
        report_rank_zero(ctx, stem)
        return False
    return ok


# -- values --------------------------------------------------------------------------------------


def _check_values(ctx: Context, file: GgufFile, adapter: Adapter) -> None:
    """LT201 per tensor, LT202 / LT203 for all-zero factors and LT204 for update-norm
    outliers, each tensor decoded once."""
    role_of = {
        key: (stem, role) for stem, m in adapter.modules.items() for role, key in m.keys.items()
    }
    total = sum(t.nbytes for t in file.tensors.values())
    if ctx.progress is not None:
        ctx.progress.start(total)
    grams: dict[str, dict[str, np.ndarray | Factor]] = {}
    zero: dict[str, list[str]] = {}
    non_finite: set[str] = set()
    want_norms = "LT204" in ctx.rules
    for t in sorted(file.tensors.values(), key=lambda t: t.offset):
        if t.integer:
            continue
        try:
            values = t.numpy()
        except FormatError as exc:
            ctx.add("LT115", exc.message, module=t.name, found=t.dtype)
            continue
        finally:
            if ctx.progress is not None:
                ctx.progress.advance(t.nbytes)
        stem, role = role_of.get(t.name, (t.name, None))
        flat = values.reshape(-1)
        nan = int(np.count_nonzero(np.isnan(flat)))
        inf = int(np.count_nonzero(np.isinf(flat)))
        if nan or inf:
            non_finite.add(t.name)
            found = " and ".join(
                text for count, text in ((nan, f"{nan} NaN"), (inf, f"{inf} Inf")) if count
            )
            ctx.add(
                "LT201",
                f"tensor {t.name!r} ({t.dtype}) holds {found} of {flat.size} values; llama.cpp "
                "adds them to every output of the layer",
                module=stem,
                expected="finite values",
                found=found,
                hint="the training diverged or the file is corrupt; use an earlier checkpoint",
            )
            continue
        if role is None:
            continue
        if flat.size and not np.any(flat):
            zero.setdefault(stem, []).append(role)
        elif want_norms:
            flipped = role == "down" and adapter.modules[stem].kind == EMBEDDING
            grams.setdefault(stem, {})[role] = _gram(values, role, transposed=flipped)
    report_zero_modules(ctx, adapter, zero)
    if want_norms:
        report_outliers(ctx, adapter, grams, zero, non_finite)


def _gram(values: np.ndarray, role: str, *, transposed: bool) -> np.ndarray | Factor:
    """The ``r x r`` Gram of one factor as decoded (``U^T U`` for up, ``V V^T`` for down;
    ``transposed``: the file stores the down factor transposed, the token embedding's), or the
    factor itself where the rank exceeds its other side (the convention of
    :func:`lora_tools.ops.validate.scan.gram`), in float64."""
    mat = values.astype(np.float64).reshape(values.shape[0], -1)
    if transposed:
        mat = mat.T
    rank, other = (mat.shape[1], mat.shape[0]) if role == "up" else mat.shape
    if rank > other:
        return Factor(mat)
    return mat.T @ mat if role == "up" else mat @ mat.T


# -- base ----------------------------------------------------------------------------------------


def _check_base(ctx: Context, file: GgufFile, adapter: Adapter) -> None:
    """LT406 for another architecture than the base's; LT401 / LT404 for pairs whose base
    tensor the base lacks (llama.cpp: "does not exist in base model"); LT403 for shapes
    llama.cpp's shape check refuses ("has incorrect shape")."""
    base_arch, shapes, where = _base_tensors(ctx, adapter)
    kv = file.kv.get(GENERAL_ARCHITECTURE)
    arch = kv.value if kv is not None and kv.type == "STRING" else None
    if arch is not None and base_arch is not None and arch != base_arch:
        ctx.add(
            "LT406",
            f"general.architecture is {arch!r} but the base {where} is {base_arch!r}: {_SOURCE} "
            "refuses the adapter ('model arch and LoRA arch mismatch')",
            module=GENERAL_ARCHITECTURE,
            expected=repr(base_arch),
            found=repr(arch),
            hint="is this adapter made for this base model?",
        )
    unmatched = []
    for stem, m in adapter.modules.items():
        shape = shapes.get(stem)
        if shape is None:
            unmatched.append(stem)
            continue
        a, b = file.tensor(m.keys["down"]).shape, file.tensor(m.keys["up"]).shape
        # llama.cpp compares GGML dims: the weight's ne = [in, out] against lora_a ne[0] and
        # lora_b ne[1]; the token embedding's ne = [n_embd, n_vocab] against lora_b ne[1]
        # and lora_a ne[1] (numpy order here: the dims reversed)
        want = (a[0], b[0]) if m.kind == EMBEDDING else (b[0], a[1])
        if tuple(shape) != want:
            ctx.add(
                "LT403",
                f"module {stem!r}: lora_a {fmt_shape(a)} and lora_b {fmt_shape(b)} make an update "
                f"of {fmt_shape(want)}, but the base {where} holds {stem} as {fmt_shape(shape)}; "
                f"{_SOURCE} refuses the file ('has incorrect shape')",
                module=stem,
                expected=fmt_shape(shape),
                found=fmt_shape(want),
                hint="is this the right base model?",
            )
    for stem in unmatched:
        ctx.add(
            "LT401",
            f"module {stem!r}: the base {where} has no tensor {stem}; {_SOURCE} refuses the "
            "whole file ('does not exist in base model')",
            module=stem,
            expected="one base tensor",
            found="none",
            hint="is this adapter made for this base model?",
        )
    if adapter.modules and len(unmatched) == len(adapter.modules):
        ctx.add(
            "LT404",
            f"0 of {len(adapter.modules)} modules match this base ({where})",
            expected=f"{len(adapter.modules)} matching modules",
            found="0",
            hint="the adapter was made for another model",
        )


def _base_tensors(
    ctx: Context, adapter: Adapter
) -> tuple[str | None, dict[str, tuple[int, ...]], str]:
    """``(architecture, tensor name -> numpy shape, how messages name the base)`` of the
    ``--base`` as llama.cpp sees it: a GGUF model's own; for a Hugging Face folder, its
    config.json's architecture as llama.cpp converts it and its weights under the names
    llama.cpp's converter gives them (the tied or dropped ``output.weight`` left out, as the
    converted base lacks it)."""
    base = ctx.checkpoint
    if isinstance(base, GgufFile):
        kv = base.kv.get(GENERAL_ARCHITECTURE)
        arch = kv.value if kv is not None and kv.type == "STRING" else None
        return arch, {name: t.shape for name, t in base.tensors.items()}, str(base.path)
    gguf = gguf_package()
    folder = base.path if base.path.is_dir() else base.path.parent
    config = read_base_config(adapter, folder, operation="validate --base")
    spec = ARCHITECTURES[config.hf_arch]
    model_arch = gguf.MODEL_ARCH[spec.gguf_arch]
    names = gguf.get_tensor_name_map(model_arch, config.n_layer)
    shapes: dict[str, tuple[int, ...]] = {}
    for component in base.components.values():
        for key in component:
            name = names.get_name(
                key=key.replace("language_model.", ""), try_suffixes=(".weight", ".bias")
            )
            if name is not None:
                shapes[name] = tuple(component.info(key).shape)
    if config.tied or spec.head_dropped:
        shapes.pop("output.weight", None)
    return gguf.MODEL_ARCH_NAMES[model_arch], shapes, str(base.path)
