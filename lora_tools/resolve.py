"""Resolve adapter modules to the base weights they update, and check that the shapes fit.

- PEFT paths (``base_model.model.`` stripped) name base keys directly: ``<path>.weight``.
- Component-prefixed keys (``unet.``, ``text_encoder.``...) go to the matching subfolder of a
  diffusers folder.
- kohya names (``lora_unet_...``) are matched by flattening every base key the way kohya does
  (``.`` -> ``_``) after removing the usual single-file prefixes (``model.diffusion_model.``,
  ``conditioner.embedders.0.transformer.``, ``cond_stage_model.transformer.``...).
- A model in a layout (:mod:`lora_tools.layouts`: found from a single file's own keys under
  each prefix, or from a diffusers component's ``config.json``) is also indexed under its names
  in the other layout: an original-layout UNet (``input_blocks.1.1.proj_in``) under its diffusers
  names (``down_blocks.0.attentions.0.proj_in``), a diffusers Flux transformer under its BFL
  names, and so on. Where the other layout fuses weights, a module is placed on row ranges
  (:class:`Part` with :class:`Rows`): a diffusers ``to_k`` on rows ``h:2h`` of a native
  ``qkv``, a native ``qkv`` on diffusers ``to_q`` / ``to_k`` / ``to_v``; the update's rows must
  fill the ranges exactly, or the module is a shape error.

The modules of the other adapter types loratool computes (:attr:`Adapter.deltas`: LoHa, LoKr,
Tucker LoCon, full diff, kohya DoRA...) resolve the same way, fused rows included, their shape
checked from the type's update (:func:`fit_delta`).

A module that resolves to nothing, or to more than one weight, is reported by name; nothing is
guessed. ``fit`` decides the layout per module from the base tensor's shape: GPT-2 style Conv1D
weights are stored ``[in, out]`` (PEFT's fan_in_fan_out), embeddings take the transposed update,
and linear LoRAs on 1x1 convolutions are reshaped.

Example:
    >>> from lora_tools.formats import load_adapter                      # doctest: +SKIP
    >>> from lora_tools.io.checkpoint import open_checkpoint             # doctest: +SKIP
    >>> res = resolve(load_adapter("fixtures/kohya/sd-lora.safetensors"),
    ...               open_checkpoint("fixtures/bases/tiny-sd"))         # doctest: +SKIP
    >>> len(res.matches), res.unmatched                                  # doctest: +SKIP
    (20, [])
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tools.adapter import CONV, EMBEDDING, Adapter, LoraModule
from lora_tools.deltas import DeltaError, DeltaModule
from lora_tools.errors import ResolveError, ShapeError
from lora_tools.formats.base import classify_foreign
from lora_tools.formats.peft import VARIANT_KINDS
from lora_tools.io.checkpoint import Checkpoint, Component
from lora_tools.io.safetensors import Tensor, TensorInfo
from lora_tools.layouts import Layout, Piece, diffusers_layout, native_layout
from lora_tools.layouts.base import tiles
from lora_tools.naming import PEFT_PREFIX, flatten_path, split_name, split_stem

#: Single-file key prefixes -> the component they hold, tried in order (longest first).
SINGLE_FILE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("conditioner.embedders.0.transformer.", "text_encoder"),
    ("conditioner.embedders.1.model.", "text_encoder_2"),
    ("cond_stage_model.transformer.", "text_encoder"),
    ("cond_stage_model.model.", "text_encoder"),
    ("text_encoders.clip_l.transformer.", "text_encoder"),
    ("text_encoders.clip_g.transformer.", "text_encoder_2"),
    ("text_encoders.t5xxl.transformer.", "text_encoder_3"),
    ("model.diffusion_model.", "unet"),
    ("diffusion_model.", "unet"),
    ("model.", "unet"),
    ("", "unet"),
)
#: Components a kohya ``lora_unet_`` module may live in.
_DENOISERS = ("unet", "transformer")
#: transformers model types whose Linear-like layers are Conv1D (weight stored [in, out]).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "gpt_bigcode", "decision_transformer", "imagegpt"}
CONV1D_NAMES = {"c_attn", "c_proj", "c_fc", "c_attn_v", "q_attn"}


@dataclass(frozen=True)
class Target:
    """A base tensor: which component, which key, in which file."""

    component: str
    key: str
    file: Path
    info: TensorInfo


@dataclass(frozen=True)
class Rows:
    """Rows ``start : start + count`` of a target weight take rows ``update_start :
    update_start + count`` of a module's update (a fused weight holds several modules)."""

    start: int
    update_start: int
    count: int


@dataclass(frozen=True)
class Part:
    """One base weight a module's update goes to, whole (``rows`` None) or a row range of it,
    with the bias its ``lora_B.bias`` goes to."""

    target: Target
    rows: Rows | None = None
    bias: Target | None = None


@dataclass(frozen=True)
class ModuleMatch:
    """Where one adapter module goes, and how its update must be laid out there.

    Attributes:
        transpose: the base stores the layer as ``[in, out]`` (GPT-2 Conv1D / fan_in_fan_out).
        reshape: the update must be reshaped to the base shape (linear LoRA on a 1x1 conv).
        bias: the base bias a PEFT ``lora_B.bias`` is added to.
        component: the logical component (``unet``, ``text_encoder``...) or ``""``.
        path: the module's dotted path inside that component.
        parts: where a module named in the other layout of a fused weight goes: row ranges
            of one or several base weights (a diffusers ``to_q`` in a native ``qkv``, a native
            ``qkv`` in diffusers ``to_q`` / ``to_k`` / ``to_v``). Empty: ``target`` whole.
    """

    module: LoraModule | DeltaModule
    target: Target
    transpose: bool = False
    reshape: bool = False
    bias: Target | None = None
    component: str = ""
    path: str = ""
    parts: tuple[Part, ...] = ()

    @property
    def placements(self) -> tuple[Part, ...]:
        """Every base weight (and row range) the update goes to: ``parts``, or ``target``."""
        return self.parts or (Part(self.target, None, self.bias),)


