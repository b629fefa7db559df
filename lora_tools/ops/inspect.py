"""``inspect``: what an adapter file holds, from its header alone (``stats``: from its factors).

The report is an :class:`InspectResult`; its ``to_json()`` is the ``inspect --json`` document
(docs/json.md). Without ``stats`` only headers are read (plus kohya's scalar alpha tensors, a
few bytes each); torch is never imported.

Example:
    >>> from lora_tools.ops.inspect import inspect_adapter
    >>> report = inspect_adapter("fixtures/peft/llama-lora")  # doctest: +SKIP
    >>> report.format, report.counts["modules"]                # doctest: +SKIP
    ('peft', 8)
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.consumers.scales import consumer_scales
from lora_tools.deltas import LOKR, DeltaError, DeltaModule
from lora_tools.formats import load_adapter
from lora_tools.formats.base import shared_foreign
from lora_tools.formats.peft import DIFFUSERS_METADATA_KEY, diffusers_component_configs
from lora_tools.lowrank import effective_rank, singular_values
from lora_tools.naming import flat_target_name
from lora_tools.results import SCHEMA_VERSION, Result, input_ref

__all__ = ["SCHEMA_VERSION", "InspectResult", "architecture_of", "base_model_of", "inspect_adapter"]
#: Histogram key of modules whose alpha (so scale) the files do not say.
UNKNOWN = "unknown"

_BLOCK_RE = re.compile(
    r"(?:^|[._])(?P<family>layers|h|blk|blocks|down_blocks|up_blocks|input_blocks|output_blocks|"
    r"double_blocks|single_blocks|transformer_blocks|single_transformer_blocks|resblocks)"
    r"[._](?P<index>\d+)(?=[._]|$)"
)
_MID_RE = re.compile(r"(?:^|[._])(mid_block|middle_block)(?=[._]|$)")
#: kohya / modelspec metadata worth showing in the human view.
NOTABLE_METADATA = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_sd_model_name",
    "ss_output_name",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_optimizer",
    "ss_lr_scheduler",
    "ss_num_epochs",
    "ss_max_train_steps",
    "ss_steps",
    "ss_resolution",
    "ss_mixed_precision",
    "ss_seed",
    "ss_training_comment",
    "ss_training_started_at",
    "modelspec.architecture",
    "modelspec.title",
    "sshs_model_hash",
    # llama.cpp LoRA GGUF key-values (what llama_adapter_lora_init reads, and the card)
    "general.architecture",
    "general.type",
    "adapter.type",
    "adapter.lora.alpha",
    "adapter.alora.invocation_tokens",
    "general.name",
    "general.base_model.0.name",
)
NOTABLE_CONFIG = (
    "peft_type",
    "fine_tune_type",
    "num_layers",
    "lora_parameters",
    "task_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "fan_in_fan_out",
    "init_lora_weights",
    "lora_bias",
    "bias",
)


def block_of(module: LoraModule | DeltaModule) -> tuple[str, int | None] | None:
    """``(family, index)`` of the block a module sits in (``("layers", 3)``), if recognisable."""
    text = _text_of(module)
    matches = list(_BLOCK_RE.finditer(text))
    if matches:
        first = matches[0]
        return first.group("family"), int(first.group("index"))
    m = _MID_RE.search(text)
    if m:
        return m.group(1), None
    return None


def _text_of(module: LoraModule | DeltaModule) -> str:
    """The module's full path when known, else its key (what block and target names read)."""
    if isinstance(module, LoraModule):
        return module.full_path or module.key
    if module.path is None:
        return module.key
    return f"{module.component}.{module.path}" if module.component else module.path


def _target_of(module: LoraModule | DeltaModule) -> str:
    if isinstance(module, LoraModule):
        return module.target_name
    if module.path:
        parts = module.path.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
    return flat_target_name(module.key)


def base_model_of(adapter: Adapter) -> dict[str, str] | None:
    """The checkpoint or Hub id the adapter was trained on, as its trainer recorded it, with
    where it was found; never an architecture (see :func:`architecture_of`)."""
    cfg = adapter.config or {}
    meta = adapter.metadata
    found = [
        ("adapter_config.json base_model_name_or_path", cfg.get("base_model_name_or_path")),
        ("adapter_config.json model", cfg.get("model") if adapter.format == "mlx" else None),
        ("metadata ss_sd_model_name", meta.get("ss_sd_model_name")),
        (
            "metadata general.base_model.0.name",
            meta.get("general.base_model.0.name") if adapter.format == "gguf" else None,
        ),
    ]
    for component, config in diffusers_component_configs(meta).items():
        source = f"metadata {DIFFUSERS_METADATA_KEY} {component}.base_model_name_or_path"
        found.append((source, config.get("base_model_name_or_path")))
    for source, value in found:
        if value:
            return {"name": str(value), "source": source}
    return None


