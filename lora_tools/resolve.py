"""Resolve adapter modules to the base weights they update, and check that the shapes fit.

- PEFT paths (``base_model.model.`` stripped) name base keys directly: ``<path>.weight``.
- Component-prefixed keys (``unet.``, ``text_encoder.``...) go to the matching subfolder of a
  diffusers folder.
- kohya names (``lora_unet_...``) are matched by flattening every base key the way kohya does
  (``.`` -> ``_``) after removing the usual single-file prefixes (``model.diffusion_model.``,
  ``conditioner.embedders.0.transformer.``, ``cond_stage_model.transformer.``...).
- A single file whose UNet is in the original layout (``input_blocks.1.1.proj_in``) is also
  indexed under the diffusers names its layout map gives (``down_blocks.0.attentions.0.proj_in``,
  :mod:`lora_tools.layouts.unet`): SD1.x / SD2.x LoRAs from sd-scripts, LyCORIS and diffusers
  name UNet modules that way, whichever layout the checkpoint has.

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
from dataclasses import dataclass, field
from pathlib import Path

from lora_tools.adapter import CONV, EMBEDDING, Adapter, LoraModule
from lora_tools.errors import ResolveError, ShapeError
from lora_tools.formats.base import classify_foreign
from lora_tools.io.checkpoint import Checkpoint, Component
from lora_tools.io.safetensors import TensorInfo
from lora_tools.layouts import UNetLayout
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
class ModuleMatch:
    """Where one adapter module goes, and how its update must be laid out there.

    Attributes:
        transpose: the base stores the layer as ``[in, out]`` (GPT-2 Conv1D / fan_in_fan_out).
        reshape: the update must be reshaped to the base shape (linear LoRA on a 1x1 conv).
        bias: the base bias a PEFT ``lora_B.bias`` is added to.
        component: the logical component (``unet``, ``text_encoder``...) or ``""``.
        path: the module's dotted path inside that component.
    """

    module: LoraModule
    target: Target
    transpose: bool = False
    reshape: bool = False
    bias: Target | None = None
    component: str = ""
    path: str = ""


@dataclass
class Resolution:
    """The outcome of :func:`resolve`: matches, and everything that did not match."""

    matches: dict[str, ModuleMatch] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    shape_errors: dict[str, str] = field(default_factory=dict)
    #: pass-through tensors that replace a base tensor (modules_to_save, saved embeddings).
    replacements: dict[str, Target] = field(default_factory=dict)
    total: int = 0

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
        if not self.matches:
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


class _FlatIndex:
    """kohya-flattened base keys: (kohya component, flat name) -> matching base weights.

    Each hit carries the logical component and dotted module path the name stands for: in a
    diffusers folder the component's own; in a single file the part after a known prefix
    (``model.diffusion_model.`` -> ``unet``...); for plain models (LLMs) the whole key, since
    kohya names written for them keep their ``model.`` root.
    """

    def __init__(self, ckpt: Checkpoint, layouts: _Layouts) -> None:
        self.entries: dict[tuple[str, str], list[tuple[Component, str, str, str]]] = {}
        for comp in ckpt.components.values():
            unets = {} if ckpt.kind == "diffusers" else layouts.of(comp)
            for key in comp:
                if not key.endswith(".weight"):
                    continue
                module = key[: -len(".weight")]
                if ckpt.kind == "diffusers":
                    self._add(comp.name, module, (comp, key, comp.name, module))
                    continue
                for prefix, logical in SINGLE_FILE_PREFIXES:
                    if module.startswith(prefix):
                        path = module[len(prefix) :]
                        self._add(logical, path, (comp, key, logical if prefix else "", path))
                        if prefix in unets:
                            for alias in unets[prefix].diffusers_paths(path):
                                self._add("unet", alias, (comp, key, "unet", alias))
                        break
                if module.startswith("model.") and not module.startswith("model.diffusion_model."):
                    self._add("unet", module, (comp, key, "", module))

    def _add(self, bucket: str, path: str, hit: tuple[Component, str, str, str]) -> None:
        hits = self.entries.setdefault((bucket, flatten_path(path)), [])
        if hit not in hits:
            hits.append(hit)

    def lookup(self, component: str | None, flat: str) -> list[tuple[Component, str, str, str]]:
        """Hits ``(component, base key, logical component, module path)`` for a kohya name."""
        if component in _DENOISERS:
            buckets = list(_DENOISERS)
        elif component:
            buckets = [component]
        else:
            buckets = sorted({bucket for bucket, _ in self.entries})
        return [hit for bucket in buckets for hit in self.entries.get((bucket, flat), [])]


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
) -> list[tuple[Component, str, str, str]]:
    """Base weights for a dotted module path: exact, without the first segment, or under a
    single-file prefix; with ``by_suffix``, the keys that end with ``.<path>.weight`` instead
    (text encoders that diffusers saves without their ``text_model.`` root)."""
    logical = component or comp.name
    if by_suffix:
        suffix = f".{path}.weight"
        return [
            (comp, key, logical, key.removesuffix(".weight"))
            for key in comp
            if key.endswith(suffix)
        ]
    for candidate in _path_candidates(path):
        if f"{candidate}.weight" in comp:
            return [(comp, f"{candidate}.weight", logical, candidate)]
    return _single_file_hits(comp, path, component, layouts) if kind == "file" else []


def resolve(adapter: Adapter, ckpt: Checkpoint) -> Resolution:
    """Find the base weight of every module in ``adapter`` and check the shapes fit.

    Returns a :class:`Resolution`; call ``raise_for_problems`` to turn problems into errors.
    """
    res = Resolution(total=len(adapter.modules))
    flat_index = _LazyFlatIndex(ckpt)
    for key, module in adapter.modules.items():
        unique = _hits(ckpt, flat_index, module.key, module.path, module.component)
        if not unique:
            res.unmatched.append(key)
            continue
        if len(unique) > 1:
            res.ambiguous[key] = [f"{c.name + '/' if c.name else ''}{k}" for c, k, _, _ in unique]
            continue
        comp, base_key, logical, path = unique[0]
        target = _target(comp, base_key)
        try:
            transpose, reshape = fit(module, target.info, comp.model_type, path)
        except ShapeError as exc:
            res.shape_errors[key] = exc.message
            continue
        bias = None
        if module.bias is not None:
            bias_key = base_key[: -len(".weight")] + ".bias"
            if bias_key not in comp:
                res.shape_errors[key] = (
                    f"module {key!r} has a lora_B.bias but the base has no {bias_key!r}"
                )
                continue
            bias = _target(comp, bias_key)
        res.matches[key] = ModuleMatch(
            module, target, transpose, reshape, bias, component=logical or "", path=path
        )
    res.replacements = _resolve_passthrough(adapter, ckpt)
    return res


class _Layouts:
    """The original-layout UNets of each single-file component, found once per component."""

    def __init__(self) -> None:
        self.found: dict[str, dict[str, UNetLayout]] = {}

    def of(self, comp: Component) -> dict[str, UNetLayout]:
        """Key prefix (``model.diffusion_model.``...) -> the layout of the UNet under it."""
        if comp.name not in self.found:
            self.found[comp.name] = _unet_layouts(comp)
        return self.found[comp.name]


def _unet_layouts(comp: Component) -> dict[str, UNetLayout]:
    out = {}
    for prefix, logical in SINGLE_FILE_PREFIXES:
        if logical != "unet":
            continue
        keys = [key[len(prefix) :] for key in comp if key.startswith(prefix)]
        if any(key.startswith("input_blocks.") for key in keys):
            layout = UNetLayout.from_keys(keys)
            if layout is not None:
                out[prefix] = layout
    return out


class _LazyFlatIndex:
    """The :class:`_FlatIndex` of a checkpoint, built on the first kohya name looked up, and
    the checkpoint's UNet layouts."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.index: _FlatIndex | None = None
        self.layouts = _Layouts()

    def lookup(self, component: str | None, flat: str) -> list[tuple[Component, str, str, str]]:
        if self.index is None:
            self.index = _FlatIndex(self.ckpt, self.layouts)
        return self.index.lookup(component, flat)