@dataclass
class Resolution:
    """The outcome of :func:`resolve`: matches, and everything that did not match.

    ``matches`` holds the LoRA modules, ``deltas`` the modules of the other types loratool
    computes (:attr:`Adapter.deltas`); the problems and ``total`` count both.
    """

    matches: dict[str, ModuleMatch] = field(default_factory=dict)
    deltas: dict[str, ModuleMatch] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    shape_errors: dict[str, str] = field(default_factory=dict)
    #: where the adapter's full tensors go (modules_to_save, saved layers, trainable tokens).
    full: FullTensors = field(default_factory=lambda: FullTensors())
    #: modules on a tied head whose adapter PEFT ties to the input embedding's
    #: (``ensure_weight_tying``): the same update, applied once, through the embedding's module.
    shared: set[str] = field(default_factory=set)
    #: modules on an output head that resolved to the input embedding it is tied to.
    tied_heads: set[str] = field(default_factory=set)
    total: int = 0

    @property
    def replacements(self) -> dict[str, Target]:
        """Full tensors that replace a base tensor: adapter key -> that tensor."""
        return self.full.targets

    def raise_for_problems(self, adapter: Adapter, *, allow_unmatched: bool = False) -> None:
        """Raise ResolveError / ShapeError as the CLI reports them (see module docstring)."""
        source = adapter.source
        if self.shape_errors:
            key, msg = next(iter(self.shape_errors.items()))
            more = f" (and {len(self.shape_errors) - 1} more)" if len(self.shape_errors) > 1 else ""
            raise ShapeError(f"{msg}{more}", path=source, hint="is this the right base model?")
        if self.ambiguous:
            key, cands = next(iter(self.ambiguous.items()))
            raise ResolveError(
                f"module {key!r} matches {len(cands)} base weights ({', '.join(cands[:3])})",
                path=source,
                hint="the base has several components with this layer; use a PEFT/diffusers "
                "adapter with component prefixes",
                kind="ambiguous",
            )
        if not self.matches and not self.deltas:
            raise ResolveError(
                f"0 of {self.total} modules match this base: the adapter would have no effect "
                f"(e.g. {self.unmatched[0]!r})"
                if self.unmatched
                else "the adapter has no modules",
                path=source,
                hint="is this adapter made for this base model?",
                kind="no-match",
            )
        if self.unmatched and not allow_unmatched:
            names = ", ".join(repr(k) for k in self.unmatched[:3])
            raise ResolveError(
                f"{len(self.unmatched)} of {self.total} modules match no base weight: {names}"
                + (" ..." if len(self.unmatched) > 3 else ""),
                path=source,
                hint="is this adapter made for this base model?",
                kind="unmatched",
            )
        full = self.full
        for errors in (full.token_errors, full.shape_errors):  # PEFT refuses these to load
            if errors:
                key, msg = next(iter(errors.items()))
                raise ShapeError(msg, path=source, hint="is this the right base model?")
        if full.heads and not allow_unmatched:
            key, module = next(iter(full.heads.items()))
            count = len(full.heads)
            raise ResolveError(
                f"full tensor {key!r} of modules_to_save {module!r} has no tensor in the base"
                + (f" (and {count - 1} more)" if count > 1 else "")
                + ": a head the task's model class creates (a classifier); the merged "
                "checkpoint would not hold it",
                path=source,
                hint="merge into a checkpoint of the task's model class, which holds the head",
                kind="unmatched",
            )
        if full.unmatched and not allow_unmatched:
            names = ", ".join(repr(k) for k in full.unmatched[:3])
            count = len(full.unmatched)
            raise ResolveError(
                f"{count} full tensor(s) of the adapter (modules_to_save or saved layers) "
                f"name no tensor of the base: {names}"
                + (" ..." if count > 3 else "")
                + "; the merge would drop them",
                path=source,
                hint="is this adapter made for this base model?",
                kind="unmatched",
            )


def _target(comp: Component, key: str) -> Target:
    return Target(comp.name, key, comp.file_for(key), comp.info(key))


def _candidate_components(ckpt: Checkpoint, component: str | None) -> list[Component]:
    if component is None:
        return list(ckpt.components.values())
    if component in ckpt.components:
        return [ckpt.components[component]]
    if component in _DENOISERS:
        found = [ckpt.components[c] for c in _DENOISERS if c in ckpt.components]
        if found:
            return found
    if ckpt.kind != "diffusers":
        return list(ckpt.components.values())
    return []


#: One base weight a name stands for: (component, base key, logical component, module path,
#: rows of the base weight and of the update, or None for the whole weight).
_Hit = tuple[Component, str, str, str, "Rows | None"]
#: One way a name is placed: a base weight, or the row ranges of several (a fused weight).
_Candidate = tuple[_Hit, ...]