#: ``modelspec.architecture`` (sd-scripts' sai_model_spec IDs, adapter suffix removed) and
#: kohya's / musubi-tuner's ``ss_base_model_version`` prefixes (``_`` read as ``-``), in order.
_RECORDED_ARCHITECTURES = (
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-3", "sd3"),
    ("sdxl", "sdxl"),
    ("sd-v1", "sd1"),
    ("sd-v2", "sd2"),
    ("sd3", "sd3"),
    ("flux", "flux"),
    ("chroma", "chroma"),
    ("lumina", "lumina"),
    ("hunyuan-video", "hunyuan-video"),
    ("wan", "wan"),
    ("qwen-image", "qwen-image"),
)
#: Module-name signs, tried in order: architecture -> pattern on a module's path or key.
_NAME_SIGNS = (
    (
        "hunyuan-video",
        re.compile(r"token_refiner|(?:img|txt)_mlp[._]fc[12](?:[._]|$)|(?:img|txt)_mod[._]linear"),
    ),
    (
        "flux",
        re.compile(r"(?:^|[._])(?:double_blocks|single_blocks|single_transformer_blocks)[._]\d"),
    ),
    ("qwen-image", re.compile(r"transformer_blocks[._]\d+[._](?:img|txt)_(?:mlp|mod)")),
    (
        "sd3",
        re.compile(
            r"(?:^|[._])joint_blocks[._]\d|transformer_blocks[._]\d+[._]"
            r"(?:attn[._]add_[qkv]_proj|attn[._]to_add_out|ff_context)"
        ),
    ),
    (
        "wan",
        re.compile(
            r"(?:^|\.|lora_unet_|lycoris_)blocks[._]\d+[._](?:self_attn|cross_attn|attn1|attn2|ffn)"
        ),
    ),
)
_UNET_RE = re.compile(
    r"(?:^|[._])(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)(?:[._]|$)"
)
_DEEP_RE = re.compile(r"transformer_blocks[._][1-9]")
_TE_LAYER_RE = re.compile(r"(?:^|[._])(?:te|text_encoder|text_model)[._].*?layers[._](\d+)")
_CROSS_KV_RE = re.compile(r"attn2[._]to_[kv]$")
#: SD UNets' cross-attention width (the text encoder's): SD1 CLIP-L, SD2 OpenCLIP-H, SDXL both.
_CROSS_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_LLM_RE = re.compile(
    r"(?:^|[._])(?:layers[._]\d+[._](?:self_attn|mlp)|h[._]\d+[._](?:attn|mlp))[._]"
)


def architecture_of(adapter: Adapter) -> dict[str, str | None] | None:
    """The architecture the adapter is for: ``{"name", "source", "recorded"}``.

    From the metadata first (``modelspec.architecture``, kohya's ``ss_base_model_version``,
    ``ss_v2``; ``recorded`` is the value as written), else guessed from the module names
    (``source: "module names"``, ``recorded`` None); None when neither says.
    """
    meta = adapter.metadata
    if adapter.format == "gguf" and meta.get("general.architecture"):
        # llama.cpp's own name for it (``llama``, ``qwen2``), which it checks at load
        value = meta["general.architecture"]
        return {"name": value, "source": "metadata general.architecture", "recorded": value}
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = meta.get(key)
        if value:
            return {"name": _recorded_name(value), "source": f"metadata {key}", "recorded": value}
    if meta.get("ss_v2") == "True":
        return {"name": "sd2", "source": "metadata ss_v2", "recorded": "True"}
    name = _name_from_modules(list(adapter.modules.values()))
    return None if name is None else {"name": name, "source": "module names", "recorded": None}


def _recorded_name(value: str) -> str:
    """``stable-diffusion-v1/lora`` -> ``sd1``; an ID not known here, without its adapter
    suffix, as written."""
    plain = value.split("/", 1)[0].strip()
    spelled = plain.lower().replace("_", "-")
    for prefix, name in _RECORDED_ARCHITECTURES:
        if spelled.startswith(prefix):
            return name
    return plain or value


