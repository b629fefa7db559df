"""Pipeline LoRA files for the deployment-profile tests: the SD fixtures and variants of them.

Each variant is a fixture with a few tensors or metadata fields changed (``rewrite``): a kohya
file with one alpha removed, an extra T5 module or a ``diff_b``; a diffusers file with DoRA
magnitudes, ``use_rslora`` or ``alpha_pattern`` in its ``lora_adapter_metadata``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

FIX = Path(__file__).resolve().parents[2] / "fixtures"
SD = FIX / "bases/tiny-sd"
SD_KOHYA = FIX / "kohya/sd-lora.safetensors"
SD_DIFFUSERS = FIX / "diffusers/sd-lora/pytorch_lora_weights.safetensors"
ONE_MODULE = "lora_unet_down_blocks_1_attentions_0_proj_in"


def rewrite(src: Path, out: Path, change) -> Path:
    """``src`` with its tensors (and metadata) changed by ``change(tensors, metadata)``."""
    tensors = load_file(src)
    with safe_open(src, "np") as f:
        metadata = dict(f.metadata() or {})
    change(tensors, metadata)
    for key in ("sshs_model_hash", "sshs_legacy_hash"):  # the tensors changed
        metadata.pop(key, None)
    save_file(tensors, out, metadata=metadata)
    return out


def diffusers_metadata(change) -> callable:
    def edit(tensors, metadata):
        config = json.loads(metadata["lora_adapter_metadata"])
        change(config)
        metadata["lora_adapter_metadata"] = json.dumps(config)

    return edit


def _drop_alpha(tensors, metadata):
    del tensors[f"{ONE_MODULE}.alpha"]


def _extra_key(tensors, metadata):
    # one T5 module (Flux's lora_te3_), copied from a text-encoder module of the file
    like = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    for role in ("lora_down.weight", "lora_up.weight", "alpha"):
        tensors[f"lora_te3_encoder_block_0_layer_0_SelfAttention_q.{role}"] = tensors[
            f"{like}.{role}"
        ]


def _lokr(tensors, metadata):
    # every linear module as a LoKr: w1 [1, 1] (x) w2 [out, in] (full), the same alpha
    rng = np.random.default_rng(0)
    for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
        stem = key.removesuffix(".lora_down.weight")
        down, up = tensors.pop(key), tensors.pop(f"{stem}.lora_up.weight")
        if down.ndim != 2:
            tensors.pop(f"{stem}.alpha", None)
            continue
        tensors[f"{stem}.lokr_w1"] = np.ones((1, 1), np.float32)
        tensors[f"{stem}.lokr_w2"] = rng.normal(0, 0.01, (up.shape[0], down.shape[1])).astype(
            np.float32
        )


def mixed_ranks_without_metadata(tensors, metadata):
    """Rank 2 for the first text-encoder module (in key order) and every UNet ``attn2`` module
    (the rest stay rank 4); no ``lora_adapter_metadata``."""
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        if "layers.0.self_attn.k_proj" in key or ".attn2." in key:
            stem = key.removesuffix(".lora_A.weight")
            tensors[key] = tensors[key][:2].copy()
            tensors[f"{stem}.lora_B.weight"] = tensors[f"{stem}.lora_B.weight"][:, :2].copy()
    metadata.pop("lora_adapter_metadata")


def _diff_b(tensors, metadata):
    out = tensors[f"{ONE_MODULE}.lora_up.weight"].shape[0]
    tensors[f"{ONE_MODULE}.diff_b"] = np.full((out,), 0.01, np.float32)


def _peft_dora(tensors, metadata):
    for key in [k for k in tensors if k.endswith(".lora_B.weight")]:
        stem = key.removesuffix(".lora_B.weight")
        tensors[f"{stem}.lora_magnitude_vector"] = np.ones(tensors[key].shape[0], np.float32)


def make_files(tmp: Path) -> dict[str, Path]:
    """Every pipeline file of the tests by name: the fixtures, and variants written into
    ``tmp``."""
    out = {
        "kohya": SD_KOHYA,
        "kohya-noalpha": FIX / "kohya/sd-lora-noalpha.safetensors",
        "locon": FIX / "kohya/sd-locon.safetensors",
        "loha": FIX / "kohya/sd-loha.safetensors",
        "kohya-dora": FIX / "kohya/sd-dora.safetensors",
        "diffusers": SD_DIFFUSERS,
        "diffusers-old": FIX / "diffusers-old/sd-attn-procs.safetensors",
        "peft-unet": FIX / "peft/sd-unet-conv/adapter_model.safetensors",
        "peft-llama": FIX / "peft/llama-lora/adapter_model.safetensors",
    }
    out["kohya-partial-alpha"] = rewrite(SD_KOHYA, tmp / "partial.safetensors", _drop_alpha)
    out["kohya-extra-key"] = rewrite(SD_KOHYA, tmp / "extra.safetensors", _extra_key)
    out["lokr"] = rewrite(SD_KOHYA, tmp / "lokr.safetensors", _lokr)
    out["diffusers-mixed-ranks"] = rewrite(
        SD_DIFFUSERS, tmp / "mixed-ranks.safetensors", mixed_ranks_without_metadata
    )
    out["kohya-diff-b"] = rewrite(SD_KOHYA, tmp / "diff-b.safetensors", _diff_b)
    out["diffusers-dora"] = rewrite(
        SD_DIFFUSERS,
        tmp / "dora.safetensors",
        lambda t, m: (_peft_dora(t, m), diffusers_metadata(_use_dora)(t, m)),
    )
    out["diffusers-patterns"] = rewrite(
        SD_DIFFUSERS, tmp / "patterns.safetensors", diffusers_metadata(_alpha_pattern)
    )
    out["diffusers-text-model"] = rewrite(
        SD_DIFFUSERS, tmp / "text-model.safetensors", text_model_level
    )
    out["diffusers-rslora"] = rewrite(
        SD_DIFFUSERS, tmp / "rslora.safetensors", diffusers_metadata(_use_rslora)
    )
    return out


def _use_dora(config):
    for key in [k for k in config if k.endswith(".r")]:
        config[key.removesuffix(".r") + ".use_dora"] = True


def _alpha_pattern(config):
    config["text_encoder.alpha_pattern"] = {"q_proj": 2}
    config["unet.alpha_pattern"] = {"to_q": 16}


def text_model_level(tensors, metadata):
    # the text encoder named as transformers 4 saved it (text_encoder.text_model.encoder...)
    for key in [k for k in tensors if k.startswith("text_encoder.encoder.")]:
        tensors[key.replace("text_encoder.", "text_encoder.text_model.", 1)] = tensors.pop(key)


def _use_rslora(config):
    for key in [k for k in config if k.endswith(".r")]:
        config[key.removesuffix(".r") + ".use_rslora"] = True
