"""The SD UNet layout map (lora_tools.layouts.unet), checked against diffusers, and what it buys:
an SD1.x LoRA named in diffusers layout (diffusers' own writer, and kohya names converted from
it) merges into an original-layout single file, and validate --base resolves every module.

The reference for the map is diffusers' ``convert_ldm_unet_checkpoint`` (original ->
diffusers): the single file built with the map converts back to the diffusers state dict
tensor for tensor. The merged weights are checked against a float64 merge of the same factors
on the diffusers model, mapped to the original names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from lora_tools.cli import cli
from lora_tools.formats import load_adapter
from lora_tools.io.checkpoint import open_checkpoint
from lora_tools.layouts import UNetLayout
from lora_tools.resolve import resolve

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer."
#: SD1-shaped: three levels (attention on the first two), two layers each, channel changes
#: (so resnets have conv_shortcut), cross-attention.
SD1 = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [4, 8, 8],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "norm_num_groups": 2,
}
#: SD2-shaped: linear proj_in / proj_out, one layer per level, heads per level.
SD2 = {
    **SD1,
    "layers_per_block": 1,
    "use_linear_projection": True,
    "attention_head_dim": [2, 4, 4],
}
#: SDXL-shaped: no attention on the first level, deeper transformers below, and the
#: text_time embedding that single files call label_emb.
SDXL = {
    **SD1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1, 2],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 32,
}


def loratool(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _original(state: dict, layout: UNetLayout) -> dict:
    """A diffusers UNet state dict under original names, through the map."""
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        original = layout.original_path(module)
        assert original is not None, f"no original name for {module}"
        assert layout.diffusers_path(original) == module
        out[f"{UNET}{original}.{param}"] = value
    return out


def test_the_map_of_the_tiny_sd_fixture_agrees_with_its_keys(fixtures_dir):
    config = json.loads((fixtures_dir / "bases/tiny-sd/unet/config.json").read_text())
    layout = UNetLayout.from_config(config)
    state = load_file(fixtures_dir / "bases/tiny-sd/unet/diffusion_pytorch_model.safetensors")
    original = _original(state, layout)
    assert UNetLayout.from_keys(k.removeprefix(UNET) for k in original) == layout
    # one layer per level: input_blocks 1 (resnet + attention) ... as diffusers numbers them
    assert layout.original_path("down_blocks.1.attentions.0.proj_in") == "input_blocks.3.1.proj_in"
    assert layout.original_path("down_blocks.0.downsamplers.0.conv") == "input_blocks.2.0.op"
    assert layout.original_path("up_blocks.0.attentions.1.proj_out") == "output_blocks.1.1.proj_out"
    assert layout.original_path("up_blocks.0.upsamplers.0.conv") == "output_blocks.1.2.conv"
    assert (
        layout.original_path("mid_block.resnets.1.time_emb_proj") == "middle_block.2.emb_layers.1"
    )
    assert layout.original_path("down_blocks.0.resnets.0.conv3") is None
    assert layout.diffusers_path("input_blocks.0.0") == "conv_in"


@pytest.mark.parametrize(
    "keys",
    [
        ["input_blocks.0.0.weight", "input_blocks.1.0.in_layers.2.weight"],  # no output blocks
        ["input_blocks.1.0.in_layers.2.weight"],  # no conv_in
        [  # output blocks that do not mirror the input blocks
            "input_blocks.0.0.weight",
            "input_blocks.1.0.in_layers.2.weight",
            "output_blocks.0.0.in_layers.2.weight",
        ],
    ],
)
def test_keys_that_are_no_whole_unet_give_no_layout(keys):
    assert UNetLayout.from_keys(keys) is None


def test_the_partial_sdxl_fixture_keeps_its_sgm_names(fixtures_dir):
    """tiny-sdxl.safetensors holds a few UNet tensors only: no layout is guessed from them, and
    the kohya SDXL LoRA (SGM names) resolves as before."""
    adapter = load_adapter(fixtures_dir / "kohya/sdxl-lora.safetensors")
    with open_checkpoint(fixtures_dir / "bases/tiny-sdxl.safetensors") as ckpt:
        res = resolve(adapter, ckpt)
    assert res.unmatched == [] and len(res.matches) == len(adapter.modules)


def _single_file(fixtures_dir: Path, path: Path) -> None:
    """tiny-sd as an original-layout single file (UNet and text encoder)."""
    base = fixtures_dir / "bases/tiny-sd"
    layout = UNetLayout.from_config(json.loads((base / "unet/config.json").read_text()))
    tensors = _original(load_file(base / "unet/diffusion_pytorch_model.safetensors"), layout)
    te = load_file(base / "text_encoder/model.safetensors")
    tensors.update({f"{TE}{k}": v for k, v in te.items()})
    save_file(tensors, path)


def _resolved_in_single_file(fixtures_dir: Path, tmp_path: Path, adapter: str, how):
    """``how`` (resolve) of a fixture adapter against tiny-sd as a single
    file, with nothing unmatched, ambiguous or misshapen."""
    single = tmp_path / "tiny-sd.safetensors"
    _single_file(fixtures_dir, single)
    with open_checkpoint(single) as ckpt:
        res = how(load_adapter(fixtures_dir / adapter), ckpt)
    assert res.total and res.unmatched == [] and not res.ambiguous and not res.shape_errors
    return res


@pytest.mark.parametrize(
    "adapter", ["kohya/sd-lora.safetensors", "kohya/sd-locon.safetensors", "diffusers/sd-lora"]
)
def test_sd1_fixture_loras_resolve_in_an_original_single_file(fixtures_dir, tmp_path, adapter):
    res = _resolved_in_single_file(fixtures_dir, tmp_path, adapter, resolve)
    unet = [m for m in res.matches.values() if m.target.key.startswith(UNET)]
    assert unet, "the fixture has UNet modules"
    for match in unet:
        # the module keeps its diffusers path; the target is the original-layout key
        assert match.path.startswith(("down_blocks", "mid_block", "up_blocks"))
        assert "_blocks." in match.target.key or "middle_block." in match.target.key


@pytest.mark.oracle
@pytest.mark.parametrize("unet_config", [SD1, SD2, SDXL], ids=["sd1", "sd2", "sdxl"])
def test_diffusers_layout_lora_merges_into_an_original_single_file(tmp_path, unet_config):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**unet_config).eval()
    layout = UNetLayout.from_config(unet.config)
    base = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    original = _original(base, layout)
    found = UNetLayout.from_keys(k.removeprefix(UNET) for k in original)
    assert (found.levels, found.mid) == (layout.levels, layout.mid)
    # a single file does not say whether label_emb is diffusers' add_ or class_embedding
    assert found.label_emb == (("add_embedding", "class_embedding") if layout.label_emb else ())

    # the map against diffusers' own original -> diffusers converter, tensor for tensor
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert sorted(back) == sorted(base)
    for key, value in base.items():
        assert torch.equal(back[key], value), key

    single = tmp_path / "sd1.safetensors"
    save_file({k: v.numpy() for k, v in original.items()}, single)

    # a LoRA on every Linear and Conv2d of the UNet, written by diffusers' own writer
    targets = [
        name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    ]
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights=False)
    unet.add_adapter(config)
    lora_state = peft.get_peft_model_state_dict(unet)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path / "diffusers-lora",
        unet_lora_layers=lora_state,
        unet_lora_adapter_metadata=config.to_dict(),
    )
    diffusers_lora = tmp_path / "diffusers-lora" / "pytorch_lora_weights.safetensors"
    kohya_lora = tmp_path / "kohya-lora.safetensors"
    done = loratool("convert", diffusers_lora, "--to", "kohya", "-o", kohya_lora)
    assert done.exit_code == 0, done.output
    kohya_keys = load_file(kohya_lora)
    assert "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight" in kohya_keys

    # the float64 reference: W + alpha / r * B @ A on the diffusers weights, mapped
    expected = {k: v.double() for k, v in original.items()}
    for path in targets:
        a = lora_state[f"{path}.lora_A.weight"].double()
        b = lora_state[f"{path}.lora_B.weight"].double()
        delta = (b.flatten(1) @ a.flatten(1)).reshape(base[f"{path}.weight"].shape) * 1.5
        expected[f"{UNET}{layout.original_path(path)}.weight"] += delta
    assert len(targets) > 50

    for name, lora in (("diffusers", diffusers_lora), ("kohya", kohya_lora)):
        checked = loratool("validate", lora, "--base", single, "--select", "LT4", "--json")
        assert checked.exit_code == 0, checked.output
        assert "LT401" not in checked.output and "LT404" not in checked.output

        merged_path = tmp_path / f"merged-{name}.safetensors"
        done = loratool("merge", single, lora, "-o", merged_path)
        assert done.exit_code == 0, done.output
        merged = load_file(merged_path)
        assert sorted(merged) == sorted(original)
        for key, value in merged.items():
            want = expected[key]
            if key.endswith(".weight") and layout.diffusers_path(key[len(UNET) : -7]) in targets:
                assert not np.array_equal(value, original[key].numpy()), f"{name}: {key} unchanged"
            else:
                assert np.array_equal(value, original[key].numpy()), f"{name}: {key} changed"
            np.testing.assert_allclose(value, want.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("adapter", ["kohya/sd-loha.safetensors", "kohya/sd-dora.safetensors"])
def test_sd1_lycoris_modules_resolve_in_an_original_single_file(fixtures_dir, tmp_path, adapter):
    # LoHa and kohya DoRA modules are computed types: resolve places them as LoRA modules
    res = _resolved_in_single_file(fixtures_dir, tmp_path, adapter, resolve)
    assert res.deltas and not res.matches
    assert any(m.target.key.startswith(UNET + "input_blocks.") for m in res.deltas.values())
