"""PEFT adapters (``adapter_model.safetensors`` + ``adapter_config.json``), and the config facts
the diffusers format shares with them (``lora_adapter_metadata``).

PEFT keys: ``base_model.model.<path>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight``
``[out, r]``; embeddings ``.lora_embedding_A`` / ``.lora_embedding_B`` (no ``.weight``); DoRA
``.lora_magnitude_vector``; ``lora_bias`` ``.lora_B.bias``. Scale comes from adapter_config.json:
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with per-module ``rank_pattern`` /
``alpha_pattern`` where the first key ``k`` (dict order) with
``re.match(rf"(.*\\.)?({k})$", path)`` wins.

Diffusers writes the same keys prefixed by the component (``unet.``, ``transformer.``,
``text_encoder.``...) and stores each component's LoraConfig in the ``lora_adapter_metadata``
metadata entry as one flat JSON object with ``<component>.<field>`` keys. The reader and the
metadata helpers here serve both; the diffusers format is :mod:`lora_tools.formats.diffusers`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lora_tools import patterns as patterns_mod
from lora_tools.adapter import CONV, EMBEDDING, LINEAR, Adapter, LoraModule
from lora_tools.constants import ADAPTER_CONFIG_NAME, PEFT_WEIGHTS_NAME
from lora_tools.deltas.peft_types import peft_deltas
from lora_tools.errors import FormatError, UsageError
from lora_tools.formats.base import (
    AdapterFormat,
    AdapterSource,
    ParsedKey,
    add_foreign,
    classify_foreign,
    ensure,
    note_foreign,
    unresolved_error,
)
from lora_tools.io.atomic import atomic_dir
from lora_tools.io.jsonfile import parse_json
from lora_tools.io.safetensors import Tensor, save_tensors
from lora_tools.naming import (
    PEFT_PREFIX,
    alpha_source,
    config_number,
    pattern_key,
    split_stem,
    target_paths,
)

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
#: Module roots of Flux.1 in BFL's own names. PEFT-style keys on them without a config are fal's
#: Kontext LoRAs or BFL's Control LoRAs (diffusers ``_convert_fal_kontext_lora_to_diffusers`` /
#: ``_convert_bfl_flux_control_lora_to_diffusers``), whose modules are the transformer's.
BFL_FLUX_ROOTS = (
    "double_blocks.",
    "single_blocks.",
    "img_in",
    "txt_in",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "final_layer.",
)

#: PEFT's ``peft_type`` of the other adapter types loratool detects by their tensors
#: (:data:`lora_tools.formats.base.FOREIGN_SUFFIXES`), and the name it reports them by. Their
#: configs mean other things by ``r`` and ``alpha`` (IA3 and OFT have neither).
OTHER_PEFT_TYPES = {
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "IA3": "IA3",
    "OFT": "OFT",
    "BOFT": "BOFT",
    "VERA": "VeRA",
    "FOURIERFT": "FourierFT",
    "ADALORA": "AdaLoRA",
    "HRA": "HRA",
    "C3A": "C3A",
    "SHIRA": "SHiRA",
    "MISS": "MiSS",
    "ROAD": "RoAd",
    "WAVEFT": "WaveFT",
    "RANDLORA": "RandLoRA",
    "VBLORA": "VB-LoRA",
    "DELORA": "DeLoRA",
    "GRALORA": "GraLoRA",
}
#: Why a module's alpha is unknown when its PEFT keys come without adapter_config.json.
NO_CONFIG = f"no {ADAPTER_CONFIG_NAME}"

# The key grammar: stem + role suffix; the suffix names the role (parse_key).
_ROLE_RE = re.compile(
    r"^(?P<stem>.+)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
    r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$"
)
_ROLES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_B.bias": "bias",
    "lora_embedding_A": "down",
    "lora_embedding_B": "up",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
}


#: PEFT LoRA variants whose module computes more than ``B @ A * scale`` on the weight it names,
#: by the config field that turns each on, and the type name loratool reports them by: KaSA also
#: truncates the base weight's smallest singular components and puts ``lora_diag`` between the
#: factors (``KasaLinearVariant``); BD-LoRA stores a block-diagonal factor compactly
#: (``BdLoraLinearVariant``); ``target_parameters`` wraps an ``nn.Parameter`` (``ParamWrapper``:
#: one rank-``r`` pair per expert, stacked, on a fused 3-D expert tensor).
VARIANT_KINDS = {
    "kasa_config": "KaSA (kasa_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "target_parameters": "LoRA on parameters (target_parameters)",
}


def variant_kind(config: dict[str, Any] | None, path: str) -> str | None:
    """The :data:`VARIANT_KINDS` type of the module at ``path`` under a PEFT config, or None
    for a plain LoRA module.

    Example:
        >>> variant_kind({"target_parameters": ["experts.down_proj"]}, "model.mlp.experts")
        'LoRA on parameters (target_parameters)'
    """
    if not isinstance(config, dict):
        return None
    if config.get("kasa_config"):
        return VARIANT_KINDS["kasa_config"]
    bdlora = config.get("use_bdlora")
    if isinstance(bdlora, dict):
        # PEFT: a pattern that is a substring of the layer's name (``pattern in target_name``)
        names = [
            *(bdlora.get("target_modules_bd_a") or []),
            *(bdlora.get("target_modules_bd_b") or []),
        ]
        if any(isinstance(n, str) and n in path for n in names):
            return VARIANT_KINDS["use_bdlora"]
    params = config.get("target_parameters")
    if isinstance(params, list) and params and _wraps_parameter(config, params, path):
        return VARIANT_KINDS["target_parameters"]
    return None


def _wraps_parameter(config: dict[str, Any], params: list[Any], path: str) -> bool:
    """Whether module ``path`` is one PEFT wraps for ``target_parameters`` (``ParamWrapper``).

    PEFT matches ``<module>.<parameter>`` against each entry as a name or a dotted suffix; a
    second parameter of one module nests the wrappers, so the saved path gains ``.base_layer``.
    An entry without a module part may name a parameter of any module not in target_modules.
    """
    if ".base_layer." in f".{path}.":
        return True
    targets = config.get("target_modules") or []
    for entry in params:
        if not isinstance(entry, str):
            continue
        owner = entry.rpartition(".")[0]
        if owner and (path == owner or path.endswith("." + owner)):
            return True
        named = isinstance(targets, list) and any(
            path == t or path.endswith(f".{t}") for t in targets if isinstance(t, str)
        )
        if not owner and isinstance(targets, list) and not named:
            return True
    return False


def module_scale_params(config: dict[str, Any] | None, path: str, rank: int) -> tuple[float, bool]:
    """``(alpha, use_rslora)`` for one module under a PEFT config (alpha = rank without one,
    as diffusers reads a file without ``lora_adapter_metadata``; a config without
    ``lora_alpha`` gets LoraConfig's default, as PEFT and diffusers build it).

    An alpha that is not a finite number comes back as NaN / inf (:func:`config_number`), for
    validate to report; :meth:`~lora_tools.adapter.Adapter.require_usable_scales` refuses it
    for every operation.
    """
    if not config:
        return float(rank), False
    _, alpha = alpha_source(config, path)
    return config_number(alpha), bool(config.get("use_rslora", False))


def diffusers_component_configs(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Split diffusers' flat ``lora_adapter_metadata`` into one config per component."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = parse_json(raw, what=f"__metadata__[{DIFFUSERS_METADATA_KEY!r}]")
    except FormatError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    if isinstance(flat, dict):
        for key, value in flat.items():
            component, _, field_name = key.partition(".")
            if field_name:
                out.setdefault(component, {})[field_name] = value
    return out


class PeftFormat(AdapterFormat):
    """PEFT's own files: ``base_model.model.`` keys plus adapter_config.json."""

    name = "peft"
    description = "PEFT (adapter_model.safetensors + adapter_config.json)"
    default_filename = PEFT_WEIGHTS_NAME

    def _prefixed(self, stem: str) -> bool:
        return split_stem(stem)[0] is None

    def foreign_kind(
        self,
        stem: str,
        shapes: dict[str, tuple[int, ...]],
        config: dict[str, Any] | None = None,
    ) -> str | None:
        """A PEFT LoRA variant loratool does not compute (:func:`variant_kind`), else None."""
        component, path = split_stem(stem)
        return None if component else variant_kind(config, path)

    def parse_key(self, key: str) -> ParsedKey | None:
        """``<stem>.lora_A.weight`` -> ``(stem, "down")``; embeddings, DoRA and bias too.

        The stem keeps its prefix (``base_model.model.``, or a diffusers component).

        Example:
            >>> PeftFormat().parse_key("base_model.model.embed.lora_embedding_B")
            ParsedKey(stem='base_model.model.embed', role='up', embedding=True)
        """
        m = _ROLE_RE.match(key)
        if m is None:
            return None
        suffix = m.group("role")
        return ParsedKey(m.group("stem"), _ROLES[suffix], suffix.startswith("lora_embedding"))

    def claims(self, key: str) -> bool:
        parsed = self.parse_key(key)
        if parsed is None:
            # PEFT's other adapter types (LoHa, LoKr, IA3, OFT...) save their tensors under the
            # same prefix: detected as PEFT files (and reported as foreign types), not unknown.
            found = classify_foreign(key)
            return found is not None and found[1].startswith(PEFT_PREFIX)
        return self._prefixed(parsed.stem)

    def read(self, source: AdapterSource) -> Adapter:
        adapter = Adapter(
            format=self.name,
            metadata=source.metadata,
            config=source.config,
            source=source.weights,
            config_source=source.config_path,
        )
        component_configs = diffusers_component_configs(adapter.metadata)
        parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
        for key in source.keys:
            tensor = source.file.tensor(key)
            parsed = self.parse_key(key)
            if parsed is None:
                if not add_foreign(adapter, key, tensor):
                    adapter.passthrough[key] = tensor
                continue
            parts.setdefault(parsed.stem, {})[parsed.role] = (key, tensor)
            if parsed.embedding:
                parts[parsed.stem]["embedding"] = (key, tensor)

        foreign_stems = {s for stems in adapter._foreign_seen.values() for s in stems}
        for stem, roles in parts.items():
            if stem in foreign_stems:
                # lora_A / lora_B of another type's module (AdaLoRA's, beside its lora_E)
                for key, tensor in roles.values():
                    adapter.passthrough[key] = tensor
                continue
            if "down" not in roles or "up" not in roles:
                # A factor without its partner is not a module: keep the tensors, validate says why.
                for key, tensor in roles.values():
                    adapter.passthrough[key] = tensor
                continue
            config = source.config if not split_stem(stem)[0] else None
            other = self.foreign_kind(stem, {r: t.shape for r, (_, t) in roles.items()}, config)
            if other is not None:
                for key, tensor in roles.values():
                    note_foreign(adapter, other, stem, key, tensor)
                continue
            component, path = split_stem(stem)
            down_key, down = roles["down"]
            up_key, up = roles["up"]
            ensure(
                len(down.shape) >= 2 and len(up.shape) >= 2,
                f"module {stem!r}: factors must have at least 2 dimensions, found "
                f"{list(down.shape)} and {list(up.shape)}",
                source,
                "factor-shape",
            )
            kind = EMBEDDING if "embedding" in roles else (CONV if len(down.shape) > 2 else LINEAR)
            config = component_configs.get(component, None) if component else source.config
            if component and config is None:
                config = source.config
            # PEFT's own keys keep r and lora_alpha in adapter_config.json alone: without it
            # the scale is unknown. Keys without PEFT's prefix are other tools' (diffusers'
            # component keys, ComfyUI-style files), whose loaders read no alpha as alpha = r.
            unknown = None
            bfl = config is None and component is None and path.startswith(BFL_FLUX_ROOTS)
            if bfl:
                # fal's Kontext trainer (base_model.model.<BFL path>) and BFL's Control
                # LoRAs (bare BFL paths): diffusers loads both at scale 1 (alpha = r).
                component = "transformer"
            elif config is None and component is None and stem.startswith(PEFT_PREFIX):
                unknown = NO_CONFIG
            alpha: float | None = None
            rslora = False
            if unknown is None:
                try:
                    alpha, rslora = module_scale_params(config, path, down.shape[0])
                except FormatError as exc:
                    where = source.config_path if config is source.config else source.weights
                    raise FormatError(
                        exc.message, path=where, hint=exc.hint, kind=exc.kind
                    ) from None
            keys = {"down": down_key, "up": up_key}
            module = LoraModule(
                key=stem,
                down=down,
                up=up,
                alpha=alpha,
                kind=kind,
                path=path,
                component=component,
                rslora=rslora,
                keys=keys,
                alpha_unknown=unknown,
            )
            if "magnitude" in roles:
                keys["magnitude"], module.magnitude = roles["magnitude"]
            if "bias" in roles:
                keys["bias"], module.bias = roles["bias"]
            adapter.modules[stem] = module
        if foreign_stems and isinstance(source.config, dict):
            # PEFT's other types (LoHa, LoKr, IA3, OFT, BOFT, AdaLoRA, VeRA) by the config's
            # peft_type; their tensors stay pass-through as for every foreign module.
            adapter.deltas.update(peft_deltas(adapter.passthrough, foreign_stems, source.config))
        return adapter

    # -- writing ---------------------------------------------------------------------------

    def stem_for(self, module: LoraModule) -> str:
        if module.path is None:
            raise ValueError(module.key)
        return PEFT_PREFIX + module.path

    def tensors_for(self, adapter: Adapter) -> dict[str, Tensor]:
        """Every tensor to write, under this format's keys (original keys when present)."""
        missing = [m.key for m in adapter.modules.values() if m.path is None and not m.keys]
        if missing:
            raise unresolved_error(adapter, self.name, missing)
        out: dict[str, Tensor] = {}
        for m in adapter.modules.values():
            if m.bias_diff is not None or m.rows is not None:
                what = "a bias difference (.diff_b)" if m.bias_diff is not None else "a row range"
                raise UsageError(
                    f"module {m.key!r} has {what}, which {self.name} files cannot hold",
                    path=adapter.source,
                    hint="keep this adapter in its own format",
                )
            stem = None if m.keys else self.stem_for(m)
            emb = m.kind == EMBEDDING
            roles = {
                "down": m.down,
                "up": m.up,
                "magnitude": m.magnitude,
                "bias": m.bias,
            }
            suffix = {
                "down": "lora_embedding_A" if emb else "lora_A.weight",
                "up": "lora_embedding_B" if emb else "lora_B.weight",
                "magnitude": "lora_magnitude_vector",
                "bias": "lora_B.bias",
            }
            for role, tensor in roles.items():
                if tensor is None:
                    continue
                key = m.keys.get(role) or f"{stem or self.stem_for(m)}.{suffix[role]}"
                out[key] = tensor
        out.update(adapter.passthrough)
        return out

    def write(self, adapter: Adapter, out: Path, *, refresh_hashes: bool = False) -> Path:
        tensors = self.tensors_for(adapter)
        metadata = dict(adapter.metadata) or {"format": "pt"}
        config = peft_config_for(adapter)
        if out.suffix == ".safetensors":
            if config is not None:
                # PEFT reads r / lora_alpha from adapter_config.json beside
                # adapter_model.safetensors only; a lone file read back has an unknown scale.
                raise UsageError(
                    "a PEFT adapter is a folder: its r / lora_alpha live in adapter_config.json, "
                    "which a lone .safetensors output would lose",
                    path=out,
                    hint="give a folder as the output path",
                )
            save_tensors(out, tensors, metadata)
            return out
        with atomic_dir(out, force=True) as tmp:
            save_tensors(tmp / PEFT_WEIGHTS_NAME, tensors, metadata)
            if config is not None:
                (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return out / PEFT_WEIGHTS_NAME


# -- configs that reproduce every module's rank and alpha -------------------------------------


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _config_reproduces(config: dict[str, Any], modules: list[LoraModule]) -> bool:
    for m in modules:
        alpha, rslora = module_scale_params(config, m.path or "", m.rank)
        rank_pattern = config.get("rank_pattern") or {}
        key = (
            pattern_key(rank_pattern, m.path or "", name="rank_pattern")
            if isinstance(rank_pattern, dict)
            else None
        )
        rank = rank_pattern[key] if key is not None else config.get("r")
        if rank != m.rank or rslora != m.rslora or alpha != m.effective_alpha:
            return False
    return True


def _pattern_for(path: str, others: list[str]) -> str:
    """A rank/alpha pattern key that matches ``path`` and no other module path."""
    try:
        plain = patterns_mod.peft_pattern_matches(path, path) and not any(
            p != path and patterns_mod.peft_pattern_matches(path, p) for p in others
        )
    except patterns_mod.PatternError:
        plain = False
    return path if plain else re.escape(path)


def scale_config(modules: list[LoraModule], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern`` for modules.

    Keeps ``base`` untouched when it already reproduces every module's rank and alpha (lossless
    round trips); otherwise the most common rank and alpha become ``r`` / ``lora_alpha`` and
    every other module gets an exact entry in the patterns.
    """
    base = dict(base or {})
    if modules and base and _config_reproduces(base, modules):
        return base
    if not modules:
        return base
    rslora_values = {m.rslora for m in modules}
    rslora = rslora_values == {True}
    paths = [m.path or m.key for m in modules]

    def alpha_of(m: LoraModule) -> float:
        if m.rslora == rslora:
            return m.effective_alpha
        # Express the same scale under the config's rule.
        return m.scale * (m.rank**0.5 if rslora else m.rank)

    r = _most_common([m.rank for m in modules])
    alphas = [alpha_of(m) for m in modules]
    lora_alpha = _most_common(alphas)
    rank_pattern = {
        _pattern_for(p, paths): m.rank for p, m in zip(paths, modules, strict=True) if m.rank != r
    }
    alpha_pattern = {
        _pattern_for(p, paths): _num(a)
        for p, a in zip(paths, alphas, strict=True)
        if a != lora_alpha
    }
    base.update(
        r=r,
        lora_alpha=_num(lora_alpha),
        use_rslora=rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    return base


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def peft_config_for(adapter: Adapter) -> dict[str, Any] | None:
    """The adapter_config.json to write for ``adapter`` in PEFT format (None without modules).

    Every PEFT adapter with modules gets one: without it the scale is unknown (PEFT cannot even
    load the adapter). A missing or empty ``adapter.config`` asks for a fresh config with PEFT's
    defaults.
    """
    modules = [m for m in adapter.modules.values() if m.component is None]
    if not modules:
        # PEFT's other types (LoHa, LoKr...) alone: their config, as read, still says them
        return dict(adapter.config) if adapter.deltas and adapter.config else None
    base = adapter.config or {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.metadata.get("base_model_name_or_path"),
        "target_modules": target_paths(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_dora": any(m.dora for m in modules),
        "lora_bias": any(m.bias is not None for m in modules),
    }
    return scale_config(modules, base)


def diffusers_metadata_for(adapter: Adapter) -> dict[str, Any]:
    """The flat ``<component>.<field>`` LoraConfig dict diffusers stores in the metadata."""
    existing = diffusers_component_configs(adapter.metadata)
    by_component: dict[str, list[LoraModule]] = {}
    for m in adapter.modules.values():
        by_component.setdefault(m.component or "transformer", []).append(m)
    flat: dict[str, Any] = {}
    for component, modules in by_component.items():
        base = existing.get(component) or {
            "peft_type": "LORA",
            "target_modules": target_paths(modules),
            "use_dora": any(m.dora for m in modules),
            "lora_bias": any(m.bias is not None for m in modules),
        }
        for key, value in scale_config(modules, base).items():
            flat[f"{component}.{key}"] = value
    return flat
