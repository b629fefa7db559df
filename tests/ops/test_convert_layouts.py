"""convert refuses what the target cannot load (issue 10 item 5), and writes configs and names
its consumers read as meant."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from lora_tools.errors import UnsupportedAdapterError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.ops.convert import convert_adapter


@pytest.mark.parametrize("to", ["diffusers", "peft"])
@pytest.mark.parametrize("with_base", [False, True])
def test_flux_bfl_names_are_refused(fixtures_dir, to, with_base):
    base = fixtures_dir / "bases/tiny-flux.safetensors" if with_base else None
    src = load_adapter(fixtures_dir / "kohya/flux-lora.safetensors")
    with pytest.raises(UnsupportedAdapterError, match="BFL") as info:
        convert_adapter(src, to, base=base, component="unet" if to == "peft" else None)
    assert info.value.kind == "unsupported-layout"


def test_sdxl_sgm_names_are_refused(fixtures_dir):
    src = load_adapter(fixtures_dir / "kohya/sdxl-lora.safetensors")
    with pytest.raises(UnsupportedAdapterError, match="SGM"):
        convert_adapter(src, "diffusers", base=fixtures_dir / "bases/tiny-sdxl.safetensors")


def test_the_cli_refuses_in_one_line_and_writes_nothing(fixtures_dir, tmp_path):
    out = tmp_path / "flux"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_tools",
            "convert",
            fixtures_dir / "kohya/flux-lora.safetensors",
            "--to",
            "diffusers",
            "-o",
            out,
            "--base",
            fixtures_dir / "bases/tiny-flux.safetensors",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "BFL" in lines[0] and "double_blocks" in lines[0]
    assert not out.exists()


def test_flux_stays_convertible_within_kohya_layout(fixtures_dir, tmp_path):
    """kohya is the Flux file's own layout: PEFT-style names in BFL layout go back to kohya."""
    src = load_adapter(fixtures_dir / "kohya/flux-lora.safetensors")
    result = convert_adapter(src, "kohya")
    assert set(result.adapter.modules) == set(src.modules)


def test_text_encoder_modules_get_sd_scripts_names(fixtures_dir):
    """diffusers (transformers 5) says text_encoder.encoder.layers...; sd-scripts names it
    lora_te_text_model_encoder_layers_..."""
    result = convert_adapter(load_adapter(fixtures_dir / "diffusers/sd-lora"), "kohya")
    te = [k for k in result.adapter.modules if k.startswith("lora_te_")]
    assert len(te) == 8
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in te)


def test_a_partial_adapter_targets_only_its_modules(fixtures_dir, tmp_path):
    """kohya -> diffusers of a file covering some blocks: the metadata names those modules, not
    every layer of the same name (diffusers would create empty layers and warn)."""
    src = load_adapter(fixtures_dir / "kohya/sd-lora.safetensors")
    part = {k: m for k, m in src.modules.items() if "down_blocks" in k or "layers_0" in k}
    save_adapter(dataclasses.replace(src, modules=part), tmp_path / "part.safetensors")
    result = convert_adapter(
        load_adapter(tmp_path / "part.safetensors"),
        "diffusers",
        base=fixtures_dir / "bases/tiny-sd",
    )
    import json

    meta = json.loads(result.adapter.metadata["lora_adapter_metadata"])
    paths = {m.path.removeprefix("text_model.") for m in result.adapter.modules.values()}
    targets = set(meta["unet.target_modules"]) | set(meta["text_encoder.target_modules"])
    assert targets == paths


@pytest.mark.oracle
def test_a_partial_adapter_loads_in_diffusers_without_extra_layers(fixtures_dir, tmp_path):
    pytest.importorskip("diffusers")
    from tests import consumers

    src = load_adapter(fixtures_dir / "kohya/sd-lora.safetensors")
    part = {k: m for k, m in src.modules.items() if "down_blocks" in k or "layers_0" in k}
    save_adapter(dataclasses.replace(src, modules=part), tmp_path / "part.safetensors")
    result = convert_adapter(
        load_adapter(tmp_path / "part.safetensors"),
        "diffusers",
        base=fixtures_dir / "bases/tiny-sd",
    )
    out = save_adapter(result.adapter, tmp_path / "d", refresh_hashes=True)
    got = consumers.diffusers_consume(fixtures_dir / "bases/tiny-sd", out)
    assert got.problems(len(part)) == []


def test_qwen_image_module_names_are_no_bfl_names(tmp_path):
    """Qwen-Image's diffusers model has img_in / txt_in: a diffusers-named Qwen LoRA converts to
    PEFT without a base (those names are only BFL's next to double_blocks / single_blocks)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for path in ("img_in", "txt_in", "transformer_blocks.0.attn.to_q"):
        tensors[f"transformer.{path}.lora_A.weight"] = rng.standard_normal((2, 4), np.float32)
        tensors[f"transformer.{path}.lora_B.weight"] = rng.standard_normal((4, 2), np.float32)
    save_file(tensors, tmp_path / "pytorch_lora_weights.safetensors")
    res = convert_adapter(load_adapter(tmp_path / "pytorch_lora_weights.safetensors"), "peft")
    assert sorted(m.path for m in res.adapter.modules.values()) == [
        "img_in",
        "transformer_blocks.0.attn.to_q",
        "txt_in",
    ]


def test_a_partial_base_says_it_holds_no_whole_model(fixtures_dir):
    src = load_adapter(fixtures_dir / "kohya/flux-lora.safetensors")
    with pytest.raises(UnsupportedAdapterError) as info:
        convert_adapter(src, "diffusers", base=fixtures_dir / "bases/tiny-flux.safetensors")
    assert "complete checkpoint" in info.value.hint


def test_diffusers_names_of_a_native_named_architecture_need_the_base_for_kohya(
    fixtures_dir, tmp_path
):
    """kohya-style Flux / SD3 / Wan / HunyuanVideo LoRAs and ComfyUI use the native names:
    ``lora_unet_transformer_blocks_0_attn_to_q`` loads nowhere, so without --base (which gives
    the layout) convert refuses; SD's kohya names are diffusers names and need no base."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for path in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"):
        tensors[f"transformer.{path}.lora_A.weight"] = rng.standard_normal((2, 8), np.float32)
        tensors[f"transformer.{path}.lora_B.weight"] = rng.standard_normal((8, 2), np.float32)
    save_file(tensors, tmp_path / "flux.safetensors")
    with pytest.raises(UnsupportedAdapterError, match="diffusers layout of a flux model") as info:
        convert_adapter(load_adapter(tmp_path / "flux.safetensors"), "kohya")
    assert info.value.kind == "unsupported-layout" and "--base" in (info.value.hint or "")
    sd = convert_adapter(load_adapter(fixtures_dir / "diffusers/sd-lora"), "kohya")
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in sd.adapter.modules)


def test_a_pipeline_lora_is_no_mlx_adapter(fixtures_dir):
    """mlx-lm adapters hold one language model: a diffusers pipeline LoRA is refused in one
    line, not written as a file mlx-lm cannot use."""
    src = load_adapter(fixtures_dir / "diffusers/sd-lora")
    with pytest.raises(UnsupportedAdapterError, match="mlx-lm adapters hold one language model"):
        convert_adapter(src, "mlx")