def _weight_module(key: str) -> str | None:
    """The module path of a weight key (``<path>.weight``, OpenCLIP's ``<path>_weight``); None
    for ComfyUI's legacy fp8 scale ``<path>.scale_weight``, which is no weight."""
    if key.endswith(".scale_weight"):
        return None
    for suffix in (".weight", "_weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def _bias_key(key: str) -> str:
    """The bias key next to a weight key (``in_proj_weight`` -> ``in_proj_bias``)."""
    return key[: -len("weight")] + "bias"


class _Layouts:
    """The layouts of a checkpoint's components, found once per component: by key prefix in a
    single file (``model.diffusion_model.`` -> the UNet's), from ``config.json`` in a diffusers
    folder or a diffusers model's own folder (``transformer/`` of a pipeline; prefix ``""``)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.kind = ckpt.kind
        self.found: dict[str, dict[str, Layout]] = {}

    def diffusers(self, comp: Component) -> bool:
        """The component is named in diffusers layout: a pipeline's component, or a folder
        whose ``config.json`` names a diffusers model class."""
        return self.kind == "diffusers" or "_class_name" in (comp.config or {})

    def of(self, comp: Component) -> dict[str, Layout]:
        """Key prefix -> the layout of the model under it."""
        if comp.name not in self.found:
            self.found[comp.name] = (
                _diffusers_layouts(comp) if self.diffusers(comp) else _native_layouts(comp)
            )
        return self.found[comp.name]


def _shapes(comp: Component, prefix: str) -> dict[str, tuple[int, ...]]:
    return {
        key[len(prefix) :]: tuple(comp.info(key).shape) for key in comp if key.startswith(prefix)
    }


def _native_layouts(comp: Component) -> dict[str, Layout]:
    out: dict[str, Layout] = {}
    for prefix in dict.fromkeys(prefix for prefix, _ in SINGLE_FILE_PREFIXES):
        if prefix and not any(key.startswith(prefix) for key in comp):
            continue
        layout = native_layout(_shapes(comp, prefix))
        if layout is not None:
            out[prefix] = layout
    return out


def _diffusers_layouts(comp: Component) -> dict[str, Layout]:
    if comp.config is None:
        return {}
    layout = diffusers_layout(comp.config, _shapes(comp, ""))
    return {"": layout} if layout is not None else {}


def _native_candidate(
    comp: Component, prefix: str, logical: str, pieces: tuple[Piece, ...]
) -> _Candidate | None:
    """The native base weights of a diffusers module's pieces (all present), as one candidate."""
    hits = []
    for piece in pieces:
        key = prefix + piece.native_key
        if key not in comp:
            return None
        rows = None if piece.whole else Rows(piece.native_start, piece.diffusers_start, piece.rows)
        hits.append((comp, key, logical, piece.diffusers, rows))
    return tuple(hits) or None


def _diffusers_candidate(
    comp: Component, logical: str, pieces: tuple[Piece, ...]
) -> _Candidate | None:
    """The diffusers base weights of a native module's pieces (all present), as one candidate."""
    hits = []
    for piece in pieces:
        key = f"{piece.diffusers}.weight"
        if key not in comp:
            return None
        rows = None if piece.whole else Rows(piece.diffusers_start, piece.native_start, piece.rows)
        hits.append((comp, key, logical, piece.native, rows))
    return tuple(hits) or None


class _FlatIndex:
    """kohya-flattened base keys: (kohya component, flat name) -> the candidates it names.

    Each hit carries the logical component and dotted module path the name stands for: in a
    diffusers folder the component's own; in a single file the part after a known prefix
    (``model.diffusion_model.`` -> ``unet``...); for plain models (LLMs) the whole key, since
    kohya names written for them keep their ``model.`` root. Where a component has a layout,
    its modules are indexed under their names in the other layout too (a BFL ``qkv`` in a
    diffusers Flux folder, a diffusers ``to_q`` in a BFL file), as row ranges where fused.
    """

    def __init__(self, ckpt: Checkpoint, layouts: _Layouts) -> None:
        self.entries: dict[tuple[str, str], list[_Candidate]] = {}
        for comp in ckpt.components.values():
            found = layouts.of(comp)
            native = not layouts.diffusers(comp)
            for key in comp:
                module = _weight_module(key)
                if module is None:
                    continue
                if ckpt.kind == "diffusers":
                    if key.endswith(".weight"):
                        self._add(comp.name, module, ((comp, key, comp.name, module, None),))
                    if "" in found:
                        self._add_aliases(comp, "", comp.name, module, found[""], native=False)
                    continue
                for prefix, logical in SINGLE_FILE_PREFIXES:
                    if module.startswith(prefix):
                        path = module[len(prefix) :]
                        if key.endswith(".weight"):
                            hit = (comp, key, logical if prefix else "", path, None)
                            self._add(logical, path, (hit,))
                        if prefix in found:
                            self._add_aliases(
                                comp, prefix, logical, path, found[prefix], native=native
                            )
                        break
                if module.startswith("model.") and not module.startswith("model.diffusion_model."):
                    self._add("unet", module, ((comp, key, "", module, None),))

    def _add_aliases(
        self,
        comp: Component,
        prefix: str,
        logical: str,
        path: str,
        layout: Layout,
        native: bool = True,
    ) -> None:
        """Index a base module under its names in the other layout."""
        bucket = "unet" if logical in _DENOISERS else logical
        if native:  # a native base weight: the diffusers modules it holds
            for piece in layout.to_diffusers(path):
                candidate = _native_candidate(
                    comp, prefix, logical, layout.to_native(piece.diffusers)
                )
                if candidate is not None:
                    self._add(bucket, piece.diffusers, candidate)
        else:  # a diffusers base weight: the native modules it is part of
            for piece in layout.to_native(path):
                candidate = _diffusers_candidate(comp, logical, layout.to_diffusers(piece.native))
                if candidate is not None:
                    self._add(bucket, piece.native, candidate)

    def _add(self, bucket: str, path: str, candidate: _Candidate) -> None:
        candidates = self.entries.setdefault((bucket, flatten_path(path)), [])
        if candidate not in candidates:
            candidates.append(candidate)

    def lookup(self, component: str | None, flat: str) -> list[_Candidate]:
        """The candidates a kohya name stands for."""
        if component in _DENOISERS:
            buckets = list(_DENOISERS)
        elif component:
            buckets = [component]
        else:
            buckets = sorted({bucket for bucket, _ in self.entries})
        return [c for bucket in buckets for c in self.entries.get((bucket, flat), [])]


def _path_candidates(path: str) -> list[str]:
    """Base module paths a PEFT path may correspond to (task heads vs bare models)."""
    out = [path]
    if "." in path:
        out.append(path.split(".", 1)[1])
    return out


def _path_hits(
    comp: Component,
    path: str,
    component: str | None,
    kind: str,
    by_suffix: bool,
    layouts: _Layouts,
) -> list[_Candidate]:
    """Base weights for a dotted module path: exact, without the first segment, or under a
    single-file prefix, or through the component's layout (a native path in a diffusers
    folder, a diffusers path in a single file); with ``by_suffix``, the keys that end with
    ``.<path>.weight`` instead (text encoders that diffusers saves without their
    ``text_model.`` root)."""
    logical = component or comp.name
    if by_suffix:
        suffix = f".{path}.weight"
        return [
            ((comp, key, logical, key.removesuffix(".weight"), None),)
            for key in comp
            if key.endswith(suffix)
        ]
    for candidate in _path_candidates(path):
        if f"{candidate}.weight" in comp:
            return [((comp, f"{candidate}.weight", logical, candidate, None),)]
    if kind == "file" or (layouts.of(comp) and not layouts.diffusers(comp)):
        return _single_file_hits(comp, path, component, layouts)
    layout = layouts.of(comp).get("")
    if layout is not None:
        for candidate in _path_candidates(path):
            found = _diffusers_candidate(comp, logical, layout.to_diffusers(candidate))
            if found is not None:
                return [found]
    return []


def resolve(adapter: Adapter, ckpt: Checkpoint) -> Resolution:
    """Find the base weight of every module in ``adapter`` and check the shapes fit.

    Returns a :class:`Resolution`; call ``raise_for_problems`` to turn problems into errors.
    """
    res = Resolution(total=len(adapter.modules) + len(adapter.deltas))
    flat_index = _LazyFlatIndex(ckpt)
    modules: list[tuple[str, LoraModule | DeltaModule, dict[str, ModuleMatch]]] = [
        (key, module, res.matches) for key, module in adapter.modules.items()
    ]
    modules += [(key, module, res.deltas) for key, module in adapter.deltas.items()]
    tied_heads: list[str] = []
    replicated = _replicated_layers(adapter.config or {})
    for key, module, matches in modules:
        found = _hits(ckpt, flat_index, module.key, module.path, module.component)
        if not found and replicated is not None and module.path is not None:
            source = replicated(module.path)
            if source is not None:
                found = _hits(ckpt, flat_index, module.key, source, module.component)
        if not found and module.path is not None:
            tied = _tied_head(ckpt, module.component, module.path)
            if tied is not None:
                comp, weight = tied
                logical = module.component or comp.name
                found = [((comp, weight, logical, weight.removesuffix(".weight"), None),)]
                tied_heads.append(key)
        if not found:
            res.unmatched.append(key)
            continue
        if len(found) > 1:
            res.ambiguous[key] = [_describe(candidate) for candidate in found]
            continue
        try:
            matches[key] = _match(module, found[0])
        except ShapeError as exc:
            res.shape_errors[key] = exc.message
    res.tied_heads = set(tied_heads)
    res.shared = _shared_heads(adapter, res, tied_heads)
    res.full = _passthrough(adapter, ckpt)
    return res


def _match(module: LoraModule | DeltaModule, candidate: _Candidate) -> ModuleMatch:
    """The match of a module placed on ``candidate``, its shapes checked.

    Raises:
        ShapeError: the update does not fit the base weight(s), or a lora_B.bias has no base
            bias to go to.
    """
    if module.rows is not None:
        candidate = _within(candidate, module.rows)
        if not candidate:
            raise ShapeError(f"module {module.key!r}: rows {module.rows} lie in no base weight")
    comp, base_key, logical, path, rows = candidate[0]
    if len(candidate) == 1 and rows is None:
        target = _target(comp, base_key)
        if isinstance(module, DeltaModule):
            transpose, reshape = fit_delta(module, target.info, comp.model_type, path)
        else:
            transpose, reshape = fit(module, target.info, comp.model_type, path)
        return ModuleMatch(
            module, target, transpose, reshape, _bias(module, comp, base_key), logical, path
        )
    parts = tuple(_fit_rows(module, c, k, r) for c, k, _, _, r in candidate)
    out_rows = _update_dims(module)[0]
    spans = [(p.rows.update_start, p.rows.count) for p in parts if p.rows is not None]
    if len(spans) != len(parts) or not tiles(spans, out_rows):
        names = ", ".join(dict.fromkeys(repr(p.target.key) for p in parts))
        total = sum(p.rows.count for p in parts if p.rows is not None)
        raise ShapeError(
            f"module {module.key!r} (update {_shown(module)}) has {out_rows} output "
            f"rows; the layout places {total} rows of it in {names}"
        )
    first = parts[0]
    return ModuleMatch(module, first.target, False, False, first.bias, logical, path, parts)


def _within(candidate: _Candidate, span: tuple[int, int]) -> _Candidate:
    """``candidate`` for a module that updates rows ``span`` of the weight it names only
    (XLabs' q / k / v rows of Flux's ``linear1``): each part cut to those rows, rows of the
    update counted from the span's start."""
    first, last = span
    out = []
    for comp, key, logical, path, rows in candidate:
        if rows is None:
            out.append((comp, key, logical, path, Rows(first, 0, last - first)))
            continue
        lo = max(first, rows.update_start)
        hi = min(last, rows.update_start + rows.count)
        if lo < hi:
            start = rows.start + lo - rows.update_start
            out.append((comp, key, logical, path, Rows(start, lo - first, hi - lo)))
    return tuple(out)


def _bias(module: LoraModule | DeltaModule, comp: Component, base_key: str) -> Target | None:
    """The base bias a module's ``lora_B.bias`` or ``.diff_b`` goes to, or that its type's
    merge scales (IA3 on the outputs; none there when the base layer has no bias); None
    without one."""
    if module.bias is None and module.bias_diff is None:
        if isinstance(module, DeltaModule) and module.spec.scales_bias(module):
            bias_key = _bias_key(base_key)
            return _target(comp, bias_key) if bias_key in comp else None
        return None
    bias_key = _bias_key(base_key)
    if bias_key not in comp:
        what = "lora_B.bias" if module.bias is not None else "bias difference (.diff_b)"
        raise ShapeError(f"module {module.key!r} has a {what} but the base has no {bias_key!r}")
    return _target(comp, bias_key)


def _update_dims(module: LoraModule | DeltaModule) -> tuple[int, int | None]:
    """``(out, in * kernel)`` of a module's update (``in`` None where a type does not fix it).

    Raises:
        ShapeError: a module's tensors make no update of its type.
    """
    if isinstance(module, DeltaModule):
        try:
            return module.update_dims
        except DeltaError as exc:
            raise ShapeError(f"module {module.key!r} ({module.type}): {exc}") from None
    delta = module.delta_shape
    return delta[0], math.prod(delta[1:])


def _shown(module: LoraModule | DeltaModule) -> str:
    """How messages show a module's update shape: ``[out, in]`` (``?`` where not fixed)."""
    if isinstance(module, DeltaModule):
        out, inp = _update_dims(module)
        return f"[{out}, {'?' if inp is None else inp}]"
    return str(list(module.delta_shape))


def _fit_rows(
    module: LoraModule | DeltaModule, comp: Component, key: str, rows: Rows | None
) -> Part:
    """One part of a fused placement: rows of a linear update onto rows of a 2-D weight."""
    target = _target(comp, key)
    shape = tuple(target.info.shape)
    out, inp = _update_dims(module)
    flat = len(module.delta_shape) <= 2
    span = rows or Rows(0, 0, out)
    fits = (
        module.kind not in (CONV, EMBEDDING)
        and flat
        and len(shape) == 2
        and inp in (None, shape[1])
        and span.start + span.count <= shape[0]
        and span.update_start + span.count <= out
        and (rows is not None or shape[0] == out)
    )
    if not fits:
        where = f"rows {span.start}:{span.start + span.count} of " if rows else ""
        raise ShapeError(
            f"module {module.key!r} ({_kind(module)}, update {_shown(module)}) does not fit "
            f"{where}base weight {key!r} of shape {list(shape)}"
        )
    return Part(target, rows, _bias(module, comp, key))


def _kind(module: LoraModule | DeltaModule) -> str:
    return f"{module.type}, {module.kind}" if isinstance(module, DeltaModule) else module.kind


def checkpoint_layouts(ckpt: Checkpoint) -> dict[str, Layout]:
    """The layout of each model of a checkpoint whose architecture a layout knows, by logical
    component (``unet`` for a single file's denoiser, whatever its kind; ``transformer``,
    ``text_encoder_2``... for a diffusers folder's components).

    Example:
        >>> from lora_tools.io.checkpoint import open_checkpoint                 # doctest: +SKIP
        >>> checkpoint_layouts(open_checkpoint("flux1-dev.safetensors"))          # doctest: +SKIP
        {'unet': FluxLayout(...)}
    """
    layouts = _Layouts(ckpt)
    out: dict[str, Layout] = {}
    logical = dict(SINGLE_FILE_PREFIXES)
    for comp in ckpt.components.values():
        for prefix, layout in layouts.of(comp).items():
            name = comp.name if ckpt.kind == "diffusers" else logical[prefix]
            out.setdefault(name, layout)
    return out


class _LazyFlatIndex:
    """The :class:`_FlatIndex` of a checkpoint, built on the first kohya name looked up, and
    the checkpoint's layouts."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.index: _FlatIndex | None = None
        self.layouts = _Layouts(ckpt)

    def lookup(self, component: str | None, flat: str) -> list[_Candidate]:
        if self.index is None:
            self.index = _FlatIndex(self.ckpt, self.layouts)
        return self.index.lookup(component, flat)


def _hits(
    ckpt: Checkpoint,
    flat_index: _LazyFlatIndex,
    key: str,
    path: str | None,
    component: str | None,
) -> list[_Candidate]:
    """The distinct placements a module stem names: by its dotted ``path`` when known, else as
    a kohya-flattened name. Each is one base weight, or the row ranges of several."""
    found: list[_Candidate] = []
    if path is not None:
        comps = _candidate_components(ckpt, component)
        for by_suffix in (False, True):  # exact names in any component beat suffix matches
            for comp in comps:
                found.extend(
                    _path_hits(comp, path, component, ckpt.kind, by_suffix, flat_index.layouts)
                )
            if found:
                break
    else:
        kohya_component, flat = split_name(key)
        found.extend(flat_index.lookup(kohya_component, flat))
    unique: dict[tuple, _Candidate] = {}
    for candidate in found:
        unique.setdefault(tuple((c.name, k, r) for c, k, _, _, r in candidate), candidate)
    return list(unique.values())


#: Output heads a model may tie to its input embedding, and the input embeddings' names.
HEAD_NAMES = ("lm_head", "embed_out")
INPUT_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in")


def _tied_head(ckpt: Checkpoint, component: str | None, path: str) -> tuple[Component, str] | None:
    """The input embedding an output head ``path`` (``lm_head``) is tied to, for a base
    checkpoint without a tensor of its own for the head: a tied model (GPT-2, Gemma, small
    Llamas) saves the shared weight once, as the embedding's, and the head *is* that weight, so
    PEFT's merge of a LoRA on the head changes it (the input embeddings with it)."""
    if _layer_name(path.removesuffix(".weight")) not in HEAD_NAMES:
        return None
    for comp in _candidate_components(ckpt, component):
        layers = {k: _layer_name(k.rpartition(".")[0]) for k in comp}
        if any(layer in HEAD_NAMES for layer in layers.values()):
            return None  # the head has its own tensor: not tied
        found = [
            k
            for k, layer in layers.items()
            if k.endswith(".weight") and layer in INPUT_EMBEDDING_NAMES
        ]
        if len(found) == 1:
            return comp, found[0]
    return None


def _layer_name(path: str) -> str:
    """The last segment of a module path (``model.embed_tokens`` -> ``embed_tokens``)."""
    return path.rpartition(".")[2]


#: The layer lists PEFT's replicate_layers finds (``model.layers``, BERT's ``encoder.layer``,
#: Falcon's ``h``), as they appear in module paths.
_REPLICATED = re.compile(r"(^|\.)(layers|layer|h)\.(\d+)\.")


def _replicated_layers(config: dict[str, Any]) -> Callable[[str], str | None] | None:
    """For a PEFT ``layer_replication`` config (``[[0, 4], [2, 5]]``: layers 0-3 then 2-4,
    sharing weights), the module path in the base of a path in the replicated model (layer j
    of the new list is layer ``sources[j]`` of the base), or None without one."""
    spec = config.get("layer_replication")
    if not isinstance(spec, list) or not spec:
        return None
    sources: list[int] = []
    for pair in spec:
        if not (
            isinstance(pair, list | tuple)
            and len(pair) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
        ):
            return None
        sources.extend(range(pair[0], pair[1]))

    def source(path: str) -> str | None:
        found = _REPLICATED.search(path)
        if found is None or int(found.group(3)) >= len(sources):
            return None
        index = sources[int(found.group(3))]
        return f"{path[: found.start(3)]}{index}{path[found.end(3) :]}"

    return source


def _shared_heads(adapter: Adapter, res: Resolution, tied_heads: list[str]) -> set[str]:
    """The tied-head modules PEFT does not apply on their own: with ``ensure_weight_tying`` it
    ties the head's LoRA to the input embedding's (one adapter on the shared weight, saved
    under both names), so the update counts once; without it the two are separate adapters
    on one weight, and both apply."""
    if not (adapter.config or {}).get("ensure_weight_tying"):
        return set()
    shared = set()
    for key in tied_heads:
        match = res.matches.get(key)
        if match is None:
            continue
        if any(
            other is not match and other.target.key == match.target.key
            for other in (*res.matches.values(), *res.deltas.values())
        ):
            shared.add(key)
    return shared


def _describe(candidate: _Candidate) -> str:
    comp, key = candidate[0][0], candidate[0][1]
    name = f"{comp.name + '/' if comp.name else ''}{key}"
    return name if len(candidate) == 1 else f"{name} (+{len(candidate) - 1} fused)"


@dataclass
class ForeignResolution:
    """The outcome of :func:`resolve_foreign`: where each non-LoRA module goes, and problems.

    Attributes:
        matches: module stem -> the one base weight it updates.
        kinds: module stem -> its adapter type (``LoHa``, ``LoKr``...).
        shape_checked: the matched stems whose update shape was checked against the base.
        unmatched / ambiguous / shape_errors / total: as in :class:`Resolution`.
    """

    matches: dict[str, Target] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    shape_checked: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    shape_errors: dict[str, str] = field(default_factory=dict)
    total: int = 0


def foreign_update_dims(kind: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int | None]:
    """``(out, in)`` of the update a non-LoRA module makes, from its tensors' shapes.

    ``in`` counts every input element of the weight (``in_channels * prod(kernel)`` for a
    convolution); None where the type does not fix it (OFT rotates outputs only). The shapes
    follow LyCORIS' modules (lycoris/modules/*.py): LoHa ``hada_w1_a [out, r]`` and
    ``hada_w1_b [r, in * k]``, with Tucker ``hada_t1 [r, r, *k]``, ``hada_w1_a [r, out]`` and
    ``hada_w1_b [r, in]``; LoKr ``kron(w1, w2)`` with each factor whole or low-rank (Tucker:
    ``lokr_t2 [r, r, *k]``, ``lokr_w2_a [r, b]``, ``lokr_w2_b [r, d]``); full ``diff`` the
    weight's own shape; ``lora_up`` / ``lora_down`` (kohya DoRA, Tucker LoCon with
    ``lora_mid [r, r, *k]``); norm ``w_norm [dim]``; diagonal OFT ``oft_blocks [n, b, b]``.

    Raises:
        ValueError: the tensors of the type are missing or not shaped as the type's are.
    """
    s = shapes

    def need(*names: str, ndim: int = 2) -> None:
        for name in names:
            if name not in s or len(s[name]) < ndim:
                raise ValueError(f"{kind} module without a {ndim}-D {name}")

    if kind == "LoHa":
        need("hada_w1_a", "hada_w1_b")
        if "hada_t1" in s:
            need("hada_t1")
            return s["hada_w1_a"][1], s["hada_w1_b"][1] * math.prod(s["hada_t1"][2:])
        return s["hada_w1_a"][0], s["hada_w1_b"][1]
    if kind == "LoKr":
        if "lokr_w1" in s:
            need("lokr_w1")
            a, c = s["lokr_w1"][0], math.prod(s["lokr_w1"][1:])
        else:
            need("lokr_w1_a", "lokr_w1_b")
            a, c = s["lokr_w1_a"][0], s["lokr_w1_b"][1]
        if "lokr_w2" in s:
            need("lokr_w2")
            b, d = s["lokr_w2"][0], math.prod(s["lokr_w2"][1:])
        elif "lokr_t2" in s:
            need("lokr_t2", "lokr_w2_a", "lokr_w2_b")
            b, d = s["lokr_w2_a"][1], s["lokr_w2_b"][1] * math.prod(s["lokr_t2"][2:])
        else:
            need("lokr_w2_a", "lokr_w2_b")
            b, d = s["lokr_w2_a"][0], s["lokr_w2_b"][1]
        return a * b, c * d
    if kind == "full diff" and "diff" in s:
        need("diff", ndim=1)
        return s["diff"][0], math.prod(s["diff"][1:])
    if kind in ("kohya DoRA", "Tucker LoCon"):
        need("lora_up", "lora_down")
        kernel = math.prod(s["lora_mid"][2:]) if "lora_mid" in s else 1
        return s["lora_up"][0], math.prod(s["lora_down"][1:]) * kernel
    if kind == "norm" and "w_norm" in s:
        need("w_norm", ndim=1)
        return math.prod(s["w_norm"]), 1
    if kind == "OFT" and "oft_blocks" in s and len(s["oft_blocks"]) == 3:
        n, b, b2 = s["oft_blocks"]
        if b == b2:
            return n * b, None
    raise ValueError(f"the shape of a {kind} update is not known to loratool")


#: The type :func:`resolve_foreign` places by the module owning the parameters.
PARAMETERS_KIND = VARIANT_KINDS["target_parameters"]


def resolve_foreign(adapter: Adapter, ckpt: Checkpoint) -> ForeignResolution:
    """Find the base weight of every non-LoRA module that :func:`resolve` does not place (the
    types loratool detects but does not compute: no :attr:`Adapter.deltas` entry) by name, as
    :func:`resolve` does, and check that the update's outer shape fits it where the type fixes
    that shape (:func:`foreign_update_dims`).

    Nothing here computes the update: this tells whether the file belongs to this base.
    """
    stems_of = {
        stem for stems in adapter.foreign.values() for stem in stems if stem not in adapter.deltas
    }
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, tensor in adapter.passthrough.items():
        found = classify_foreign(key)
        # The LoRA factors of a kohya DoRA or Tucker LoCon module are no foreign keys
        # themselves; kohya stems hold no dot.
        stem = found[1] if found is not None else key.partition(".")[0]
        if stem not in stems_of:
            continue
        part = key[len(stem) + 1 :].split(".", 1)[0]
        shapes.setdefault(stem, {})[part] = tuple(tensor.shape)
    res = ForeignResolution()
    flat_index = _LazyFlatIndex(ckpt)
    for kind, stems in adapter.foreign.items():
        for stem in stems:
            if stem not in stems_of or kind == PARAMETERS_KIND:
                # PEFT's ParamWrapper names the module owning the parameters as transformers
                # builds it; the checkpoint may store them under other names (transformers 5
                # fuses Mixtral's per-expert block_sparse_moe.experts.N.w1 / w3 into
                # mlp.experts.gate_up_proj on load): no name check is possible here.
                continue
            res.total += 1
            res.kinds[stem] = kind
            component, path = (None, None) if adapter.format == "kohya" else split_stem(stem)
            unique = _hits(ckpt, flat_index, stem, path, component)
            if not unique:
                res.unmatched.append(stem)
                continue
            if len(unique) > 1:
                res.ambiguous[stem] = [_describe(candidate) for candidate in unique]
                continue
            comp, base_key, _, _, rows = unique[0][0]
            target = _target(comp, base_key)
            res.matches[stem] = target
            if len(unique[0]) > 1 or rows is not None:
                continue  # rows of a fused weight: the outer shape check below does not apply
            try:
                out_dim, in_dim = foreign_update_dims(kind, shapes.get(stem, {}))
            except ValueError:
                continue  # the name resolves; the shape is not one loratool can check
            res.shape_checked.append(stem)
            base = tuple(target.info.shape)
            base_out, base_in = (base[0], math.prod(base[1:])) if base else (1, 1)
            fits = out_dim == base_out and in_dim in (None, base_in)
            transposed = len(base) == 2 and (out_dim, in_dim) == (base[1], base[0])
            if not (fits or transposed):
                update = f"[{out_dim}, {'?' if in_dim is None else in_dim}]"
                res.shape_errors[stem] = (
                    f"module {stem!r} ({kind}, update {update} as [out, in * kernel]) does "
                    f"not fit base weight {base_key!r} of shape {list(base)}"
                )
    return res


def _single_file_hits(
    comp: Component, path: str, component: str | None, layouts: _Layouts
) -> list[_Candidate]:
    """Matches for a dotted path in a single-file checkpoint under its usual prefixes, and,
    for a diffusers path, the native weights (or rows of fused ones) its layout map gives."""
    out: list[_Candidate] = []
    found = layouts.of(comp)
    for prefix, logical in SINGLE_FILE_PREFIXES:
        if component and logical != component and component not in _DENOISERS:
            continue
        key = f"{prefix}{path}.weight"
        if prefix and key in comp:
            out.append(((comp, key, logical, path, None),))
        if prefix in found:
            candidate = _native_candidate(comp, prefix, logical, found[prefix].to_native(path))
            if candidate is not None and candidate not in out:
                out.append(candidate)
    return out


def fit(
    module: LoraModule, base: TensorInfo, model_type: str | None = None, path: str = ""
) -> tuple[bool, bool]:
    """``(transpose, reshape)`` that make the module's update fit the base tensor.

    Raises:
        ShapeError: the update cannot be laid onto this base tensor.
    """
    delta = module.delta_shape
    shape = base.shape
    name = path.rsplit(".", 1)[-1]
    conv1d = model_type in CONV1D_MODEL_TYPES and name in CONV1D_NAMES
    if module.kind == EMBEDDING or module.kind == CONV:
        if tuple(shape) == delta:
            return False, False
    elif len(shape) == 2:
        out_f, in_f = delta
        if conv1d and tuple(shape) == (in_f, out_f):
            return True, False
        if tuple(shape) == (out_f, in_f):
            return False, False
        if tuple(shape) == (in_f, out_f):
            return True, False
    elif len(shape) > 2 and math.prod(shape[2:]) == 1 and tuple(shape[:2]) == delta:
        return False, True  # linear LoRA on a 1x1 convolution
    if module.kind == CONV and math.prod(module.kernel) == 1 and tuple(shape) == delta[:2]:
        return False, True  # 1x1 conv LoRA on a linear layer
    raise ShapeError(
        f"module {module.key!r} ({module.kind}, update {list(delta)}) does not fit base "
        f"weight {base.name!r} of shape {list(shape)}"
    )


def fit_delta(
    module: DeltaModule, base: TensorInfo, model_type: str | None = None, path: str = ""
) -> tuple[bool, bool]:
    """``(transpose, reshape)`` that lay a non-LoRA module's update onto the base tensor.

    The update is the flattened ``[out, in * kernel]`` matrix (:attr:`DeltaModule.update_dims`,
    ``in`` None for types that rotate or scale outputs only); it fits a weight of ``out`` rows
    and as many elements per row, with the kernel itself where the type's tensors say it (a
    Tucker or conv factor). A 2-D weight stored ``[in, out]`` (GPT-2 Conv1D) takes it
    transposed. ``reshape`` says the update's own shape is not the weight's.

    Raises:
        ShapeError: the update cannot be laid onto this base tensor.
    """
    out, inp = _update_dims(module)
    shape = tuple(base.shape)
    delta = module.delta_shape
    name = path.rsplit(".", 1)[-1]
    conv1d = model_type in CONV1D_MODEL_TYPES and name in CONV1D_NAMES
    rows, cols = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    # the kernel where the tensors say it; a 1x1 one also fits a linear weight, and back
    pointwise = math.prod(delta[2:]) == 1 and math.prod(shape[2:]) == 1
    kernel_ok = len(delta) <= 2 or delta == shape or pointwise

    def fits(size: int | None, dim: int) -> bool:
        return size is None or size == dim  # None: the type does not fix that side

    stored_in_out = len(shape) == 2 and fits(inp, shape[0]) and fits(out, shape[1])
    as_is = fits(out, rows) and fits(inp, cols)
    if stored_in_out and (out, inp) != (None, None) and (conv1d or not as_is):
        return True, False
    if as_is and kernel_ok:
        return False, len(delta) != len(shape) and inp is not None
    raise ShapeError(
        f"module {module.key!r} ({_kind(module)}, update {_shown(module)} as [out, in * "
        f"kernel]) does not fit base weight {base.name!r} of shape {list(shape)}"
    )


def resolve_passthrough(adapter: Adapter, ckpt: Checkpoint) -> dict[str, Target]:
    """Pass-through tensors (PEFT modules_to_save, saved embedding layers) that replace a base
    tensor of the same key and shape: adapter key -> that base tensor. A tensor of another
    shape, or with no such base tensor, is not in it (:func:`resolve` reports those)."""
    return _passthrough(adapter, ckpt).targets


@dataclass
class FullTensors:
    """Where an adapter's full tensors go (PEFT loads them over the base tensors of their name
    with ``load_state_dict``; :func:`resolve` fills it).

    Attributes:
        targets: adapter key -> the base tensor it replaces (same shape), or whose rows it
            replaces (trainable tokens, :attr:`token_rows`).
        shape_errors: adapter key -> message, for a base tensor of its name but another shape.
        unmatched: adapter keys that name no base tensor (PEFT drops them without a word).
        heads: adapter key -> its ``modules_to_save`` module, absent from the base checkpoint
            (a head the task's model class creates: a classifier's ``score``).
        token_rows: PEFT trainable tokens (``<layer>.token_adapter.trainable_tokens_delta``) ->
            the rows of their target they replace.
        token_errors: trainable tokens that do not fit their base tensor -> message.
    """

    targets: dict[str, Target] = field(default_factory=dict)
    shape_errors: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    heads: dict[str, str] = field(default_factory=dict)
    token_rows: dict[str, tuple[int, ...]] = field(default_factory=dict)
    token_errors: dict[str, str] = field(default_factory=dict)


#: The tensor PEFT's trainable tokens save per layer: the new values of the chosen rows.
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def _passthrough(adapter: Adapter, ckpt: Checkpoint) -> FullTensors:
    """Where each full tensor under the adapter's prefix goes (PEFT loads them over the base
    tensors of the same name with ``load_state_dict``): same shape -> ``targets``; a base
    tensor of that name but another shape (torch refuses the load) -> ``shape_errors``; no
    base tensor of that name -> ``heads`` when it is a ``modules_to_save`` module of the
    config (PEFT loads it into the module the task's model class creates, a classifier's
    ``score``), else ``unmatched`` (PEFT drops it without a word). A tensor under one of the
    adapter's own modules (a saved ``<module>.base_layer.weight``: a tied ``lm_head`` has no
    tensor of its own in the checkpoint) is left to that module's resolution."""
    out = FullTensors()
    owned = _module_stems(adapter)
    for key, tensor in adapter.passthrough.items():
        component, rest = split_stem(key)
        if classify_foreign(key) is not None or not (key.startswith(PEFT_PREFIX) or component):
            continue
        if key.endswith(TOKENS_SUFFIX):
            _token_rows(adapter, ckpt, key, tensor, out)
            continue
        for marker in (".modules_to_save.default.", ".base_layer.", ".original_module."):
            rest = rest.replace(marker, ".")
        other: tuple[Component, str] | None = None
        for comp in _candidate_components(ckpt, component):
            for path in _path_candidates(rest):
                if path not in comp:
                    continue
                if tuple(comp.info(path).shape) == tuple(tensor.shape):
                    out.targets[key] = _target(comp, path)
                    break
                other = other or (comp, path)
            if key in out.targets:
                break
        if key not in out.targets and other is None:
            tied = _tied_head(ckpt, component, rest)
            if tied is not None and tuple(tied[0].info(tied[1]).shape) == tuple(tensor.shape):
                out.targets[key] = _target(*tied)  # the head's copy is the shared weight's
        if key in out.targets or _of_a_module(owned, key):
            continue
        if other is not None:
            comp, path = other
            out.shape_errors[key] = _passthrough_shape_message(key, tensor.shape, comp, path)
        elif (module := _saved_module(adapter, rest)) is not None:
            out.heads[key] = module
        else:
            out.unmatched.append(key)
    return out


def _token_rows(
    adapter: Adapter, ckpt: Checkpoint, key: str, tensor: Tensor, out: FullTensors
) -> None:
    """PEFT's trainable tokens of one layer: its rows replace rows ``trainable_token_indices``
    of the layer's weight (``TrainableTokensLayer.merge``: ``index_copy``, values, not
    deltas, despite the name)."""
    component, rest = split_stem(key)
    layer = rest.removesuffix(TOKENS_SUFFIX)
    indices = _token_indices(adapter.config or {}, layer)
    weight = None
    for comp in _candidate_components(ckpt, component):
        weight = next((p for p in _path_candidates(layer + ".weight") if p in comp), None)
        if weight is not None:
            break
    if weight is None:
        out.unmatched.append(key)
        return
    shape = tuple(comp.info(weight).shape)
    found = tuple(tensor.shape)
    problem = None
    if indices is None:
        problem = f"adapter_config.json's trainable_token_indices names no rows for {layer!r}"
    elif len(found) != 2 or len(shape) != 2 or found != (len(indices), shape[1]):
        problem = (
            f"is {list(found)}, but {len(indices)} token rows of the base's {weight!r} "
            f"{list(shape)} are [{len(indices)}, {shape[1] if len(shape) > 1 else '?'}]"
        )
    elif any(not 0 <= i < shape[0] for i in indices) or len(set(indices)) != len(indices):
        bad = next((i for i in indices if not 0 <= i < shape[0]), None)
        problem = (
            f"token row {bad} is outside the base's {weight!r} ({shape[0]} rows)"
            if bad is not None
            else "trainable_token_indices names a row twice"
        )
    if problem is not None:
        out.token_errors[key] = f"trainable tokens {key!r}: {problem}"
        return
    out.targets[key] = _target(comp, weight)
    out.token_rows[key] = tuple(indices)


def _token_indices(config: dict[str, Any], layer: str) -> list[int] | None:
    """The rows ``trainable_token_indices`` gives layer ``layer``: a list means the input
    embedding (the layer the key names), a dict maps a module name (or a dotted suffix of the
    layer's path) to its rows."""
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        rows = spec
    elif isinstance(spec, dict):
        rows = next(
            (v for k, v in spec.items() if layer == k or layer.endswith("." + str(k))), None
        )
    else:
        return None
    if not isinstance(rows, list) or not all(isinstance(i, int) for i in rows):
        return None
    return rows


def _saved_module(adapter: Adapter, path: str) -> str | None:
    """The ``modules_to_save`` entry naming the module of tensor ``path`` (PEFT matches the
    module's name or a dotted suffix of it), or None."""
    names = (adapter.config or {}).get("modules_to_save") or []
    module = path.rpartition(".")[0]
    for name in names:
        if isinstance(name, str) and (module == name or module.endswith("." + name)):
            return name
    return None


def _module_stems(adapter: Adapter) -> set[str]:
    """The stems of every module of the adapter: LoRA, computed types and detected ones."""
    foreign = (stem for stems in adapter.foreign.values() for stem in stems)
    return {*adapter.modules, *adapter.deltas, *foreign}


def _of_a_module(stems: set[str], key: str) -> bool:
    """``key`` lies under one of the modules ``stems`` (``<module>.base_layer.weight``, an
    AdaLoRA ``lora_E``, a KaSA ``lora_diag``...): that module's own resolution (or, for a type
    loratool does not compute, its refusal) says whether it fits the base."""
    stem = key
    while "." in stem:
        stem = stem.rpartition(".")[0]
        if stem in stems:
            return True
    return False


def _passthrough_shape_message(key: str, shape: tuple[int, ...], comp: Component, path: str) -> str:
    base_shape = list(comp.info(path).shape)
    message = (
        f"full tensor {key!r} (modules_to_save or a saved layer) is {list(shape)}, but the "
        f"base's {path!r} is {base_shape}"
    )
    if (
        len(shape) == 2
        and len(base_shape) == 2
        and shape[1] == base_shape[1]
        and shape[0] != base_shape[0]
    ):
        message += (
            f": a resized vocabulary (the base needs {shape[0]} rows first, e.g. "
            "transformers' resize_token_embeddings)"
        )
    return message


__all__ = [
    "ForeignResolution",
    "FullTensors",
    "ModuleMatch",
    "Part",
    "Resolution",
    "Rows",
    "Target",
    "checkpoint_layouts",
    "fit",
    "fit_delta",
    "foreign_update_dims",
    "resolve",
    "resolve_foreign",
    "resolve_passthrough",
]
