"""``convert``: rename an adapter into another naming scheme, carrying every module's scale.

Targets: ``peft`` (``base_model.model.<path>`` + adapter_config.json), ``diffusers``
(``<component>.<path>`` + ``lora_adapter_metadata``), ``kohya`` (``lora_unet_*`` /
``lora_te*_`` with per-module alpha tensors) and ``mlx`` (mlx-lm's ``<path>.lora_a`` /
``.lora_b``, one rank and scale in its adapter_config.json; its factors are PEFT's transposed). The factors are copied byte for byte; only names
and the places scale lives change:

- PEFT and diffusers: per-module alpha through ``lora_alpha`` + ``alpha_pattern`` (written
  exactly by :func:`lora_tools.formats.peft.scale_config`); rsLoRA stays rsLoRA.
- kohya: one alpha tensor per module; rsLoRA is expressed as the alpha giving the same scale
  under ``alpha / r`` (``alpha_kohya = alpha * sqrt(r) / r * r``).

kohya names flatten the module path (``.`` -> ``_``), so converting from kohya to PEFT or
diffusers needs the base checkpoint: each name is resolved by flattening the base's keys
(:mod:`lora_tools.resolve`), and names that resolve to nothing are listed in the error.
PEFT files hold one model: a diffusers file with several components converts one at a time
(``component``). A plain PEFT file has no component; converting it to diffusers or kohya takes
it from ``component``, the resolution against ``base``, or the config's base model folder.

Example:
    >>> from lora_tools.formats import load_adapter                               # doctest: +SKIP
    >>> res = convert_adapter(load_adapter("fixtures/kohya/sd-lora.safetensors"), "diffusers",
    ...                       base="fixtures/bases/tiny-sd")                      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.errors import (
    UnsupportedAdapterError,
    UsageError,
)
from lora_tools.formats.comfyui import ComfyUIFormat
from lora_tools.formats.mlx import mlx_config_for
from lora_tools.formats.peft import (
    DIFFUSERS_METADATA_KEY,
    diffusers_component_configs,
    peft_config_for,
)
from lora_tools.layouts import Layout
from lora_tools.naming import (
    COMPONENTS,
    KOHYA_COMPONENT_PREFIX,
    PEFT_PREFIX,
    flatten_path,
    kohya_name,
    split_name,
    split_stem,
    target_paths,
)
from lora_tools.ops._algebra import (
    Progress,
    add_history,
    exact_targets,
    targets_cover,
)
from lora_tools.ops.relayout import DENOISERS, layout_for, relayout
from lora_tools.ops.to_lora import ModuleToLora, as_lora, require_base
from lora_tools.results import WrittenResult, adapter_inputs, input_ref

TARGETS = ("peft", "kohya", "diffusers", "mlx", "comfyui", "lora")
#: Targets that store one alpha tensor per module (kohya-style keys).
_ALPHA_TENSORS = ("kohya", "comfyui")
#: Single-file checkpoint layouts whose module names no diffusers / transformers model class
#: uses, by their top-level module names (module paths inside a component).
FOREIGN_LAYOUTS: dict[str, tuple[str, ...]] = {
    "BFL (Flux single-file)": (
        # not img_in / txt_in: Qwen-Image's diffusers model has modules of those names
        "double_blocks",
        "single_blocks",
        "time_in",
        "vector_in",
        "guidance_in",
        "final_layer",
    ),
    "SGM / LDM (Stable Diffusion single-file)": (
        "input_blocks",
        "middle_block",
        "output_blocks",
        "time_embed",
        "label_emb",
    ),
    "open_clip": ("transformer.resblocks", "resblocks"),
}
#: Metadata that describes the source file's bytes and would be wrong for the output.
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash", DIFFUSERS_METADATA_KEY)
#: PEFT config fields that describe the model and the training, not the tensors.
_CONFIG_FIELDS_TO_KEEP = (
    "base_model_name_or_path",
    "task_type",
    "bias",
    "lora_dropout",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
)


@dataclass(frozen=True, repr=False)
class ConvertResult(WrittenResult):
    """The converted adapter and what the conversion had to decide.

    Attributes:
        adapter: the adapter in the target format (write it with ``save_adapter``).
        source_format: the input's format.
        resolved: modules whose path came from the base checkpoint.
        dropped: modules left out because they belong to another component than ``component``.
        notes: anything else the user should know.
    """

    command = "convert"

    adapter: Adapter
    source_format: str = ""
    resolved: int = 0
    dropped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def fields(self) -> dict[str, Any]:
        return {
            "from": self.source_format,
            "to": self.adapter.format,
            "counts": {
                "modules": len(self.adapter.modules),
                "resolved_from_base": self.resolved,
                "dropped": len(self.dropped),
            },
            "modules": [{"module": key} for key in self.adapter.modules],
            "dropped": list(self.dropped),
            "notes": list(self.notes),
        }


def convert_adapter(
    adapter: Adapter,
    to: str,
    *,
    base: str | os.PathLike[str] | None = None,
    component: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
) -> ConvertResult | LoraConvertResult:
    """Convert ``adapter`` to the ``to`` naming scheme with every module's scale unchanged,
    or with ``to="lora"`` every module of another type to a plain LoRA
    (:func:`convert_to_lora`, which takes ``rank`` / ``energy``).

    Args:
        adapter: the adapter (not modified).
        to: ``peft``, ``kohya``, ``diffusers``, ``mlx``, ``comfyui`` or ``lora``.
        base: base checkpoint (file, HF folder or diffusers pipeline folder), needed to recover
            module paths from kohya names; also checks that every module fits the base.
        component: the pipeline component (``unet``, ``text_encoder``, ``transformer``...) to
            keep (to PEFT, from a multi-component file) or to assign (PEFT to diffusers/kohya).

    Returns:
        A :class:`ConvertResult`.

    Raises:
        UsageError: unknown target, missing ``base`` / ``component``.
        ResolveError: modules that resolve to no base weight (named in the message).
        UnsupportedAdapterError: LyCORIS modules; DoRA, lora bias or full tensors to kohya.
    """
    if to not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    if to == "lora":
        if component is not None:
            raise UsageError(
                "--component applies to renaming conversions; --to lora keeps every module "
                "in the input's naming",
                hint="convert the LoRA written to another naming scheme afterwards",
            )
        return convert_to_lora(adapter, rank=rank, energy=energy, base=base)
    if rank is not None or energy is not None:
        raise UsageError(
            f"--rank / --energy apply to --to lora; --to {to} copies the factors unchanged",
            hint="re-rank a LoRA with `loratool resize`",
        )
    if component is not None and component not in COMPONENTS:
        raise UsageError(
            f"unknown component {component!r}", hint=f"known components: {', '.join(COMPONENTS)}"
        )
    adapter.require_plain_lora("convert")
    adapter.require_known_scale(f"convert --to {to}")
    _refuse_bias_diff(adapter, to)
    modules = {k: dataclasses.replace(m) for k, m in adapter.modules.items()}
    transposed = False
    resolved = 0
    dropped: list[str] = []
    relaid = 0
    layouts: dict[str, Layout] = {}
    if to == "comfyui" and base is None:
        raise UsageError(
            "--to comfyui names modules in the checkpoint's native layout (diffusion_model."
            "input_blocks..., double_blocks...), which only the base checkpoint tells",
            path=adapter.source,
            hint="pass --base with the base checkpoint (single file or diffusers folder)",
        )
    if base is not None:
        resolved, transposed, layouts = _resolve_paths(adapter, modules, base)
        modules, relaid = relayout(modules, layouts, to, _layout_refusal(adapter, to))
    if to in ("peft", "diffusers", "mlx"):
        _check_layout(adapter, modules, to, layouts, base is not None)
    if to in _ALPHA_TENSORS and base is None:
        _check_native_named(adapter, modules, to)
    missing = [m.key for m in modules.values() if m.path is None]
    if missing and to in ("peft", "diffusers", "mlx"):
        raise UsageError(
            f"{len(missing)} modules have kohya names (e.g. {missing[0]!r}), which do not say "
            f"where the dots of the module path were; {to} names need the dotted path",
            path=adapter.source,
            hint="pass --base with the base checkpoint the adapter was trained on",
        )

    piped = sorted({m.component for m in modules.values() if m.component})
    if to == "mlx" and piped:
        raise UnsupportedAdapterError(
            f"its modules belong to diffusers pipeline components ({', '.join(piped)}); "
            "mlx-lm adapters hold one language model",
            path=adapter.source,
            hint="convert to diffusers, kohya or comfyui for image / video pipelines",
            kind="unsupported-type",
        )
    modules = _place_components(adapter, modules, to, component, dropped)
    if to in _ALPHA_TENSORS:
        _check_kohya(adapter, modules)
    converted = {}
    for m in modules.values():
        new = _renamed(m, to)
        converted[new.key] = new

    metadata = {k: v for k, v in adapter.metadata.items() if k not in _STALE_METADATA}
    out = Adapter(
        format=to,
        modules=converted,
        passthrough=_passthrough(adapter, to, modules),
        foreign={},
        metadata=metadata,
        config=None,
        source=adapter.source,
        config_source=adapter.config_source,
    )
    if to == "peft":
        out.metadata["format"] = "pt"
        out.config = _peft_config(adapter, out, component, transposed)
    elif to == "mlx":
        out.metadata.pop("format", None)  # mlx-lm's files carry no metadata
        out.config = adapter.config if adapter.format == "mlx" else _mlx_seed(adapter)
        out.config = mlx_config_for(out)  # refuses what one rank and scale cannot say
    elif to == "diffusers":
        out.metadata["format"] = "pt"
        out.metadata[DIFFUSERS_METADATA_KEY] = json.dumps(
            _diffusers_seed(adapter, out, transposed), sort_keys=True
        )
    else:
        for key, value in (
            ("ss_network_module", "networks.lora"),
            ("ss_network_dim", ""),
            ("ss_network_alpha", ""),
        ):
            out.metadata.setdefault(key, value)  # filled in by the kohya writer
    add_history(
        out,
        "convert",
        source_format=adapter.format,
        to=to,
        base=os.fspath(base) if base is not None else None,
        component=component,
    )
    inputs = adapter_inputs(adapter)
    if base is not None:
        inputs += (input_ref(base, "base"),)
    notes = ()
    if relaid:
        side = "split from fused native weights" if to != "kohya" else "re-laid out"
        notes = (f"{relaid} modules {side} through the base's layout (factors exact)",)
    return ConvertResult(out, adapter.format, resolved, tuple(dropped), notes, source_inputs=inputs)


def _refuse_bias_diff(adapter: Adapter, to: str) -> None:
    """A ``.diff_b`` (added unscaled at the merge strength) has no place in PEFT, diffusers or
    mlx-lm files: their lora_B bias is scaled by alpha / r, and mlx-lm has none."""
    if to in _ALPHA_TENSORS:
        return
    diffs = [m.key for m in adapter.modules.values() if m.bias_diff is not None]
    if diffs:
        raise UnsupportedAdapterError(
            f"{len(diffs)} modules carry a bias difference (.diff_b, e.g. {diffs[0]!r}), which "
            f"{to} files cannot hold",
            path=adapter.source,
            hint="keep the file in a format with .diff_b (kohya, comfyui): loratool merge and "
            "ComfyUI apply it",
            kind="unsupported-type",
        )


def _resolve_paths(
    adapter: Adapter, modules: dict[str, LoraModule], base: str | os.PathLike[str]
) -> tuple[int, bool, dict[str, Layout]]:
    """Fill path and component of every module from the base; return (count, any Conv1D,
    the base's layouts)."""
    from lora_tools.io.checkpoint import open_checkpoint
    from lora_tools.resolve import checkpoint_layouts, resolve

    with open_checkpoint(base) as ckpt:
        res = resolve(adapter, ckpt)
        res.raise_for_problems(adapter)
        layouts = checkpoint_layouts(ckpt)
    count = 0
    for key, match in res.matches.items():
        m = modules[key]
        if m.path is None:
            count += 1
        m.path = match.path
        if match.component:
            m.component = match.component
    return count, any(match.transpose for match in res.matches.values()), layouts


def _layout_refusal(adapter: Adapter, to: str) -> Callable[[str], UnsupportedAdapterError]:
    def refuse(message: str) -> UnsupportedAdapterError:
        return UnsupportedAdapterError(
            f"{message}; converting to {to} would not keep the update exact",
            path=adapter.source,
            hint="keep the file in its own format (loratool merge and ComfyUI read it)",
            kind="unsupported-layout",
        )

    return refuse


def layout_of(module: LoraModule) -> str | None:
    """The single-file checkpoint layout a module's path (or kohya name) is spelled in, when it
    is one that no diffusers or transformers model class uses; None otherwise."""
    flat = flatten_path(module.path) if module.path is not None else split_name(module.key)[1]
    for layout, roots in FOREIGN_LAYOUTS.items():
        if any(flat == r or flat.startswith(r + "_") for r in map(flatten_path, roots)):
            return layout
    return None


def _check_layout(
    adapter: Adapter,
    modules: dict[str, LoraModule],
    to: str,
    layouts: dict[str, Layout],
    base_given: bool = False,
) -> None:
    """Refuse modules named in a layout the target's consumer does not have.

    PEFT and diffusers find a module by its path in the model class (diffusers' Flux
    transformer says ``transformer_blocks.0.attn.to_q``, not ``double_blocks.0.img_attn.qkv``):
    renaming such modules without re-laying them out (splitting fused qkv, mapping the block
    names) writes a file that loads nothing. A path the base's diffusers layout has is no
    such name (Qwen-Image's diffusers model has ``img_in`` and ``txt_in`` too).
    """
    for m in modules.values():
        layout = layout_of(m)
        if layout is None:
            continue
        known = layout_for(layouts, m.component)
        if known is not None and m.path is not None and known.to_native(m.path):
            continue
        consumer = "diffusers pipelines" if to == "diffusers" else "transformers / diffusers models"
        raise UnsupportedAdapterError(
            f"module {m.key!r} is named in the {layout} layout; {consumer} name their "
            f"modules differently, so a {to} file with these names would load nothing",
            path=adapter.source,
            hint="the base given holds no whole model of this architecture to map (loratool "
            "derives a layout from every block of it); give the complete checkpoint as --base"
            if base_given
            else "pass --base with the base checkpoint (single file or diffusers folder): "
            "its layout tells how to re-lay the modules out",
            kind="unsupported-layout",
        )


#: Architectures whose kohya-style LoRAs (sd-scripts, musubi-tuner) and ComfyUI name the
#: denoiser's modules natively: a ``lora_unet_`` name of a diffusers path loads in neither.
_NATIVE_NAMED = ("flux", "chroma", "sd3", "wan", "hunyuan-video")


def _check_native_named(adapter: Adapter, modules: dict[str, LoraModule], to: str) -> None:
    """Refuse a denoiser module in diffusers names for a target that needs native ones, which
    only a base checkpoint's layout gives (``lora_unet_transformer_blocks_0_attn_to_q`` is no
    Flux name that sd-scripts, diffusers' kohya loader or ComfyUI look up)."""
    from lora_tools.ops.inspect import architecture_of

    found = architecture_of(adapter)
    if found is None or found["name"] not in _NATIVE_NAMED:
        return
    diffusers_named = [
        m
        for m in modules.values()
        if m.path is not None and m.component in (None, *DENOISERS) and layout_of(m) is None
    ]
    # a block's module names the layout best (context_embedder is SD3's name in both)
    for m in sorted(diffusers_named, key=lambda m: "blocks" not in (m.path or ""))[:1]:
        raise UnsupportedAdapterError(
            f"module {m.key!r} is named in the diffusers layout of a {found['name']} model; "
            f"{to} files of it name modules in the native layout (double_blocks..., "
            "joint_blocks..., blocks.N.self_attn...), which only the base checkpoint tells",
            path=adapter.source,
            hint="pass --base with the base checkpoint (single file or diffusers folder)",
            kind="unsupported-layout",
        )


def _infer_component(adapter: Adapter) -> str | None:
    """The component named by the config's base model folder (``.../tiny-sd/unet``), if any."""
    name = (adapter.config or {}).get("base_model_name_or_path")
    if isinstance(name, str):
        leaf = PurePosixPath(name.replace("\\", "/")).name
        if leaf in COMPONENTS:
            return leaf
    return None


def _place_components(
    adapter: Adapter,
    modules: dict[str, LoraModule],
    to: str,
    component: str | None,
    dropped: list[str],
) -> dict[str, LoraModule]:
    present = {m.component for m in modules.values()}
    if to in ("peft", "mlx"):
        named = sorted(c for c in present if c is not None)
        if component is None and len(named) > 1:
            raise UsageError(
                f"this adapter holds {len(named)} components ({', '.join(named)}); a {to} "
                "adapter holds one model",
                path=adapter.source,
                hint=f"pass --component {named[0]} (and convert each component separately)",
            )
        keep = {}
        for key, m in modules.items():
            # a single-file base calls every denoiser unet; the file may say transformer
            denoiser = component in DENOISERS and m.component in DENOISERS
            if component is not None and m.component not in (component, None) and not denoiser:
                dropped.append(key)
                continue
            m.component = None
            keep[key] = m
        if not keep:
            raise UsageError(
                f"no module belongs to component {component!r}",
                path=adapter.source,
                hint=f"components here: {', '.join(sorted(c for c in present if c)) or 'none'}",
            )
        return keep
    if None in present:
        assign = component or _infer_component(adapter)
        if assign is None and to == "diffusers":
            raise UsageError(
                f"this {adapter.format} adapter does not say which pipeline component it belongs to",
                path=adapter.source,
                hint="pass --component unet / transformer / text_encoder ... "
                "(or --base with the pipeline folder)",
            )
        for m in modules.values():
            if m.component is None:
                m.component = assign
    if component is not None:
        for key, m in list(modules.items()):
            if m.component != component:
                dropped.append(key)
                del modules[key]
    return modules


def _check_kohya(adapter: Adapter, modules: dict[str, LoraModule]) -> None:
    for m in modules.values():
        if m.dora or m.bias is not None:
            what = "DoRA magnitude" if m.dora else "lora_B bias"
            raise UnsupportedAdapterError(
                f"module {m.key!r} has a {what}, which kohya LoRA files cannot hold",
                path=adapter.source,
                hint="keep this adapter in PEFT or diffusers format",
                kind="unsupported-type",
            )
        if m.component is not None and m.component not in KOHYA_COMPONENT_PREFIX:
            raise UsageError(
                f"module {m.key!r} belongs to component {m.component!r}, which has no kohya "
                "name prefix",
                path=adapter.source,
            )


def _renamed(m: LoraModule, to: str) -> LoraModule:
    """``m`` with its keys cleared (the writer names it for ``to``) and its scale expressed the
    way ``to`` stores it."""
    alpha, rslora = m.alpha, m.rslora
    if to in _ALPHA_TENSORS and rslora:
        alpha, rslora = m.scale * m.rank, False
    elif to not in _ALPHA_TENSORS and alpha is None:
        alpha = float(m.rank)
    if to == "kohya" and m.path is None:
        # Already a kohya name (no path to rebuild it from): keep it and its keys.
        return dataclasses.replace(m, alpha=alpha, rslora=rslora)
    new = dataclasses.replace(
        m,
        keys={},
        alpha=alpha,
        rslora=rslora,
        alpha_tensor=m.alpha_tensor if to in _ALPHA_TENSORS else None,
    )
    if to == "kohya":
        new.key = kohya_name(m.component, m.path or "")
    elif to == "comfyui":
        new.key = ComfyUIFormat().stem_for(new)
    elif to == "peft":
        new.key = PEFT_PREFIX + (m.path or "")
    elif to == "mlx":
        new.key = m.path or ""
    else:
        new.key = f"{m.component}.{m.path}"
    return new


def _passthrough(adapter: Adapter, to: str, kept: dict[str, LoraModule]) -> dict[str, Any]:
    """Full tensors (modules_to_save, saved layers) under the target's prefix."""
    if not adapter.passthrough or to == adapter.format:
        return dict(adapter.passthrough)
    if to == "mlx" or adapter.format == "mlx":
        name = next(iter(adapter.passthrough))
        raise UnsupportedAdapterError(
            f"holds {len(adapter.passthrough)} full tensors (e.g. {name!r}) that "
            f"{'mlx-lm adapters cannot hold' if to == 'mlx' else 'are no mlx-lm LoRA tensors'}",
            path=adapter.source,
            hint="convert an adapter of LoRA factors only",
            kind="unsupported-type",
        )
    if to in _ALPHA_TENSORS:
        name = next(iter(adapter.passthrough))
        raise UnsupportedAdapterError(
            f"holds {len(adapter.passthrough)} full tensors (e.g. {name!r}) that {to} LoRA "
            "files cannot hold",
            path=adapter.source,
            hint="keep this adapter in PEFT or diffusers format",
            kind="unsupported-type",
        )
    components = {m.component for m in kept.values()}
    out = {}
    for key, tensor in adapter.passthrough.items():
        comp, rest = split_stem(key)
        if key.startswith(PEFT_PREFIX) or comp is not None:
            if to == "peft":
                if comp is None or comp in components or None in components:
                    out[PEFT_PREFIX + rest] = tensor
            else:
                target = comp or next(iter(components))
                out[f"{target}.{rest}"] = tensor
        else:
            out[key] = tensor
    return out


def _peft_config(
    source: Adapter, out: Adapter, component: str | None, transposed: bool
) -> dict[str, Any]:
    """adapter_config.json for the converted adapter (scale fields are filled by the writer)."""
    if source.format == "peft" and source.config:
        return _targeting(source.config, list(out.modules.values()))
    if source.format == "diffusers":
        configs = diffusers_component_configs(source.metadata)
        comps = {m.component for m in source.modules.values()}
        comp = component or (next(iter(comps)) if len(comps) == 1 else None)
        if comp in configs:
            config = _targeting(configs[comp], list(out.modules.values()))
            config.setdefault("peft_type", "LORA")
            return config
    fresh = peft_config_for(dataclasses.replace(out, config={})) or {}
    fresh["target_modules"] = target_paths(list(out.modules.values()))
    fresh["fan_in_fan_out"] = transposed
    for key in _CONFIG_FIELDS_TO_KEEP:
        value = (source.config or {}).get(key)
        if value is not None:
            fresh[key] = value
    if source.format == "mlx" and source.config:
        # mlx-lm names the base model "model" and keeps dropout in lora_parameters
        params = source.config.get("lora_parameters") or {}
        if isinstance(source.config.get("model"), str):
            fresh["base_model_name_or_path"] = source.config["model"]
        if isinstance(params.get("dropout"), (int, float)):
            fresh["lora_dropout"] = params["dropout"]
    return fresh


def _targeting(config: dict[str, Any], modules: list[LoraModule]) -> dict[str, Any]:
    """A carried config whose ``target_modules`` still select every module written: kept, else
    (none given, as diffusers' ``save_lora_weights`` may write; modules re-laid out into other
    names) the exact module paths, or PEFT would build other layers and load nothing."""
    out = dict(config)
    if not all(targets_cover(out.get("target_modules"), m.path or m.key) for m in modules):
        out.update(exact_targets(modules))
    return out


def _mlx_seed(source: Adapter) -> dict[str, Any]:
    """The fields of a PEFT config that mlx-lm's config also has (the writer adds rank and
    scale, :func:`lora_tools.formats.mlx.mlx_config_for`)."""
    config = source.config or {}
    seed: dict[str, Any] = {}
    if isinstance(config.get("lora_dropout"), (int, float)):
        seed["lora_dropout"] = config["lora_dropout"]
    if isinstance(config.get("base_model_name_or_path"), str):
        seed["base_model_name_or_path"] = config["base_model_name_or_path"]
    return seed


def _diffusers_seed(source: Adapter, out: Adapter, transposed: bool) -> dict[str, Any]:
    """Flat ``<component>.<field>`` configs the diffusers writer completes with scale fields."""
    existing = diffusers_component_configs(source.metadata) if source.format == "diffusers" else {}
    by_component: dict[str, list[LoraModule]] = {}
    for m in out.modules.values():
        by_component.setdefault(m.component or "transformer", []).append(m)
    flat: dict[str, Any] = {}
    for comp, modules in by_component.items():
        if comp in existing:
            config = _targeting(existing[comp], modules)
        elif source.format == "peft" and source.config:
            config = _targeting(source.config, modules)
        else:
            config = {
                "peft_type": "LORA",
                "target_modules": target_paths(modules),
                "use_dora": any(m.dora for m in modules),
                "lora_bias": any(m.bias is not None for m in modules),
                "fan_in_fan_out": transposed,
            }
        for key, value in config.items():
            flat[f"{comp}.{key}"] = value
    return flat


# -- convert --to lora: every other adapter type as a plain LoRA --------------------------------


@dataclass(frozen=True, repr=False)
class LoraConvertResult(WrittenResult):
    """The plain LoRA and one row per converted module (plain LoRA modules are kept as they are).

    ``rule`` is ``{"rank": R}``, ``{"energy": E}`` or ``{}`` (the exact LoRA).
    """

    command = "convert"

    adapter: Adapter
    modules: tuple[ModuleToLora, ...] = ()
    rule: dict[str, Any] = dataclasses.field(default_factory=dict)
    source_format: str = ""
    kept: int = 0
    notes: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        """Every converted module reproduces its update (up to float rounding)."""
        return all(row.relative_error <= _EXACT for row in self.modules)

    def fields(self) -> dict[str, Any]:
        return {
            "from": self.source_format,
            "to": "lora",
            "format": self.adapter.format,
            "rule": dict(self.rule),
            "counts": {
                "modules": len(self.adapter.modules),
                "converted": len(self.modules),
                "kept": self.kept,
                "resolved_from_base": 0,
                "dropped": 0,
            },
            "modules": [row.as_dict() for row in self.modules],
            "summary": {
                "exact": self.exact,
                "max_relative_error": max((r.relative_error for r in self.modules), default=0.0),
                "min_retained_energy": min((r.retained_energy for r in self.modules), default=1.0),
            },
            "dropped": [],
            "notes": list(self.notes),
        }


#: A relative error at float64 round-off: the conversion is exact.
_EXACT = 1e-10


def lora_rule(rank: int | None, energy: float | None) -> dict[str, Any]:
    """``--rank`` / ``--energy`` (at most one) as keyword arguments of
    :func:`~lora_tools.lowrank.select_rank`; ``{}`` for the exact LoRA."""
    if rank is not None and energy is not None:
        raise UsageError("give at most one of --rank and --energy")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise UsageError(f"--rank must be an integer >= 1, got {rank!r}")
        return {"rank": rank}
    if energy is not None:
        if not (isinstance(energy, (int, float)) and 0 < energy <= 1):
            raise UsageError(f"--energy must be in (0, 1], got {energy!r}")
        return {"energy": float(energy)}
    return {}


def convert_to_lora(
    adapter: Adapter,
    *,
    rank: int | None = None,
    energy: float | None = None,
    base: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> LoraConvertResult:
    """Every LoHa / LoKr / Tucker LoCon / full / base-dependent module as a plain LoRA module,
    in the adapter's own naming (kohya names stay kohya); plain LoRA modules are kept.

    Without ``rank`` / ``energy`` each module becomes its exact LoRA (rank ``r1 * r2`` for a
    LoHa, ``rank(w1) * rank(w2)`` for a LoKr, ``r`` for a Tucker LoCon); a module whose update
    has no low-rank form (a full diff, a type that reads the base weight) needs one of them.
    The factors come from :func:`lora_tools.deltas.factors.to_lora`; each module's error is
    reported in ``result.modules``.

    Args:
        adapter: the adapter (not modified).
        rank: the rank of every converted module (capped at its exact rank).
        energy: per module, the smallest rank keeping this fraction of ``||dW||_F^2``.
        base: base checkpoint: needed by modules whose update reads the base weight (OFT,
            IA3, GLoRA, a weight decomposition ``dora_scale``); gives every convolution its
            kernel (a LoHa stores it flattened).
        seed: seed of the randomized SVD.
        progress: optional ``progress(done, total)`` callback.

    Raises:
        UsageError: both rules; a module that needs ``base`` or a rule and has none.
        UnsupportedAdapterError: a type loratool does not compute.
    """
    from lora_tools.deltas.factors import low_rank_form

    rule = lora_rule(rank, energy)
    if not adapter.deltas:
        adapter.require_plain_lora("convert --to lora", deltas_ok=True)
        raise UsageError(
            "this adapter holds plain LoRA modules only: nothing to convert to LoRA",
            path=adapter.source,
            hint="give a LyCORIS / PEFT adapter of another type (LoHa, LoKr, full...)",
        )
    require_base(adapter, base, "convert --to lora")
    dense = [m for m in adapter.deltas.values() if not low_rank_form(m)]
    if dense and not rule:
        m = dense[0]
        raise UsageError(
            f"module {m.key!r} ({m.type}) has no low-rank form: an exact LoRA of its "
            f"{m.update_dims[0]} x {m.update_dims[1] or '?'} update is no smaller than it",
            path=adapter.source,
            hint="pass --rank R or --energy E (--energy 1 keeps every module whole)",
        )
    out, rows, notes = as_lora(
        adapter,
        rule or None,
        base=base,
        seed=seed,
        progress=progress,
        operation="convert --to lora",
    )
    add_history(
        out,
        "convert",
        source_format=adapter.format,
        to="lora",
        base=os.fspath(base) if base is not None else None,
        **rule,
    )
    inputs = adapter_inputs(adapter)
    if base is not None:
        inputs += (input_ref(base, "base"),)
    return LoraConvertResult(
        out,
        rows,
        rule,
        adapter.format,
        len(adapter.modules),
        notes,
        source_inputs=inputs,
    )


__all__ = [
    "TARGETS",
    "ConvertResult",
    "LoraConvertResult",
    "convert_adapter",
    "convert_to_lora",
    "lora_rule",
]