def _name_from_modules(modules: list[LoraModule]) -> str | None:
    texts = [m.full_path or m.key for m in modules]
    for name, sign in _NAME_SIGNS:
        if any(sign.search(t) for t in texts):
            return name
    unet = [t for t in texts if _UNET_RE.search(t)]
    te2 = any(m.component == "text_encoder_2" or m.key.startswith("lora_te2_") for m in modules)
    widths = {
        _CROSS_WIDTHS.get(m.in_features)
        for m in modules
        if _CROSS_KV_RE.search(m.full_path or m.key)
    }
    if te2 or any(_DEEP_RE.search(t) for t in unet) or "sdxl" in widths:
        return "sdxl"
    te_layers = [int(m.group(1)) for t in texts if (m := _TE_LAYER_RE.search(t))]
    if "sd2" in widths or any(n >= 12 for n in te_layers):  # CLIP-L has 12 layers, SD2's 23
        return "sd2"
    if "sd1" in widths:
        return "sd1"
    if unet or te_layers:
        return "sd"
    if any(_LLM_RE.search(t) for t in texts):
        return "llm"
    return None


def human_size(nbytes: int) -> str:
    """``12.3 kB`` (decimal units, as the Hub shows sizes)."""
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{nbytes} B"


def _histogram(values: list[Any]) -> dict[str, int]:
    counts = Counter(values)
    return {_fmt_key(k): v for k, v in sorted(counts.items(), key=lambda kv: _sort_key(kv[0]))}


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)):
        return (0, value if not math.isnan(value) else math.inf)
    return (1, str(value))


