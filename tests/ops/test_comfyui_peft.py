"""``validate --profile comfyui`` on PEFT files (``base_model.model.<path>``): ComfyUI maps those
keys for SD3 / SD3.5, PixArt and HunyuanDiT models only (comfy/lora.py
``model_lora_keys_unet``), so such a file loads whole there and a language model's does not.

ComfyUI does not run here: :mod:`tests.ops.comfy_peft_keys` lists the stems its key map holds
for a model, and every file below that should load is checked against it first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_tools.ops.validate import validate
from tests.ops import comfy_peft_keys as comfy

FIX = Path(__file__).resolve().parents[2] / "fixtures"
DIM = 8
RANK = 2

SD3_PATHS = [
    f"transformer_blocks.{i}.{name}"
    for i in range(2)
    for name in (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
    )
] + ["proj_out", "context_embedder"]
PIXART_PATHS = [
    f"transformer_blocks.{i}.{name}"
    for i in range(2)
    for name in ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "ff.net.2")
] + ["caption_projection.linear_1", "adaln_single.linear"]
HUNYUANDIT_PATHS = [
    f"blocks.{i}.{name}"
    for i in range(3)
    for name in ("attn1.Wqkv", "attn1.out_proj", "attn2.q_proj", "attn2.kv_proj", "attn2.out_proj")
] + ["blocks.2.skip_linear", "mlp_t5.0"]
#: diffusers' Flux names: its double blocks look like SD3's, its single blocks are no SD3 path
FLUX_PATHS = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_q"]


def peft_folder(root: Path, paths: list[str], alpha: float = RANK) -> Path:
    """A PEFT folder with one LoRA module per path (``lora_alpha`` / r = ``alpha`` / 2)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    tensors = {}
    for path in paths:
        tensors[f"base_model.model.{path}.lora_A.weight"] = rng.normal(size=(RANK, DIM))
        tensors[f"base_model.model.{path}.lora_B.weight"] = rng.normal(size=(DIM, RANK))
    save_file(
        {k: v.astype(np.float32) for k, v in tensors.items()}, root / "adapter_model.safetensors"
    )
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": alpha,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in paths}),
    }
    (root / "adapter_config.json").write_text(json.dumps(config))
    return root


def stems(folder: Path) -> set[str]:
    names = load_file(folder / "adapter_model.safetensors")
    return {k.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight") for k in names}


def comfy_findings(path: Path, base: Path | None = None) -> list:
    report = validate([path], profiles="comfyui", base=base)
    return [f for f in report.findings if f.rule.code.startswith("LT55")]


def codes(path: Path, base: Path | None = None) -> list[str]:
    return sorted({f.rule.code for f in comfy_findings(path, base)})


@pytest.mark.parametrize(
    ("paths", "mapped"),
    [
        (SD3_PATHS, comfy.sd3_stems(2)),
        (PIXART_PATHS, comfy.pixart_stems(2)),
        (HUNYUANDIT_PATHS, comfy.hunyuandit_stems(3)),
    ],
    ids=["sd3", "pixart", "hunyuandit"],
)
def test_mapped_peft_files_load_whole(tmp_path, paths, mapped):
    folder = peft_folder(tmp_path / "adapter", paths)
    assert stems(folder) <= mapped  # every key is one model_lora_keys_unet builds
    report = validate([folder], profiles="comfyui")
    assert report.findings == []


def test_reference_maps_what_the_checks_accept():
    # the reference's stems, each a path the profile's patterns hold for that model
    from lora_tools.consumers.comfyui import peft_family

    for family, stems_of in (
        ("SD3 / SD3.5", comfy.sd3_stems(3)),
        ("PixArt", comfy.pixart_stems(3)),
        ("HunyuanDiT", comfy.hunyuandit_stems(4)),
    ):
        paths = [s.removeprefix(comfy.PREFIX) for s in stems_of]
        assert {p: peft_family([p]) for p in paths if peft_family([p]) is None} == {}, family
        assert peft_family(paths) == family


def test_language_model_peft_adapter_is_lt551():
    (finding,) = comfy_findings(FIX / "peft/llama-lora")
    assert finding.rule.code == "LT551"
    assert "no --base" in finding.message and "none of those models'" in finding.message
    assert "model.layers.0.self_attn.q_proj" in finding.message


def test_sd_unet_peft_adapter_is_lt551():
    # model_lora_keys_unet builds no base_model.model. key for an SD UNet
    assert codes(FIX / "peft/sd-unet-conv") == ["LT551"]


def test_a_family_comfyui_does_not_map_is_lt551(tmp_path):
    (finding,) = comfy_findings(peft_folder(tmp_path / "flux", FLUX_PATHS))
    assert finding.rule.code == "LT551"
    assert "1 of 2 module(s) are not SD3 / SD3.5's" in finding.message
    assert finding.module == "single_transformer_blocks.0.attn.to_q"


def test_lora_alpha_is_not_read(tmp_path):
    # no .alpha tensor: ComfyUI runs every module at scale 1, not lora_alpha / r = 2
    folder = peft_folder(tmp_path / "sd3", SD3_PATHS, alpha=2 * RANK)
    (finding,) = comfy_findings(folder)
    assert finding.rule.code == "LT553"
    assert (finding.expected, finding.found) == ("2", "1")


def native_base(path: Path, keys: list[str]) -> Path:
    save_file({k: np.zeros((DIM, DIM), np.float32) for k in keys}, path)
    return path


def test_the_base_decides_the_model(tmp_path):
    sd3 = peft_folder(tmp_path / "sd3", SD3_PATHS)
    flux = native_base(
        tmp_path / "flux.safetensors", ["double_blocks.0.img_attn.qkv.weight", "img_in.weight"]
    )
    (finding,) = comfy_findings(sd3, base=flux)
    assert finding.rule.code == "LT551" and "--base model (Flux)" in finding.message


def test_modules_a_hunyuandit_base_does_not_map(tmp_path):
    weights = ["diffusion_model." + k for k in comfy.hunyuandit_weights(3)]
    base = native_base(tmp_path / "hydit.safetensors", weights)
    # diffusers' HunyuanDiT2DModel names (attn1.to_q) are not ComfyUI's native ones
    folder = peft_folder(tmp_path / "mixed", [*HUNYUANDIT_PATHS, "blocks.0.attn1.to_q"])
    found = {f.rule.code: f for f in comfy_findings(folder, base=base)}
    assert set(found) == {"LT554"}
    assert "1 of 18 PEFT-named" in found["LT554"].message
    assert found["LT554"].module == "base_model.model.blocks.0.attn1.to_q"
