"""The SD3 / SD3.5 layout map (lora_tools.layouts.sd3), checked against diffusers.

The reference is diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` (native ->
diffusers): a native state dict built from a tiny diffusers model through the map's pieces
(fused ``qkv`` by rows, swapped adaLN halves; tests/formats/layout_oracle.py) converts back to
the model's own state dict tensor for tensor, and the converter uses every native key the map
wrote.
"""

from __future__ import annotations

import pytest

from lora_tools.layouts import diffusers_layout, native_layout, qwen_image, sd3, unet
from lora_tools.layouts.sd3 import SD3Layout

#: SD3 Medium-shaped: three joint blocks (the last one's context stream pre only).
SD3_MEDIUM = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 8,
    "pos_embed_max_size": 8,
}
#: SD3.5 Large-shaped: RMS q/k norms in every attention.
SD35_LARGE = {**SD3_MEDIUM, "qk_norm": "rms_norm"}
#: SD3.5 Medium-shaped: a second image attention in the first two blocks, with q/k norms.
SD35_MEDIUM = {**SD35_LARGE, "dual_attention_layers": [0, 1]}
CONFIGS = [SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM]
IDS = ["sd3-medium", "sd35-large", "sd35-medium"]


def _model(config: dict):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(**config).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {**model.config, "_class_name": "SD3Transformer2DModel"}, state


def _shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.oracle
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_the_map_agrees_with_diffusers_sd3_converter(config):
    pytest.importorskip("torch")
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from tests.formats.layout_oracle import assert_same_tensors, native_state_dict

    model_config, state = _model(config)
    layout = sd3.from_diffusers(model_config, _shapes(state))
    assert layout == SD3Layout(
        3, 16, tuple(config.get("dual_attention_layers", ())), "qk_norm" in config
    )
    assert layout.parameters == (("pos_embed", "pos_embed.pos_embed"),)
    native = native_state_dict(layout, state, {d: n for n, d in layout.parameters})
    assert sd3.from_native(_shapes(native)) == layout
    assert isinstance(native_layout(_shapes(native)), SD3Layout)
    assert diffusers_layout(model_config, _shapes(state)) == layout

    checkpoint = {f"model.diffusion_model.{k}": v for k, v in native.items()}
    back = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}, f"native keys the converter does not know: {sorted(checkpoint)}"
    assert_same_tensors(back, state)


@pytest.mark.oracle
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_the_layout_from_a_config_alone_is_the_one_from_its_shapes(config):
    model_config, state = _model(config)
    assert sd3.from_diffusers(model_config, {}) == sd3.from_diffusers(model_config, _shapes(state))


def test_the_fused_and_swapped_pieces():
    layout = SD3Layout(num_layers=2, dim=4, dual_attention_layers=(0,), qk_norm=True)
    qkv = layout.to_diffusers("joint_blocks.0.context_block.attn.qkv")
    assert [(p.diffusers, p.native_rows) for p in qkv] == [
        ("transformer_blocks.0.attn.add_q_proj", (0, 4)),
        ("transformer_blocks.0.attn.add_k_proj", (4, 8)),
        ("transformer_blocks.0.attn.add_v_proj", (8, 12)),
    ]
    assert [p.native_rows for p in layout.to_native("transformer_blocks.0.attn2.to_v")] == [(8, 12)]
    # the last block's context modulation is (shift, scale) natively, (scale, shift) in diffusers
    last = layout.to_native("transformer_blocks.1.norm1_context.linear")
    assert [(p.native_rows, p.diffusers_rows) for p in last] == [((4, 8), (0, 4)), ((0, 4), (4, 8))]
    # other blocks' modulations are whole weights
    assert layout.to_native("transformer_blocks.0.norm1_context.linear")[0].whole
    assert layout.to_diffusers("joint_blocks.1.x_block.attn.ln_k")[0].diffusers == (
        "transformer_blocks.1.attn.norm_k"
    )


@pytest.mark.parametrize(
    ("layout", "path"),
    [
        (SD3Layout(2, 4), "transformer_blocks.1.ff_context.net.2"),  # pre only: no context MLP
        (SD3Layout(2, 4), "transformer_blocks.1.attn.to_add_out"),
        (SD3Layout(2, 4), "transformer_blocks.0.attn2.to_q"),  # no dual attention
        (SD3Layout(2, 4), "transformer_blocks.0.attn.norm_q"),  # no qk norm
        (SD3Layout(2, 4), "transformer_blocks.2.attn.to_q"),  # no such block
        (SD3Layout(2, 4), "single_transformer_blocks.0.attn.to_q"),  # Flux
        (SD3Layout(2, 4), "down_blocks.0.attentions.0.proj_in"),  # SD UNet
    ],
)
def test_modules_the_model_does_not_have_map_to_nothing(layout, path):
    assert layout.to_native(path) == ()


def test_native_names_of_other_models_give_no_layout():
    flux = {
        "double_blocks.0.img_attn.qkv.weight": (48, 16),
        "txt_in.weight": (16, 8),
        "final_layer.linear.weight": (16, 16),
    }
    sd1 = {"input_blocks.0.0.weight": (4, 4, 3, 3), "out.2.weight": (4, 4, 3, 3)}
    qwen = {
        k: (16, 16)
        for k in ("txt_norm.weight", "img_in.weight", "transformer_blocks.0.img_mod.1.weight")
    }
    for shapes in (flux, sd1, qwen):
        assert sd3.from_native(shapes) is None
    gap = {
        "context_embedder.weight": (16, 16),
        "joint_blocks.0.x_block.attn.qkv.weight": (48, 16),
        "joint_blocks.2.x_block.attn.qkv.weight": (48, 16),
    }
    assert sd3.from_native(gap) is None  # block 1 missing
    assert sd3.from_native(
        {**gap, "joint_blocks.1.x_block.attn.qkv.weight": (48, 16)}
    ) == SD3Layout(3, 16)
    assert unet.from_native(gap) is None and qwen_image.from_native(gap) is None


@pytest.mark.parametrize(
    "config",
    [{"_class_name": "FluxTransformer2DModel"}, {"_class_name": "UNet2DConditionModel"}, {}],
)
def test_other_diffusers_classes_give_no_layout(config):
    assert sd3.from_diffusers({**config, "num_layers": 2}, {}) is None