def _fmt_key(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def robust_outliers(values: list[float], threshold: float = 3.5) -> list[bool]:
    """Flag values far from the rest on a log scale (modified z-score > ``threshold``).

    Uses median and median absolute deviation of ``log10(value)``, so a module ten times
    stronger than its peers stands out while natural spread does not. Zero values are never
    flagged here (an all-zero update is its own finding).
    """
    logs = np.array([math.log10(v) if v > 0 else np.nan for v in values])
    finite = logs[np.isfinite(logs)]
    if finite.size < 4:
        return [False] * len(values)
    median = float(np.median(finite))
    mad = float(np.median(np.abs(finite - median)))
    if mad == 0:
        mad = 1e-3  # all peers equal: flag only clear departures (factor > ~1.02)
    z = 0.6745 * (logs - median) / mad
    return [bool(np.isfinite(zi) and abs(zi) > threshold) for zi in z]


def module_stats(module: LoraModule) -> dict[str, Any]:
    """||dW||_F, largest singular value and effective rank of one module's scaled update.

    With the alpha unknown the norms are unknown too (None); the effective rank does not
    depend on the scale.
    """
    U, V = module.factors()
    if not (np.all(np.isfinite(U)) and np.all(np.isfinite(V))):
        return {"frobenius": None, "spectral": None, "effective_rank": None, "finite": False}
    known = module.alpha_unknown is None
    S = singular_values(U, V, module.scale if known else 1.0)
    return {
        "frobenius": float(np.sqrt(np.sum(S**2))) if known else None,
        "spectral": (float(S[0]) if S.size else 0.0) if known else None,
        "effective_rank": round(effective_rank(S), 4),
        "finite": True,
    }


def _alpha_label(m: LoraModule) -> Any:
    if m.alpha_unknown is not None:
        return UNKNOWN
    return "none" if m.alpha is None else m.alpha


def _scale_or_none(m: LoraModule) -> float | None:
    return None if m.alpha_unknown is not None else m.scale


def _dims(shape: tuple[int, ...] | None) -> str:
    return "?" if shape is None else " x ".join(map(str, shape))


def foreign_structure(
    kind: str, tensors: dict[str, tuple[int, ...]], on_input: int | None = None
) -> str:
    """One line on what a non-LoRA module's tensors make (``tensors``: name after the module
    stem -> shape), from the shapes alone; the tensors' own shapes where the type is unknown.
    ``on_input``: a LyCORIS IA3 module's ``on_input`` value (which side it scales), if read.

    Example:
        >>> foreign_structure("LoKr", {"lokr_w1": (4, 4), "lokr_w2": (4, 8)})
        'kron(4 x 4, 4 x 8) -> 16 x 32'
        >>> foreign_structure("OFT", {"oft_R.weight": (4, 6)})
        '4 blocks of 4 x 4 (6 parameters each, skew-symmetric)'
        >>> foreign_structure("OFT", {"oft_blocks": (4, 2, 2), "alpha": ()})
        '4 blocks of 2 x 2 (Cayley rotation of the outputs)'
    """
    t = {name.removesuffix(".weight"): shape for name, shape in tensors.items()}
    if kind == "LoHa" and "hada_w1_a" in t and "hada_w1_b" in t:
        w1a, w1b = t["hada_w1_a"], t["hada_w1_b"]
        tucker = "hada_t1" in t
        rank = w1a[0] if tucker else w1a[-1]
        out = w1a[1] if tucker else w1a[0]
        return f"rank {rank}: (w1_a w1_b) * (w2_a w2_b) -> {out} x {w1b[-1]}" + (
            ", Tucker" if tucker else ""
        )
    if kind == "LoKr":
        w1 = t.get("lokr_w1") or (
            (t["lokr_w1_a"][0], t["lokr_w1_b"][-1])
            if {"lokr_w1_a", "lokr_w1_b"} <= set(t)
            else None
        )
        w2 = t.get("lokr_w2") or (
            (t["lokr_w2_a"][0], t["lokr_w2_b"][-1])
            if {"lokr_w2_a", "lokr_w2_b"} <= set(t)
            else None
        )
        if w1 is not None and w2 is not None and len(w1) >= 2 and len(w2) >= 2:
            low = [n for n in ("w1", "w2") if f"lokr_{n}_a" in t]
            rank = f", {'/'.join(low)} rank {t[f'lokr_{low[0]}_a'][-1]}" if low else ""
            result = f"{w1[0] * w2[0]} x {w1[1] * w2[1]}"
            return f"kron({_dims(w1[:2])}, {_dims(w2[:2])}) -> {result}{rank}"
    if kind in ("OFT", "BOFT") and "oft_blocks" in t and len(t["oft_blocks"]) in (3, 4):
        shape = t["oft_blocks"]
        size = f"{shape[-1]} x {shape[-1]}"
        rescale = ", rescaled outputs" if "rescale" in t else ""
        if len(shape) == 4:  # LyCORIS BOFT: [factors, blocks, b, b]
            return f"{shape[0]} butterfly factor(s) of {shape[1]} blocks {size}{rescale}"
        return f"{shape[0]} blocks of {size} (Cayley rotation of the outputs){rescale}"
    if kind == "GLoRA" and {"a1", "a2", "b1", "b2"} <= set(t):
        a2, b1, b2 = t["a2"], t["b1"], t["b2"]
        kernel = f" x {_dims(b2[2:])}" if len(b2) > 2 and math.prod(b2[2:]) > 1 else ""
        return f"W + W (a1 a2) + b1 b2, a rank {a2[0]}, b rank {b2[0]} -> {b1[0]} x {b2[1]}{kernel}"
    if kind == "IA3" and "weight" in t and "ia3_l" not in t:
        side = {0: "outputs", 1: "inputs"}.get(on_input, "inputs or outputs (on_input says)")
        return f"vector of {math.prod(t['weight'])} scaling the {side}"
    if kind == "IA3" and "ia3_l" in t:
        shape = t["ia3_l"]
        n = math.prod(shape)
        side = "inputs (feed-forward)" if len(shape) == 2 and shape[0] == 1 else "outputs"
        return f"vector of {n} scaling the {side}"
    if kind == "OFT" and "oft_R" in t and len(t["oft_R"]) == 2:
        blocks, params = t["oft_R"]
        size = round((1 + math.sqrt(1 + 8 * params)) / 2)
        return f"{blocks} blocks of {size} x {size} ({params} parameters each, skew-symmetric)"
    if kind == "BOFT" and "boft_R" in t and len(t["boft_R"]) == 4:
        factors, blocks, b, _ = t["boft_R"]
        scale = f", scale [{math.prod(t['boft_s'])}]" if "boft_s" in t else ""
        return f"{factors} butterfly factor(s) of {blocks} blocks {b} x {b}{scale}"
    if kind == "VeRA" and "vera_lambda_b" in t and "vera_lambda_d" in t:
        return (
            f"rank {math.prod(t['vera_lambda_d'])}: lambda_b [{math.prod(t['vera_lambda_b'])}] "
            "x shared vera_B, lambda_d x shared vera_A"
        )
    if kind == "FourierFT" and "fourierft_spectrum" in t:
        return f"{math.prod(t['fourierft_spectrum'])} spectral coefficients"
    return ", ".join(f"{name} [{', '.join(map(str, shape))}]" for name, shape in t.items())


def _foreign_rows(adapter: Adapter) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
    """One row per non-LoRA module loratool does not compute (type, tensors, structure), and
    the shared tensors."""
    by_stem: dict[str, dict[str, tuple[int, ...]]] = {}
    on_input: dict[str, int] = {}
    stems = {stem: kind for kind, found in adapter.uncomputed().items() for stem in found}
    shared: dict[str, list[int]] = {}
    for key, tensor in adapter.passthrough.items():
        if shared_foreign(key) is not None:
            shared[key] = list(tensor.shape)
            continue
        stem, _, rest = key.rpartition(".")
        while stem and stem not in stems:
            stem, _, part = stem.rpartition(".")
            rest = f"{part}.{rest}"
        if stem:
            by_stem.setdefault(stem, {})[rest] = tuple(tensor.shape)
            if rest == "on_input" and tensor.numel == 1 and not tensor.dtype.startswith("F8"):
                # one number, like a kohya alpha: which side a LyCORIS IA3 module scales
                on_input[stem] = int(np.asarray(tensor.numpy()).reshape(-1)[0])
    rows = [
        {
            "module": stem,
            # LyCORIS BOFT uses OFT's tensor names, its blocks 4-D (butterfly factors)
            "type": "BOFT"
            if kind == "OFT" and len(by_stem.get(stem, {}).get("oft_blocks", ())) == 4
            else kind,
            "tensors": {name: list(shape) for name, shape in by_stem.get(stem, {}).items()},
            "structure": foreign_structure(kind, by_stem.get(stem, {}), on_input.get(stem)),
        }
        for stem, kind in stems.items()
    ]
    return rows, shared


def _axis(m: DeltaModule) -> str | None:
    """Which side a module's ``dora_scale`` normalises (LyCORIS ``wd_on_output``): ``output``
    (``[out, 1, ...]``), ``input`` (``[1, in, ...]``), or None without one."""
    scale = m.dora_scale
    if scale is None:
        return None
    shape = tuple(scale.shape)
    if len(shape) >= 2 and shape[0] == 1 and math.prod(shape) > 1:
        return "input"
    return "output"


def delta_structure(m: DeltaModule) -> str:
    """One line on what a module of a computed type makes, from its tensors' shapes.

    Example:
        >>> import numpy as np
        >>> from lora_tools.deltas import LOKR
        >>> from lora_tools.io.safetensors import ArrayTensor
        >>> t = {k: ArrayTensor(np.zeros(s, np.float32)) for k, s in
        ...      {"lokr_w1": (2, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 8)}.items()}
        >>> delta_structure(DeltaModule("m", LOKR, t, alpha=1.0))
        'kron(2 x 2, 4 x 8) -> 8 x 16, w2 = w2_a w2_b of rank 1'
    """
    out = _dims(m.delta_shape)
    shapes = {role: m.shape(role) for role in m.tensors}
    if m.type == "LoHa":
        text = f"rank {m.rank}: (w1_a w1_b) * (w2_a w2_b) -> {out}"
        if "hada_t1" in shapes:
            text += f", Tucker cores {_dims(shapes['hada_t1'])}"
    elif m.type == LOKR:
        w1 = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        w2 = shapes.get("lokr_w2") or (shapes["lokr_w2_a"][0], shapes["lokr_w2_b"][1])
        if "lokr_t2" in shapes:
            w2 = (shapes["lokr_w2_a"][1], shapes["lokr_w2_b"][1], *shapes["lokr_t2"][2:])
        sides = []
        if "lokr_w1_a" in shapes:
            sides.append(f"w1 = w1_a w1_b of rank {shapes['lokr_w1_b'][0]}")
        if "lokr_w2_a" in shapes:
            core = f", Tucker core {_dims(shapes['lokr_t2'])}" if "lokr_t2" in shapes else ""
            sides.append(f"w2 = w2_a w2_b of rank {shapes['lokr_w2_b'][0]}{core}")
        text = f"kron({_dims(w1)}, {_dims(w2)}) -> {out}, " + ("; ".join(sides) or "both whole")
    elif m.type == "Tucker LoCon":
        text = f"rank {m.rank}: up x core {_dims(shapes['lora_mid'])} x down -> {out}"
    elif m.type == "full diff":
        text = f"diff {out}"
    elif m.type == "kohya DoRA":
        text = f"rank {m.rank}: up down -> {out}"
    else:
        text = foreign_structure(m.type, shapes, m.options.get("on_input"))
    if m.bias_diff is not None:
        text += f", bias diff [{math.prod(m.bias_diff.shape)}]"
    axis = _axis(m)
    if axis is not None:
        text += f", weight-decomposed on the {axis}s (dora_scale {_dims(shapes['dora_scale'])})"
    return text


def _delta_parameters(m: DeltaModule) -> int:
    """Trained numbers in a module: its tensors but alpha, with its bias difference."""
    return m.parameters + (0 if m.bias_diff is None else math.prod(m.bias_diff.shape))


def _as_lora(m: DeltaModule) -> int | None:
    """The parameters of a plain LoRA of the module's rank on the same update, ``r (out +
    in)``; None where the type has no rank that a LoRA's would mean (LoKr, full, OFT, IA3)."""
    if m.type not in ("LoHa", "Tucker LoCon", "kohya DoRA", "GLoRA") or m.rank is None:
        return None
    out, inp = m.update_dims
    return None if inp is None else m.rank * (out + inp)


def _delta_row(m: DeltaModule) -> dict[str, Any]:
    """One entry of ``delta_modules``: what the header says about one module of another type."""
    tensors = {role: list(m.shape(role)) for role in m.tensors}
    if m.bias_diff is not None:
        tensors["diff_b"] = list(m.bias_diff.shape)
    return {
        "module": m.key,
        "type": m.type,
        "kind": m.kind,
        "component": m.component,
        "target": _target_of(m),
        "rank": m.rank,
        "alpha": "none" if m.alpha is None else m.alpha,
        "scale": m.scale,
        "update": list(m.delta_shape),
        "structure": delta_structure(m),
        "tensors": tensors,
        "parameters": _delta_parameters(m),
        "lora_parameters": _as_lora(m),
        "needs_base": m.needs_base,
        "dora_scale": _axis(m),
    }


@dataclass(frozen=True, repr=False)
class InspectResult(Result):
    """What :func:`inspect_adapter` found; ``to_json()`` is the ``inspect --json`` document.

    Attributes:
        path: the weights file (None for an in-memory adapter); files: it and its config.
        file_size_bytes: the files' total size.
        format / variants: the naming scheme and the adapter types in it (``lora``, ``dora``...).
        architecture: ``{"name", "source", "recorded"}`` (:func:`architecture_of`), or None.
        base_model: ``{"name", "source"}``, the trained-on checkpoint or Hub id as recorded in
            the config or metadata (:func:`base_model_of`), or None.
        modules: one ``{"module", "kind", "component", "target", "rank", "alpha", "scale"}``
            per module (``alpha``: a number, ``"none"`` or ``"unknown"``; ``scale`` None when
            unknown).
        by_kind / by_component / targets / blocks: module counts per kind, per component, per
            target layer name, and the block indices per block family.
        rank / alpha / scale: histograms (``alpha["unknown"]``: why the alpha is unknown).
        rslora / dora: whether any module uses them.
        dtypes: tensor count per dtype; parameters: ``{"lora", "passthrough"}`` element counts.
        passthrough_tensors: full tensors stored beside the modules; unsupported: module count
            per adapter type detected but not computed (:meth:`Adapter.uncomputed`).
        delta_modules: one row per module of another type loratool computes (LoHa, LoKr...:
            :attr:`Adapter.deltas`), see :func:`_delta_row`; by_type: module count per such
            type and per unsupported type.
        foreign_modules: one ``{"module", "type", "tensors", "structure"}`` per module of an
            unsupported type (``tensors``: name -> shape; ``structure``:
            :func:`foreign_structure`); shared_tensors: tensors every module of a type shares
            (VeRA's), name -> shape.
        metadata / config: the file's metadata and adapter config, as stored.
        stats: with ``stats=True``, ``{"modules": [per-module norms], "delta_modules": [the
            same for the other types], "outliers", "non_finite", "zero",
            "frobenius_median"}``; else None.
        consumers: with ``consumers=True``, the scale each consumer applies to each module
            beside loratool's (:meth:`lora_tools.consumers.scales.ScaleTable.to_json`); else
            None.
    """

    command = "inspect"

    path: str | None
    files: tuple[str, ...]
    file_size_bytes: int
    format: str
    variants: list[str]
    architecture: dict[str, str | None] | None
    base_model: dict[str, str] | None
    modules: tuple[dict[str, Any], ...]
    by_kind: dict[str, int]
    by_component: dict[str, int]
    targets: dict[str, int]
    blocks: dict[str, list[int]]
    rank: dict[str, Any]
    alpha: dict[str, Any]
    scale: dict[str, Any]
    rslora: bool
    dora: bool
    dtypes: dict[str, int]
    parameters: dict[str, int]
    passthrough_tensors: list[str]
    unsupported: dict[str, int]
    delta_modules: tuple[dict[str, Any], ...]
    by_type: dict[str, int]
    foreign_modules: tuple[dict[str, Any], ...]
    shared_tensors: dict[str, list[int]]
    metadata: dict[str, str]
    config: dict[str, Any] | None
    stats: dict[str, Any] | None = None
    consumers: dict[str, Any] | None = None

    @property
    def counts(self) -> dict[str, int]:
        """``{"modules", "delta_modules", "passthrough_tensors", "files"}`` counts
        (``modules``: LoRA modules; ``delta_modules``: modules of the other computed types)."""
        return {
            "modules": len(self.modules),
            "delta_modules": len(self.delta_modules),
            "passthrough_tensors": len(self.passthrough_tensors),
            "files": len(self.files),
        }

    def inputs(self) -> list[dict[str, Any]]:
        refs = []
        for i, p in enumerate(self.files):
            weights = i == 0 and self.path is not None
            refs.append(
                input_ref(p, "adapter", format=self.format) if weights else input_ref(p, "config")
            )
        return refs

    def fields(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "file_size_bytes": self.file_size_bytes,
            "format": self.format,
            "variants": list(self.variants),
            "architecture": self.architecture,
            "base_model": self.base_model,
            "counts": self.counts,
            "modules": [dict(m) for m in self.modules],
            "by_kind": dict(self.by_kind),
            "by_component": dict(self.by_component),
            "targets": dict(self.targets),
            "blocks": dict(self.blocks),
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.scale,
            "rslora": self.rslora,
            "dora": self.dora,
            "dtypes": dict(self.dtypes),
            "parameters": dict(self.parameters),
            "passthrough_tensors": list(self.passthrough_tensors),
            "unsupported": dict(self.unsupported),
            "delta_modules": [dict(m) for m in self.delta_modules],
            "by_type": dict(self.by_type),
            "foreign_modules": [dict(m) for m in self.foreign_modules],
            "shared_tensors": dict(self.shared_tensors),
            "metadata": dict(self.metadata),
            "config": self.config,
            "stats": self.stats,
            "consumers": self.consumers,
        }


def inspect_adapter(
    path_or_adapter: str | os.PathLike[str] | Adapter,
    *,
    stats: bool = False,
    consumers: bool = False,
) -> InspectResult:
    """Describe an adapter; see docs/json.md for every field.

    Args:
        path_or_adapter: an adapter file or folder (a llama.cpp LoRA GGUF too), or an
            already loaded Adapter.
        stats: also compute per-module norms and spectra from the factors (reads the data).
        consumers: also say the scale each consumer (PEFT, diffusers, ComfyUI, vLLM, SGLang,
            TGI, llama.cpp) applies to each module (header only).
    """
    adapter = (
        path_or_adapter
        if isinstance(path_or_adapter, Adapter)
        else load_adapter(path_or_adapter, gguf=True, strict=False)
    )
    modules = list(adapter.modules.values())
    deltas = list(adapter.deltas.values())
    files = [p for p in (adapter.source, adapter.config_source) if p is not None]
    dtypes = Counter(
        t.dtype
        for m in modules
        for t in (m.down, m.up, m.magnitude, m.bias, m.alpha_tensor)
        if t is not None
    ) + Counter(t.dtype for t in adapter.passthrough.values())

    blocks: dict[str, set[int]] = {}
    for m in [*modules, *deltas]:
        found = block_of(m)
        if found:
            family, index = found
            entries = blocks.setdefault(family, set())
            if index is not None:
                entries.add(index)

    foreign_rows, shared = _foreign_rows(adapter)
    delta_rows = [_delta_row(m) for m in deltas]
    return InspectResult(
        path=str(adapter.source) if adapter.source else None,
        files=tuple(str(p) for p in files),
        file_size_bytes=sum(Path(p).stat().st_size for p in files),
        format=adapter.format,
        variants=list(adapter.variants),
        architecture=architecture_of(adapter),
        base_model=base_model_of(adapter),
        modules=tuple(_module_row(m) for m in modules),
        by_kind=dict(Counter(m.kind for m in modules)),
        by_component=dict(Counter(m.component or "model" for m in [*modules, *deltas])),
        targets=dict(Counter(_target_of(m) for m in [*modules, *deltas]).most_common()),
        blocks={family: sorted(idx) for family, idx in blocks.items()},
        rank={
            "histogram": _histogram([m.rank for m in modules]),
            "min": min((m.rank for m in modules), default=None),
            "max": max((m.rank for m in modules), default=None),
        },
        alpha={
            "histogram": _histogram([_alpha_label(m) for m in modules]),
            "unknown": adapter.alpha_unknown,
        },
        scale={
            "histogram": _histogram([UNKNOWN if m.alpha_unknown else m.scale for m in modules]),
        },
        rslora=any(m.rslora for m in modules),
        dora=any(m.dora for m in modules),
        dtypes=dict(dtypes.most_common()),
        parameters=_parameters(adapter, modules, deltas),
        passthrough_tensors=sorted(set(adapter.passthrough) - _owned_keys(deltas)),
        unsupported=dict(Counter(r["type"] for r in foreign_rows)),
        delta_modules=tuple(delta_rows),
        by_type=dict(Counter(r["type"] for r in [*delta_rows, *foreign_rows])),
        foreign_modules=tuple(foreign_rows),
        shared_tensors=shared,
        metadata=dict(adapter.metadata),
        config=adapter.config,
        stats=_stats(modules, deltas) if stats else None,
        consumers=consumer_scales(adapter).to_json() if consumers else None,
    )


def _owned_keys(deltas: list[DeltaModule]) -> set[str]:
    """The keys of the other types' modules: their tensors, not tensors beside the modules."""
    return {key for m in deltas for key in m.keys.values()}


def _parameters(
    adapter: Adapter, modules: list[LoraModule], deltas: list[DeltaModule]
) -> dict[str, Any]:
    """``parameters``: element counts of the LoRA factors, of the other types' modules (and
    what plain LoRAs of their ranks would hold), and of the pass-through tensors."""
    owned = _owned_keys(deltas)
    return {
        "lora": sum(m.parameter_count for m in modules),
        "passthrough": sum(t.numel for t in adapter.passthrough.values()),
        "deltas": sum(_delta_parameters(m) for m in deltas),
        "deltas_as_lora": sum(_as_lora(m) or 0 for m in deltas),
        "other_passthrough": sum(t.numel for k, t in adapter.passthrough.items() if k not in owned),
    }


def _module_row(m: LoraModule) -> dict[str, Any]:
    """One entry of ``modules``: what the header says about one module."""
    return {
        "module": m.key,
        "kind": m.kind,
        "component": m.component,
        "target": m.target_name,
        "rank": m.rank,
        "alpha": _alpha_label(m),
        "scale": _scale_or_none(m),
    }


NEEDS_BASE = "needs the base"


def delta_stats(m: DeltaModule) -> dict[str, Any]:
    """||dW||_F, largest singular value and effective rank of one module's update at strength
    1, from :func:`lora_tools.deltas.factors.singular_values` (LoKr from its factors' singular
    values, the other factored types through a QR of their factors: never a matrix of the
    update's size, but for a full diff, which is one).

    A type whose update depends on the base weight (OFT, GLoRA, IA3, a weight decomposition)
    has no norm without it: ``frobenius`` is None and ``note`` says so (inspect reads no base).
    """
    from lora_tools.deltas.factors import singular_values as delta_singular_values

    finite = all(np.all(np.isfinite(m.array(role))) for role in m.tensors)
    row: dict[str, Any] = {"frobenius": None, "spectral": None, "effective_rank": None}
    row.update(finite=finite, note=None)
    if m.needs_base:
        row["note"] = NEEDS_BASE
        return row
    if not finite:
        return row
    try:
        S = delta_singular_values(m)
    except DeltaError as exc:
        row["note"] = str(exc)
        return row
    row["frobenius"] = float(np.sqrt(np.sum(S**2)))
    row["spectral"] = float(S[0]) if S.size else 0.0
    row["effective_rank"] = round(effective_rank(S), 4)
    return row


def _stats(modules: list[LoraModule], deltas: list[DeltaModule]) -> dict[str, Any]:
    rows = []
    for m in modules:
        row = {"module": m.key, "rank": m.rank, "scale": _scale_or_none(m), **module_stats(m)}
        rows.append(row)
    delta_rows = [
        {"module": m.key, "type": m.type, "rank": m.rank, "scale": m.scale, **delta_stats(m)}
        for m in deltas
    ]
    every = [*rows, *delta_rows]
    norms = [r["frobenius"] if r["frobenius"] is not None else 0.0 for r in every]
    flags = robust_outliers(norms)
    for row, flag in zip(every, flags, strict=True):
        row["outlier"] = flag
    finite = [n for n in norms if n > 0]
    return {
        "modules": rows,
        "delta_modules": delta_rows,
        "outliers": [r["module"] for r in every if r["outlier"]],
        "non_finite": [r["module"] for r in every if not r["finite"]],
        "zero": [r["module"] for r in every if r["finite"] and r["frobenius"] == 0],
        "frobenius_median": float(np.median(finite)) if finite else 0.0,
    }