def _hits(
    ckpt: Checkpoint,
    flat_index: _LazyFlatIndex,
    key: str,
    path: str | None,
    component: str | None,
) -> list[tuple[Component, str, str, str]]:
    """The distinct base weights ``(component, base key, logical component, module path)`` a
    module stem names: by its dotted ``path`` when known, else as a kohya-flattened name."""
    hits: list[tuple[Component, str, str, str]] = []
    if path is not None:
        comps = _candidate_components(ckpt, component)
        for by_suffix in (False, True):  # exact names in any component beat suffix matches
            for comp in comps:
                hits.extend(
                    _path_hits(comp, path, component, ckpt.kind, by_suffix, flat_index.layouts)
                )
            if hits:
                break
    else:
        kohya_component, flat = split_name(key)
        hits.extend(flat_index.lookup(kohya_component, flat))
    return list({(c.name, k): (c, k, lg, p) for c, k, lg, p in hits}.values())


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


def resolve_foreign(adapter: Adapter, ckpt: Checkpoint) -> ForeignResolution:
    """Find the base weight of every non-LoRA module (LoHa, LoKr, kohya DoRA...) by name, as
    :func:`resolve` does for LoRA modules, and check that the update's outer shape fits it
    where the type fixes that shape (:func:`foreign_update_dims`).

    Nothing here computes the update: this tells whether the file belongs to this base.
    """
    stems_of = {stem for stems in adapter.foreign.values() for stem in stems}
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
            res.total += 1
            res.kinds[stem] = kind
            component, path = (None, None) if adapter.format == "kohya" else split_stem(stem)
            unique = _hits(ckpt, flat_index, stem, path, component)
            if not unique:
                res.unmatched.append(stem)
                continue
            if len(unique) > 1:
                res.ambiguous[stem] = [
                    f"{c.name + '/' if c.name else ''}{k}" for c, k, _, _ in unique
                ]
                continue
            comp, base_key, _, _ = unique[0]
            target = _target(comp, base_key)
            res.matches[stem] = target
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
) -> list[tuple[Component, str, str, str]]:
    """Matches for a dotted path in a single-file checkpoint under its usual prefixes, and,
    for a diffusers UNet path, under the original name its layout map gives."""
    out = []
    unets = layouts.of(comp)
    for prefix, logical in SINGLE_FILE_PREFIXES:
        if component and logical != component and component not in _DENOISERS:
            continue
        keys = [f"{prefix}{path}.weight"] if prefix else []
        original = unets[prefix].original_path(path) if prefix in unets else None
        if original is not None:
            keys.append(f"{prefix}{original}.weight")
        out.extend((comp, key, logical, path) for key in keys if key in comp)
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


def _resolve_passthrough(adapter: Adapter, ckpt: Checkpoint) -> dict[str, Target]:
    """Pass-through tensors (PEFT modules_to_save, saved embedding layers) that replace a base
    tensor of the same key and shape."""
    out: dict[str, Target] = {}
    for key, tensor in adapter.passthrough.items():
        component, rest = split_stem(key)
        if classify_foreign(key) is not None or not (key.startswith(PEFT_PREFIX) or component):
            continue
        for marker in (".modules_to_save.default.", ".base_layer.", ".original_module."):
            rest = rest.replace(marker, ".")
        for comp in _candidate_components(ckpt, component):
            for path in _path_candidates(rest):
                if path in comp and tuple(comp.info(path).shape) == tuple(tensor.shape):
                    out[key] = _target(comp, path)
                    break
            if key in out:
                break
    return out


__all__ = [
    "ForeignResolution",
    "ModuleMatch",
    "Resolution",
    "Target",
    "fit",
    "foreign_update_dims",
    "resolve",
    "resolve_foreign",
]
