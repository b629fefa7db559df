"""``combine``: one adapter whose update is ``sum_i w_i * dW_i``, per module.

Methods (docs/math.md has the derivations):

- ``concat``: exact. ``sum_i w_i s_i U_i V_i = [w_1 s_1 U_1 | ...] @ [V_1; ...]``, so the
  factors are concatenated along the rank axis; rank = sum of ranks; nothing dense is formed.
- ``svd``: the optimal rank-R approximation of the exact weighted sum, from the stacked factors
  (QR of both, SVD of the small core): still never dense.
- ``ties`` (Yadav et al. 2023): on the dense per-module task vectors ``t_i = w_i dW_i``: keep
  each one's top ``density`` fraction of entries by magnitude, elect each entry's sign as the
  sign of the sum of the trimmed values, and average the trimmed values that agree with it
  (disjoint mean). Then truncated to rank R.
- ``dare`` (Yu et al. 2023): drop each entry of each ``dW_i`` with probability ``1 - density``
  and rescale the survivors by ``1 / density`` (seeded), then sum with the weights. Then
  truncated to rank R.

Modules are matched across inputs by component and (flattened) module path, so inputs may be
in different formats; a module present in only some inputs sums only those. Shapes and layer
kinds must agree. Modules of the other adapter types (LoHa, LoKr, Tucker LoCon, full) are first
converted exactly to plain LoRA (:func:`lora_tools.ops.convert.as_lora`: rank ``r1 * r2`` for
a LoHa, ``rank(w1) * rank(w2)`` for a LoKr, the numerical rank of a full diff) and then
combined like any LoRA; types whose update reads the base weight (a weight decomposition, OFT,
IA3, GLoRA) are refused, with ``convert --to lora --base`` as the way. Output modules have scale 1 (alpha = rank; in kohya files one alpha per
component, the scale in the factors) and the first input's format, names and dtypes; the
output config lists every module (see :func:`combined_config`). Inputs that share no layer are
refused (:func:`check_same_model`). DoRA, LyCORIS and inputs with full replacement tensors
(modules_to_save) are refused: their combination is not a sum of low-rank updates.

Example:
    >>> from lora_tools.formats import load_adapter                        # doctest: +SKIP
    >>> a = load_adapter("fixtures/peft/llama-lora")                       # doctest: +SKIP
    >>> res = combine_adapters([a, a], weights=[1.0, -1.0], method="concat")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_tools.adapter import CONV, LINEAR, Adapter, LoraModule
from lora_tools.errors import ShapeError, UnsupportedAdapterError, UsageError
from lora_tools.formats.peft import DIFFUSERS_METADATA_KEY, diffusers_component_configs
from lora_tools.io.safetensors import ArrayTensor
from lora_tools.lowrank import (
    DISTRIBUTIONS,
    dense_low_rank,
    low_rank_approx,
    split_scalar,
    stack_factors,
)
from lora_tools.ops._algebra import (
    TARGETING_FIELDS,
    Progress,
    add_history,
    exact_targets,
    module_identity,
    output_alphas,
    targets_cover,
    with_factors,
)
from lora_tools.results import WrittenResult, adapter_inputs

METHODS = ("concat", "svd", "ties", "dare")


@dataclass(frozen=True)
class ModuleCombine:
    """What combine did for one output module.

    Attributes:
        key: the output module's key.
        inputs: indices of the inputs that hold this module.
        rank: output rank.
        exact_rank: rank of the exact combination before truncation (concat: = rank).
        retained_energy: fraction of ``||combination||_F^2`` kept by the truncation.
        relative_error: ``||combination - output||_F / ||combination||_F``, where combination is
            the weighted sum (concat, svd) or the TIES / DARE result (ties, dare).
    """

    key: str
    inputs: tuple[int, ...]
    rank: int
    exact_rank: int
    retained_energy: float
    relative_error: float

    def as_dict(self) -> dict[str, Any]:
        """The row as in ``combine --json`` (the key is ``module`` there)."""
        row = dataclasses.asdict(self)
        return {"module": row.pop("key"), **row, "inputs": list(self.inputs)}


@dataclass(frozen=True, repr=False)
class CombineResult(WrittenResult):
    """The combined adapter and one row per output module (``weights``: one per input)."""

    command = "combine"

    adapter: Adapter
    modules: tuple[ModuleCombine, ...] = ()
    method: str = "concat"
    weights: tuple[float, ...] = ()
    #: what the conversion of other types said (a LoHa convolution without its kernel...).
    notes: tuple[str, ...] = ()

    def fields(self) -> dict[str, Any]:
        return {
            "format": self.adapter.format,
            "method": self.method,
            "weights": list(self.weights),
            "counts": {"modules": len(self.modules)},
            "modules": [row.as_dict() for row in self.modules],
            "notes": list(self.notes),
        }


def _check_inputs(adapters: list[Adapter], weights: list[float]) -> None:
    if len(adapters) < 1:
        raise UsageError("combine needs at least one input adapter")
    if len(weights) != len(adapters):
        raise UsageError(
            f"{len(weights)} weight{'s' * (len(weights) != 1)} for {len(adapters)} "
            f"input{'s' * (len(adapters) != 1)}",
            hint="give one weight per input: --weights 1,0.5,...",
        )
    if not all(np.isfinite(w) for w in weights):
        raise UsageError(
            f"weights must be finite numbers, got {weights}",
            hint="give each weight as a finite number such as 0.8 or -0.5",
        )
    for a in adapters:
        a.require_plain_lora("combine")
        a.require_known_scale("combine")
        a.require_no_dora("combine")
        diffs = [k for k, m in a.modules.items() if m.bias_diff is not None]
        if diffs:
            raise UnsupportedAdapterError(
                f"{len(diffs)} modules carry a bias difference (.diff_b, e.g. {diffs[0]!r}); "
                "combine builds new factors and has no place for them",
                path=a.source,
                hint="merge the adapters into the base instead (loratool merge takes several)",
                kind="unsupported-type",
            )
        if a.passthrough:
            name = next(iter(a.passthrough))
            raise UnsupportedAdapterError(
                f"holds {len(a.passthrough)} full tensors (e.g. {name!r}: modules_to_save or a "
                "saved layer) that replace base weights; replacements cannot be summed like "
                "low-rank updates",
                path=a.source,
                hint="merge such adapters into the base with `loratool merge` instead",
                kind="unsupported-type",
            )


def _plain(adapter: Adapter, base: Any = None) -> tuple[Adapter, tuple[str, ...]]:
    """``adapter`` with its modules of other types as their exact plain LoRA (laid out as
    the ``base`` checkpoint's weights when given), and the conversion's notes."""
    if not adapter.deltas:
        return adapter, ()
    from lora_tools.ops.to_lora import as_lora

    out, _, notes = as_lora(adapter, None, base=base, operation="combine")
    return out, notes


def match_modules(
    adapters: list[Adapter],
) -> dict[tuple[str | None, str], list[tuple[int, LoraModule]]]:
    """Group modules of all inputs by layer: identity -> [(input index, module)], first-seen order.

    A module without a component (a plain PEFT adapter) matches the one component that holds
    the same path in another input (a diffusers or kohya file for the same model).
    """
    groups: dict[tuple[str | None, str], list[tuple[int, LoraModule]]] = {}
    for i, a in enumerate(adapters):
        for m in a.modules.values():
            groups.setdefault(module_identity(m), []).append((i, m))
    by_flat: dict[str, list[tuple[str | None, str]]] = {}
    for ident in groups:
        by_flat.setdefault(ident[1], []).append(ident)
    for idents in by_flat.values():
        named = [x for x in idents if x[0] is not None]
        if (None, idents[0][1]) in idents and len(named) == 1:
            loose = groups.pop((None, idents[0][1]))
            groups[named[0]] = sorted(groups[named[0]] + loose, key=lambda t: t[0])
    return groups


def _adopt_kernel(members: list[tuple[int, LoraModule]]) -> None:
    """Lay a module out as a convolution where another input's module of the same layer says
    its kernel and the flattened updates agree: a LoHa stores a convolution's kernel
    flattened, so its exact LoRA is ``[out, in * kh * kw]`` until a base tells the kernel."""
    conv = next((m for _, m in members if m.kind == CONV), None)
    if conv is None:
        return
    shape = conv.delta_shape
    flat = (shape[0], math.prod(shape[1:]))
    for n, (i, m) in enumerate(members):
        if m.kind == LINEAR and m.delta_shape == flat:
            r = m.rank
            down = ArrayTensor(m.down.numpy().reshape(r, *shape[1:]), m.down.dtype)
            up = ArrayTensor(m.up.numpy().reshape(shape[0], r, *[1] * (len(shape) - 2)), m.up.dtype)
            members[n] = (i, dataclasses.replace(m, down=down, up=up, kind=CONV))


def _check_shapes(adapters: list[Adapter], members: list[tuple[int, LoraModule]]) -> None:
    i0, m0 = members[0]
    for i, m in members[1:]:
        if m.kind != m0.kind or m.delta_shape != m0.delta_shape:
            raise ShapeError(
                f"module {m0.key!r}: {m0.kind} update {list(m0.delta_shape)} in "
                f"{adapters[i0].name} but {m.kind} update {list(m.delta_shape)} in "
                f"{adapters[i].name} ({m.key!r})",
                hint="combine adapters trained for the same base model",
            )


def combine_adapters(
    adapters: list[Adapter],
    *,
    weights: list[float] | None = None,
    method: str = "concat",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    distribute: str = "sqrt",
    base: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> CombineResult:
    """Combine adapters into one whose update is the weighted sum (see the module docstring).

    Args:
        adapters: the inputs (not modified); the first one gives the output's format and names.
        weights: one per input (default all 1); may be negative.
        method: ``concat``, ``svd``, ``ties`` or ``dare``.
        rank: output rank for svd / ties / dare (default: per module, the largest input rank).
        density: fraction of entries kept by ties / dare, in (0, 1].
        seed: seed of dare's random drop.
        distribute: how singular values are split between factors (svd / ties / dare).
        base: the base checkpoint, for inputs of other types whose update reads it, and to
            lay out LoHa / LoKr convolutions whose tensors flatten the kernel.
        progress: optional ``progress(done, total)`` callback.

    Returns:
        A :class:`CombineResult`.

    Raises:
        UsageError: bad method, weights, rank or density.
        ShapeError: a module has different shapes in two inputs.
        UnsupportedAdapterError: DoRA, LyCORIS or full replacement tensors in an input.
    """
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if distribute not in DISTRIBUTIONS:
        raise UsageError(f"--distribute must be one of {', '.join(DISTRIBUTIONS)}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise UsageError(f"--rank must be an integer >= 1, got {rank!r}")
    if method == "concat" and rank is not None:
        raise UsageError("--rank does not apply to --method concat (its rank is the sum)")
    if method in ("ties", "dare"):
        if density is None:
            raise UsageError(f"--method {method} needs --density (fraction of entries kept)")
        if not 0 < density <= 1:
            raise UsageError(f"--density must be in (0, 1], got {density}")
    elif density is not None:
        raise UsageError("--density applies to --method ties and dare only")
    plain = [_plain(a, base) for a in adapters]
    adapters = [a for a, _ in plain]
    notes = tuple(dict.fromkeys(note for _, found in plain for note in found))
    _check_inputs(adapters, weights)

    first = adapters[0]
    groups = match_modules(adapters)
    for members in groups.values():
        _adopt_kernel(members)
        _check_shapes(adapters, members)
    check_same_model(adapters, groups)
    loose = _loose_components(adapters, groups)
    rows: list[ModuleCombine] = []
    built: list[tuple[LoraModule, np.ndarray, np.ndarray, np.ndarray | None]] = []
    for n, (ident, members) in enumerate(groups.items()):
        template = _template(first, members, ident[0] or loose.get(members[0][0]))
        terms = [(m.finite_factors(), weights[i] * m.scale, m) for i, m in members]
        if method == "concat":
            up, down, row = _concat(terms)
        elif method == "svd":
            up, down, row = _svd(terms, rank, distribute)
        else:
            dense = _dense_combination(method, members, weights, density, seed)
            k = rank or max(m.rank for _, m in members)
            lr = dense_low_rank(dense, k, distribute=distribute)
            up, down = lr.up, lr.down
            row = (lr.k, numerical_rank(lr.S), lr.retained_energy, lr.relative_error)
        built.append((template, up, down, _bias_sum(terms)))
        rows.append(ModuleCombine(template.key, tuple(i for i, _ in members), *row))
        if progress is not None:
            progress(n + 1, len(groups))
    modules: dict[str, LoraModule] = {}
    alphas = output_alphas(first.format, [(t, up.shape[1]) for t, up, _, _ in built])
    for (template, up, down, bias), alpha in zip(built, alphas, strict=True):
        # The factors hold the update at scale 1; a module written with another scale
        # (alpha / k) takes its inverse into the factors, rounded once with them.
        c_up, c_down = split_scalar(up.shape[1] / alpha)
        new = with_factors(template, up * c_up, down * c_down, alpha=alpha, rslora=False, bias=bias)
        modules[new.key] = new

    out = dataclasses.replace(
        first,
        modules=modules,
        passthrough={},
        metadata=_metadata(adapters, modules),
        config=_config(adapters, modules),
    )
    add_history(
        out,
        "combine",
        method=method,
        weights=weights,
        inputs=[a.name for a in adapters],
        rank=rank,
        density=density,
        seed=seed if method == "dare" else None,
    )
    return CombineResult(
        out,
        tuple(rows),
        method,
        tuple(weights),
        notes,
        source_inputs=tuple(ref for a in adapters for ref in adapter_inputs(a)),
    )


def _template(
    first: Adapter, members: list[tuple[int, LoraModule]], component: str | None
) -> LoraModule:
    """The module that names the output: the first input's, else the first holder's, renamed
    for the first input's format (its own keys are in another format) and placed in
    ``component`` (a PEFT file holds one model and names no component)."""
    i, m = members[0]
    if i == 0:
        return m
    if m.path is None and first.format != "kohya":
        raise UsageError(
            f"module {m.key!r} exists only in a kohya input and has no module path, so it "
            f"cannot be named in the first input's format ({first.format})",
            hint="convert the kohya input with `loratool convert --to "
            f"{first.format} --base BASE` first, or list it first",
        )
    if first.format == "peft":
        component = None
    return dataclasses.replace(m, keys={}, alpha_tensor=None, component=component)


def _blocks(ident: tuple[str | None, str]) -> str:
    """The stack of repeated blocks a module sits in: its flattened path up to the first layer
    index (``model_layers``, ``down_blocks``, ``transformer_h``), else its parent. Adapters of
    one model for different layers (``layers_to_transform``) share it."""
    parts = ident[1].split("_")
    for n, part in enumerate(parts):
        if part.isdigit():
            return "_".join(parts[:n])
    return "_".join(parts[:-1])


def _dims(modules: list[LoraModule]) -> set[int]:
    return {d for m in modules for d in (m.in_features, m.out_features)}


def check_same_model(
    adapters: list[Adapter],
    groups: dict[tuple[str | None, str], list[tuple[int, LoraModule]]],
) -> None:
    """Refuse inputs that cannot be adapters of one model, naming both files.

    Each input after the first must share a layer with an earlier input, or at least a stack of
    blocks (``model.layers``: an attention and an MLP adapter of one model, or adapters of
    different layers) and then a layer width: a model's blocks share their hidden size.
    Modules that share a layer already had their shapes compared.
    """
    held: list[set[tuple[str | None, str]]] = [set() for _ in adapters]
    for ident, members in groups.items():
        for i, _ in members:
            held[i].add(ident)
    for i in range(1, len(adapters)):
        if any(held[i] & held[j] for j in range(i)):
            continue
        blocks = {_blocks(x) for x in held[i]}
        dims = _dims([m for x in held[i] for j, m in groups[x] if j == i])
        for j in range(i):
            if blocks & {_blocks(x) for x in held[j]} and dims & _dims(
                [m for x in held[j] for k, m in groups[x] if k == j]
            ):
                break
        else:
            mine = next(m for x in groups for j, m in groups[x] if j == i)
            theirs = next(m for x in groups for j, m in groups[x] if j == 0)
            raise ShapeError(
                f"{adapters[i].name} and {adapters[0].name} share no layer (e.g. "
                f"{mine.full_path or mine.key!r} {list(mine.delta_shape)} and "
                f"{theirs.full_path or theirs.key!r} {list(theirs.delta_shape)}): they are "
                "adapters for different models",
                hint="combine adapters trained for the same base model",
                kind="different-models",
            )


def _loose_components(
    adapters: list[Adapter],
    groups: dict[tuple[str | None, str], list[tuple[int, LoraModule]]],
) -> dict[int, str | None]:
    """For each input without components (plain PEFT): the component its modules matched in
    the other inputs, when that is one component (its unmatched modules go there too).

    Raises:
        UsageError: a PEFT output would hold modules of several components.
    """
    out: dict[int, str | None] = {}
    for i, a in enumerate(adapters):
        if any(m.component is not None for m in a.modules.values()):
            continue
        comps = {ident[0] for ident, members in groups.items() if any(j == i for j, _ in members)}
        named = sorted(c for c in comps if c is not None)
        out[i] = named[0] if len(named) == 1 else None
    if adapters[0].format == "peft":
        comps = {ident[0] or out.get(members[0][0]) for ident, members in groups.items()}
        named = sorted(c for c in comps if c is not None)
        if len(named) > 1:
            raise UsageError(
                f"the inputs hold modules of {len(named)} pipeline components "
                f"({', '.join(named)}), and the output takes the first input's format, PEFT, "
                "which holds one model",
                path=adapters[0].source,
                hint="list a diffusers or kohya input first, or convert the others to PEFT "
                "one component at a time with `loratool convert` first",
            )
    return out


def numerical_rank(values: np.ndarray) -> int:
    """How many singular values are above the round-off floor ``1e-12 * S_0``."""
    if len(values) == 0:
        return 0
    return int(np.count_nonzero(values > values[0] * 1e-12))


def _bias_sum(terms: list[tuple[Any, float, LoraModule]]) -> np.ndarray | None:
    """``sum_i w_i s_i bias_i`` (PEFT adds scale * bias), for an output of scale 1 (a module
    written with another scale keeps this bias: lora_tools writes no bias to kohya files)."""
    parts = [c * np.asarray(m.bias.numpy(), np.float64) for _, c, m in terms if m.bias is not None]
    return np.sum(parts, axis=0) if parts else None


def _concat(terms: list) -> tuple[np.ndarray, np.ndarray, tuple]:
    ups, downs = [], []
    for (U, V), c, _ in terms:
        c_up, c_down = split_scalar(c)
        ups.append(U * c_up)
        downs.append(V * c_down)
    up, down = np.concatenate(ups, axis=1), np.concatenate(downs, axis=0)
    rank = up.shape[1]
    return up, down, (rank, rank, 1.0, 0.0)


def _svd(terms: list, rank: int | None, distribute: str) -> tuple:
    U, V = stack_factors([(U, V, c) for (U, V), c, _ in terms])
    k = rank or max(m.rank for _, _, m in terms)
    lr = low_rank_approx(U, V, 1.0, k, distribute=distribute)
    return lr.up, lr.down, (lr.k, numerical_rank(lr.S), lr.retained_energy, lr.relative_error)


def _dense_combination(
    method: str,
    members: list[tuple[int, LoraModule]],
    weights: list[float],
    density: float | None,
    seed: int,
) -> np.ndarray:
    """The TIES or DARE combination of the members' dense updates (factor-matrix layout)."""
    assert density is not None
    if method == "ties":
        return ties([weights[i] * _dense(m) for i, m in members], density)
    ident = "/".join(str(x) for x in module_identity(members[0][1]))
    # One generator per (seed, module, input): the drop pattern of a module does not depend on
    # which other modules or inputs exist, or their order.
    parts = []
    for i, m in members:
        rng = np.random.default_rng([seed, zlib.crc32(ident.encode()), i])
        parts.append(weights[i] * dare(_dense(m), density, rng))
    return np.sum(parts, axis=0)


def _dense(m: LoraModule) -> np.ndarray:
    U, V = m.finite_factors()
    return (U * m.scale) @ V


def ties(task_vectors: list[np.ndarray], density: float) -> np.ndarray:
    """TIES-merging (Yadav et al. 2023) of task vectors, without the final ``lambda``.

    1. Trim: in each ``t_i`` keep the ``round(density * size)`` entries of largest magnitude.
    2. Elect: ``sign = sign(sum_i trimmed_i)`` per entry.
    3. Disjoint mean: per entry, the mean of the trimmed values whose sign equals the elected
       sign (entries where none agrees are 0).

    Example:
        >>> ties([np.array([3.0, -1.0]), np.array([1.0, 2.0])], 1.0).tolist()
        [2.0, 2.0]
    """
    trimmed = [_trim(t, density) for t in task_vectors]
    stacked = np.stack(trimmed)
    sign = np.sign(stacked.sum(axis=0))
    agree = (np.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(axis=0)
    total = np.where(agree, stacked, 0.0).sum(axis=0)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def _trim(t: np.ndarray, density: float) -> np.ndarray:
    flat = t.ravel()
    keep = round(density * flat.size)
    if keep >= flat.size:
        return t.copy()
    out = np.zeros_like(flat)
    if keep > 0:
        idx = np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep :]
        out[idx] = flat[idx]
    return out.reshape(t.shape)


def dare(delta: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE (Yu et al. 2023): drop each entry with probability ``1 - density``, rescale the rest
    by ``1 / density`` (so the expectation is unchanged).

    Example:
        >>> dare(np.ones(4), 1.0, np.random.default_rng(0)).tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    keep = rng.random(delta.shape) < density
    return np.where(keep, delta / density, 0.0)


def _config(adapters: list[Adapter], modules: dict[str, LoraModule]) -> dict[str, Any] | None:
    """The first input's config, describing every module the output holds.

    ``target_modules`` (and the fields that narrow it) stay when every input has the same ones
    and they cover every output module; otherwise they become the exact list of module paths,
    as PEFT saves ``all-linear``: a name that is missing makes PEFT drop that module's tensors,
    and a broader one makes it create layers the file has no tensors for.
    """
    first = adapters[0]
    if first.config is None:
        return None
    configs = [a.config for a in adapters]
    return combined_config(first.config, configs, list(modules.values()))


def combined_config(
    config: dict[str, Any], configs: list[dict[str, Any] | None], modules: list[LoraModule]
) -> dict[str, Any]:
    """``config`` with its targeting and per-module fields made true for ``modules``.

    ``configs`` are the inputs' configs (None for formats without one).
    """
    out = dict(config)
    same = all(
        c is not None and all(c.get(f) == config.get(f) for f in TARGETING_FIELDS) for c in configs
    )
    paths = [m.path or m.key for m in modules]
    if not (same and all(targets_cover(config.get("target_modules"), p) for p in paths)):
        out.update(exact_targets(modules))
    if any(bool((c or {}).get("fan_in_fan_out")) for c in configs):
        out["fan_in_fan_out"] = True
    out["lora_bias"] = any(m.bias is not None for m in modules)
    out["use_dora"] = False
    return out


def _metadata(adapters: list[Adapter], modules: dict[str, LoraModule]) -> dict[str, str]:
    """The first input's metadata; a diffusers first input's per-component configs describe
    every output module (see :func:`combined_config`)."""
    first = adapters[0]
    metadata = dict(first.metadata)
    existing = diffusers_component_configs(metadata)
    if first.format != "diffusers" or not existing:
        return metadata
    by_component: dict[str, list[LoraModule]] = {}
    for m in modules.values():
        by_component.setdefault(m.component or "transformer", []).append(m)
    inputs = [diffusers_component_configs(a.metadata) for a in adapters]
    flat: dict[str, Any] = {}
    for component, members in by_component.items():
        base = existing.get(component)
        if base is None:
            continue  # the writer describes a new component from its modules
        config = combined_config(base, [c.get(component) for c in inputs], members)
        flat.update({f"{component}.{k}": v for k, v in config.items()})
    metadata[DIFFUSERS_METADATA_KEY] = json.dumps(flat, sort_keys=True)
    return metadata


__all__ = ["METHODS", "CombineResult", "ModuleCombine", "combine_adapters", "dare", "ties"]
