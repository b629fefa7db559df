"""Value rules (``LT2xx``): NaN/Inf, all-zero factors (LoRA's, and the tensors whose product
is another type's update), update-norm outliers and ``sshs_model_hash``, from one streaming
pass over the data buffer (arithmetic in :mod:`lora_tools.ops.validate.scan`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter

import numpy as np

from lora_tools.adapter import Adapter
from lora_tools.constants import ZERO_MODULES_KEY
from lora_tools.deltas import FULL, LOHA, LOKR, TUCKER_LOCON, DeltaModule
from lora_tools.io.safetensors import Header, SafetensorsFile, TensorSpec, reference_order
from lora_tools.ops.inspect import robust_outliers
from lora_tools.ops.validate.context import Context
from lora_tools.ops.validate.scan import Factor, TensorScan, frobenius_squared, gram

#: Modified z-score (log10 of the update norm) above which a module is an extreme outlier. The
#: inspect view flags at 3.5; validate fails builds, so it only speaks up for a far larger gap
#: (with typical spreads, an order of magnitude away from the median).
OUTLIER_Z = 8.0
#: ...and only when the norm is at least this many times above (or below) the median, so that a
#: file whose modules are all alike (tiny MAD) does not turn small differences into findings.
OUTLIER_MIN_RATIO = 10.0
#: Per type, the tensors whose product is the update: one all-zero makes it exactly zero (a
#: Hadamard, Kronecker or Tucker product). A full diff is zero when its ``diff`` is (and its bias
#: difference, if any). A weight-decomposed module is never zero by its factors alone: its
#: ``dora_scale`` renormalises the base weight whatever the update.
PRODUCT_ROLES: dict[str, frozenset[str]] = {
    LOHA: frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    LOKR: frozenset(
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    ),
    TUCKER_LOCON: frozenset({"lora_up", "lora_down", "lora_mid"}),
}


def _zero_by_product(m: DeltaModule, zero_roles: set[str]) -> list[str]:
    """The roles of ``m`` whose all-zero values make its update exactly zero (empty: not
    zero)."""
    if m.dora_scale is not None:
        return []
    if m.type == FULL:
        bias = m.keys.get("diff_b")
        return ["diff"] if "diff" in zero_roles and (bias is None or "diff_b" in zero_roles) else []
    return sorted(zero_roles & PRODUCT_ROLES.get(m.type, frozenset()))


def check_values(ctx: Context, adapter: Adapter, header: Header, clean: bool) -> None:
    """The value rules (LT201-LT206) in one pass over the data in file order: each byte read
    once, in bounded chunks.

    Args:
        ctx: the target's context (its weights file is read).
        adapter: the adapter read from the weights; its factors are the modules scanned.
        header: the trusted tensors; only these are read.
        clean: the container had no problem at all, so the data buffer can be hashed as a
            whole against ``sshs_model_hash``.
    """
    assert ctx.target.weights is not None
    factor_role: dict[str, tuple[str, str]] = {}
    delta_role = {
        key: (stem, role) for stem, m in adapter.deltas.items() for role, key in m.keys.items()
    }
    stored_transposed: set[str] = set()  # factors the file stores transposed (mlx-lm)
    for stem, m in adapter.modules.items():
        factor_role[m.keys.get("down", "")] = (stem, "down")
        factor_role[m.keys.get("up", "")] = (stem, "up")
        for role in ("down", "up"):
            if getattr(getattr(m, role), "inner", None) is not None:
                stored_transposed.add(m.keys.get(role, ""))
    hash_rules = {"LT205", "LT206"} & ctx.rules
    expected_hash = adapter.metadata.get("sshs_model_hash") if hash_rules else None
    digest = hashlib.sha256() if expected_hash and clean else None

    grams: dict[str, dict[str, np.ndarray | Factor]] = {}
    # The Grams are the only O(size * rank) work of the pass: skip them unless LT204 runs.
    want_norms = "LT204" in ctx.rules
    zero: dict[str, list[str]] = {}
    delta_zero: dict[str, set[str]] = {}  # modules of other types: their all-zero tensors
    non_finite: set[str] = set()
    scan = SafetensorsFile(ctx.target.weights, header=header)
    total = sum(info.nbytes for info in header.tensors.values())
    if ctx.progress is not None:
        ctx.progress.start(total)
    try:
        for info in sorted(header.tensors.values(), key=lambda i: i.begin):
            role = factor_role.get(info.name)
            stem_of_alpha = info.name.removesuffix(".alpha")
            already = stem_of_alpha != info.name and stem_of_alpha in ctx.nonfinite_alphas
            chunk = max(info.nbytes, 1) if role else ctx.chunk_bytes
            state = TensorScan(info.dtype)
            for raw in scan.iter_raw(info.name, chunk):
                if digest is not None:
                    digest.update(raw)
                state.feed(raw)
                if role is not None and state.finite and want_norms:
                    grams.setdefault(role[0], {})[role[1]] = gram(
                        raw, info, role[1], transposed=info.name in stored_transposed
                    )
                if ctx.progress is not None:
                    ctx.progress.advance(len(raw))
            if (state.nan or state.inf) and not already:
                non_finite.add(info.name)
                ctx.add(
                    "LT201",
                    f"tensor {info.name!r} holds {state.describe()} of {info.numel} values; "
                    "merging it makes the base weights non-finite",
                    module=role[0] if role else delta_role.get(info.name, (info.name,))[0],
                    expected="finite values",
                    found=state.describe(),
                    hint="the training diverged or the file is corrupt; use an earlier checkpoint",
                )
            if role is not None and state.all_zero and info.numel:
                zero.setdefault(role[0], []).append(role[1])
            elif info.name in delta_role and state.all_zero and info.numel:
                stem, part = delta_role[info.name]
                delta_zero.setdefault(stem, set()).add(part)
    finally:
        scan.close()

    for stem, parts in delta_zero.items():
        killing = _zero_by_product(adapter.deltas[stem], parts)
        if killing:
            zero[stem] = killing
    report_zero_modules(ctx, adapter, zero)
    report_outliers(ctx, adapter, grams, zero, non_finite)
    if digest is not None and expected_hash is not None:
        _check_model_hash(ctx, header, expected_hash, digest.hexdigest())


def _check_model_hash(ctx: Context, header: Header, expected: str, buffer_sha256: str) -> None:
    """LT205 / LT206: ``sshs_model_hash`` against the tensors, in the convention that wrote it.

    - sd-scripts (``library/train_util.py`` ``precalculate_safetensors_hashes``): 64 hex digits,
      the sha256 of the data buffer of ``safetensors.torch.save(tensors)``, i.e. of every
      tensor's bytes in the reference writer's order. A file in that order hashes its own data
      buffer (the digest of the single pass); a file in another order is hashed once more in
      the reference order before it is called changed.
    - LyCORIS (``lycoris/utils`` ``precalculate_safetensors_hashes``): ``"0x"`` + the sha256 of
      each tensor's bytes in the training network's state-dict order. The file does not record
      that order; only when it happens to be the file's own order can the hash be checked.

    A hash loratool cannot reproduce is reported as LT206 (info), never as a mismatch.
    """
    value = expected.strip().lower()
    if re.fullmatch(r"[0-9a-f]{64}", value):
        if value == buffer_sha256 or value == _reference_order_sha256(ctx, header, buffer_sha256):
            return
        ctx.add(
            "LT205",
            f"sshs_model_hash is {expected} but the tensors hash to {buffer_sha256} "
            "(sd-scripts' convention: sha256 of the data buffer): the tensors changed after "
            "the hash was written, or the file is corrupt",
            module="__metadata__[sshs_model_hash]",
            expected=buffer_sha256,
            found=expected,
            hint="re-save with a tool that refreshes the hash (loratool does), or drop "
            "sshs_model_hash and sshs_legacy_hash",
        )
        return
    if re.fullmatch(r"0x[0-9a-f]{64}", value):
        if value[2:] == buffer_sha256:
            return
        ctx.add(
            "LT206",
            f"sshs_model_hash {expected} follows LyCORIS' convention (sha256 of the tensors "
            "in the training network's state-dict order, which the file does not record): "
            "not checked",
            module="__metadata__[sshs_model_hash]",
            found=expected,
        )
        return
    ctx.add(
        "LT206",
        f"sshs_model_hash {expected!r} follows no convention loratool can reproduce "
        "(sd-scripts: 64 hex digits; LyCORIS: 0x + 64 hex digits): not checked",
        module="__metadata__[sshs_model_hash]",
        found=expected,
    )


def _reference_order_sha256(ctx: Context, header: Header, buffer_sha256: str) -> str:
    """sha256 of the tensors' bytes in the reference writer's order (sd-scripts' data buffer);
    the single pass's digest when the file is already in that order."""
    by_offset = sorted(header.tensors.values(), key=lambda i: i.begin)
    specs = reference_order(TensorSpec(i.name, i.dtype, i.shape) for i in by_offset)
    if [s.name for s in specs] == [i.name for i in by_offset]:
        return buffer_sha256
    assert ctx.target.weights is not None
    digest = hashlib.sha256()
    with SafetensorsFile(ctx.target.weights, header=header) as file:
        for spec in specs:
            for raw in file.iter_raw(spec.name, ctx.chunk_bytes):
                digest.update(raw)
    return digest.hexdigest()


def added_zero_modules(adapter: Adapter) -> set[str]:
    """The modules loratool added with zero factors on purpose (:data:`ZERO_MODULES_KEY`).

    A malformed value marks nothing: LT203 then reports those modules as it would without it.
    """
    raw = adapter.metadata.get(ZERO_MODULES_KEY)
    if not raw:
        return set()
    try:
        keys = json.loads(raw)
    except ValueError:
        return set()
    return {k for k in keys if isinstance(k, str)} if isinstance(keys, list) else set()


def report_zero_modules(ctx: Context, adapter: Adapter, zero: dict[str, list[str]]) -> None:
    """LT202 when every module's update is zero, else LT203 per module (``zero``: stem -> the
    roles found all-zero), leaving out the modules loratool added on purpose; the GGUF rules
    share it."""
    modules = {**adapter.modules, **adapter.deltas}
    if not zero:
        return
    added = added_zero_modules(adapter)
    names: dict[str, str] = {"down": "down (lora_A)", "up": "up (lora_B)"}
    for stem in zero:
        if stem in adapter.deltas:
            names.update((role, role) for role in zero[stem])
    if len(zero) == len(modules):
        roles = Counter(r for rs in zero.values() for r in rs)
        which = " and ".join(f"{names[r]} x{n}" for r, n in roles.items())
        ctx.add(
            "LT202",
            f"every one of the {len(modules)} modules has an all-zero factor ({which}): the "
            "update is exactly zero, as saved right after initialisation, before training",
            expected="trained (non-zero) factors",
            found=f"{len(zero)} of {len(modules)} modules zero",
            hint="save the adapter after training; PEFT initialises lora_B to zero",
        )
        return
    for stem, roles in zero.items():
        if stem in added:
            continue
        kind = f"{adapter.deltas[stem].type} module" if stem in adapter.deltas else "module"
        ctx.add(
            "LT203",
            f"{kind} {stem!r} has an all-zero {' and '.join(names[r] for r in roles)}: its "
            "update is exactly zero",
            module=stem,
            hint="this module learned nothing; drop it or check the training setup",
        )


def report_outliers(
    ctx: Context,
    adapter: Adapter,
    grams: dict[str, dict[str, np.ndarray | Factor]],
    zero: dict[str, list[str]],
    non_finite: set[str],
) -> None:
    """LT204 for update norms far from the file's median, from each module's two Grams
    (``grams``: stem -> role -> :func:`~lora_tools.ops.validate.scan.gram`); the GGUF rules
    share it."""
    stems, norms = [], []
    for stem, m in adapter.modules.items():
        pair = grams.get(stem, {})
        if stem in zero or len(pair) != 2 or any(k in non_finite for k in m.keys.values()):
            continue
        if m.alpha_unknown is not None:
            continue  # LT301 says the scale is unknown; so is the norm
        scale = m.scale
        value = frobenius_squared(pair["up"], pair["down"]) * scale * scale
        if not math.isfinite(value):
            continue
        stems.append(stem)
        norms.append(math.sqrt(max(value, 0.0)))
    flags = robust_outliers(norms, threshold=OUTLIER_Z)
    positive = [n for n in norms if n > 0]
    median = float(np.median(positive)) if positive else 0.0
    for stem, norm, flag in zip(stems, norms, flags, strict=True):
        ratio = norm / median if median else float("inf")
        if not flag or 1 / OUTLIER_MIN_RATIO < ratio < OUTLIER_MIN_RATIO:
            continue
        ctx.add(
            "LT204",
            f"module {stem!r} has update norm ||dW||_F = {norm:.4g}, {ratio:.3g}x the "
            f"median {median:.4g} of the file's {len(norms)} modules",
            module=stem,
            expected=f"about {median:.4g}",
            found=f"{norm:.4g}",
            hint="a diverged module or a wrong alpha; inspect it with `loratool inspect --stats`",
        )
