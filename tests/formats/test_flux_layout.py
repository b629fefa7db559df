"""The Flux / Chroma layout map (lora_tools.layouts.flux), checked against diffusers.

Tiny ``FluxTransformer2DModel`` / ``ChromaTransformer2DModel`` models (every parameter random,
the RMS norm scales included, so that no two tensors are equal by chance) are written in the
native (BFL) layout through the map's pieces; diffusers' own single-file converter
(``convert_flux_transformer_checkpoint_to_diffusers`` / ``convert_chroma_...``) must then give
back every diffusers tensor bit for bit, consume every native key, and the result must load
into the model strictly.

diffusers' converters assume the released models' width (``inner_dim = 3072``, used to split
``linear1``); the tests run the converter's own source with the tiny model's width put in that
one line, and check that the line is there.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
from diffusers import (  # noqa: E402
    ChromaTransformer2DModel,
    FluxTransformer2DModel,
    UNet2DConditionModel,
)

from lora_tools.layouts import Layout, diffusers_layout, native_layout  # noqa: E402
from lora_tools.layouts.flux import FluxLayout, from_diffusers, from_native  # noqa: E402
from lora_tools.layouts.unet import UNetLayout  # noqa: E402
from tests.formats.layout_oracle import native_state_dict  # noqa: E402

pytestmark = pytest.mark.oracle

HEADS, HEAD_DIM = 2, 4
HIDDEN = HEADS * HEAD_DIM
COMMON = {
    "patch_size": 1,
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": HEAD_DIM,
    "num_attention_heads": HEADS,
    "joint_attention_dim": 6,
    "axes_dims_rope": [2, 2],
}
#: dev / Kontext: guidance_in; schnell: none; Fill-like: more input than output channels.
FLUX_CONFIGS = {
    "dev": {**COMMON, "in_channels": 8, "pooled_projection_dim": 5, "guidance_embeds": True},
    "schnell": {**COMMON, "in_channels": 8, "pooled_projection_dim": 5, "guidance_embeds": False},
    "fill": {
        **COMMON,
        "in_channels": 20,
        "out_channels": 4,
        "pooled_projection_dim": 5,
        "guidance_embeds": True,
    },
}
CHROMA_CONFIG = {
    **COMMON,
    "in_channels": 8,
    "approximator_num_channels": 8,
    "approximator_hidden_dim": 6,
    "approximator_layers": 2,
}
CONVERTERS = {
    "flux": "convert_flux_transformer_checkpoint_to_diffusers",
    "chroma": "convert_chroma_transformer_checkpoint_to_diffusers",
}


def _model(cls, config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(**config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter))
    return model


def _saved_config(model, tmp_path: Path) -> dict:
    """The config.json diffusers writes for the model (``_class_name`` included)."""
    model.save_config(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def _shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _diffusers_converter(architecture: str, hidden: int):
    name = CONVERTERS[architecture]
    source = textwrap.dedent(inspect.getsource(getattr(single_file_utils, name)))
    assert source.count("inner_dim = 3072\n") == 1
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072\n", f"inner_dim = {hidden}\n"), namespace)
    return namespace[name]


CASES = [
    *((name, FluxTransformer2DModel, config) for name, config in FLUX_CONFIGS.items()),
    ("chroma", ChromaTransformer2DModel, CHROMA_CONFIG),
]


@pytest.mark.parametrize(("name", "cls", "config"), CASES, ids=[c[0] for c in CASES])
def test_the_native_file_built_through_the_map_converts_back_bit_for_bit(
    name, cls, config, tmp_path
):
    model = _model(cls, config)
    state = model.state_dict()
    layout = from_diffusers(_saved_config(model, tmp_path), _shapes(state))
    assert layout is not None
    native = native_state_dict(layout, state)
    assert from_native(_shapes(native)) == layout
    checkpoint = {f"model.diffusion_model.{k}": v.clone() for k, v in native.items()}
    converted = _diffusers_converter(layout.architecture, HIDDEN)(checkpoint)
    assert checkpoint == {}, f"native keys diffusers did not convert: {sorted(checkpoint)}"
    assert set(converted) == set(state)
    unequal = [k for k in state if not torch.equal(converted[k], state[k])]
    assert unequal == []
    cls(**config).load_state_dict(converted, strict=True)


@pytest.mark.parametrize(("name", "cls", "config"), CASES, ids=[c[0] for c in CASES])
def test_both_constructions_give_one_layout_and_the_registry_finds_it(name, cls, config, tmp_path):
    model = _model(cls, config)
    state = model.state_dict()
    diffusers_config = _saved_config(model, tmp_path)
    layout = from_diffusers(diffusers_config, _shapes(state))
    native_shapes = _shapes(native_state_dict(layout, state))
    expected = FluxLayout(
        "chroma" if name == "chroma" else "flux",
        hidden=HIDDEN,
        mlp=4 * HIDDEN,
        double=2,
        single=3,
        guidance=config.get("guidance_embeds", False),
        approximator=config.get("approximator_layers", 0),
    )
    assert layout == expected
    assert from_diffusers(diffusers_config, {}) == expected
    assert native_layout(native_shapes) == expected
    assert diffusers_layout(diffusers_config, _shapes(state)) == expected
    assert isinstance(layout, Layout)
    # the native keys are no diffusers model and the reverse
    assert from_native(_shapes(state)) is None
    for piece in layout.table:
        assert piece in layout.to_native(piece.diffusers)
        assert piece in layout.to_diffusers(piece.native)
        assert {p.diffusers for p in layout.to_native(piece.diffusers)} == {piece.diffusers}
        assert {p.native for p in layout.to_diffusers(piece.native)} == {piece.native}


def test_the_fused_projections_and_the_swapped_modulation():
    layout = FluxLayout("flux", hidden=8, mlp=32, double=1, single=1, guidance=True)
    qkv = layout.to_diffusers("double_blocks.0.txt_attn.qkv")
    assert [(p.diffusers, p.native_rows, p.diffusers_rows) for p in qkv] == [
        ("transformer_blocks.0.attn.add_q_proj", (0, 8), (0, 8)),
        ("transformer_blocks.0.attn.add_k_proj", (8, 16), (0, 8)),
        ("transformer_blocks.0.attn.add_v_proj", (16, 24), (0, 8)),
    ]
    (mlp,) = layout.to_native("single_transformer_blocks.0.proj_mlp")
    assert (mlp.native, mlp.native_rows) == ("single_blocks.0.linear1", (24, 56))
    final = layout.to_diffusers("final_layer.adaLN_modulation.1")
    assert [(p.native_rows, p.diffusers_rows) for p in final] == [
        ((0, 8), (8, 16)),
        ((8, 16), (0, 8)),
    ]
    (norm,) = layout.to_diffusers("double_blocks.0.img_attn.norm.query_norm")
    assert (norm.diffusers, norm.native_key) == (
        "transformer_blocks.0.attn.norm_q",
        "double_blocks.0.img_attn.norm.query_norm.scale",
    )
    assert layout.to_native("time_text_embed.guidance_embedder.linear_2")[0].whole
    schnell = FluxLayout("flux", hidden=8, mlp=32, double=1, single=1)
    assert schnell.to_diffusers("guidance_in.in_layer") == ()
    assert layout.to_diffusers("double_blocks.1.img_attn.qkv") == ()
    chroma = FluxLayout("chroma", hidden=8, mlp=32, double=1, single=1, approximator=1)
    assert chroma.to_diffusers("double_blocks.0.img_mod.lin") == ()
    assert chroma.to_native("norm_out.linear") == ()
    (approximator_norm,) = chroma.to_diffusers("distilled_guidance_layer.norms.0")
    assert approximator_norm.native_key == "distilled_guidance_layer.norms.0.scale"


@pytest.fixture(scope="module")
def flux_native() -> dict[str, tuple[int, ...]]:
    model = _model(FluxTransformer2DModel, FLUX_CONFIGS["dev"])
    state = model.state_dict()
    layout = FluxLayout("flux", HIDDEN, 4 * HIDDEN, 2, 3, guidance=True)
    return _shapes(native_state_dict(layout, state))


def _without(shapes: dict, *prefixes: str) -> dict:
    return {k: v for k, v in shapes.items() if not k.startswith(prefixes)}


def test_quantized_native_files_keep_their_layout(flux_native):
    """bitsandbytes NF4 packs each Linear weight into [numel / 2, 1] but keeps biases and norm
    scales; ComfyUI's scaled fp8 adds a ``scale_weight`` per weight and a marker. The
    dimensions come from the biases, and the extra keys are no part of the map."""
    expected = FluxLayout("flux", HIDDEN, 4 * HIDDEN, 2, 3, guidance=True)
    nf4 = {
        k: (v[0] * v[1] // 2, 1) if k.endswith(".weight") and len(v) == 2 else v
        for k, v in flux_native.items()
    }
    assert nf4 != flux_native
    assert from_native(nf4) == expected
    fp8 = dict(flux_native, scaled_fp8=(0,))
    fp8.update(
        {k.replace(".weight", ".scale_weight"): () for k in flux_native if k.endswith(".weight")}
    )
    assert from_native(fp8) == expected


def test_native_key_sets_of_other_models_give_no_flux_layout(flux_native):
    assert from_native(flux_native) is not None
    # a block missing one weight, a gap in the numbering, no single blocks
    assert from_native(_without(flux_native, "single_blocks.1.linear2.")) is None
    assert from_native(_without(flux_native, "double_blocks.0.")) is None
    assert from_native(_without(flux_native, "single_blocks.")) is None
    # Flux.2-style: fused blocks without per-block modulation and without Chroma's approximator
    assert from_native(_without(flux_native, "double_blocks.0.img_mod.")) is None
    modulations = [f"double_blocks.{i}.{m}_mod." for i in range(2) for m in ("img", "txt")]
    modulations += [f"single_blocks.{i}.modulation." for i in range(3)]
    flux2 = _without(flux_native, *modulations)
    assert from_native(flux2) is None
    # HunyuanVideo names its fused projections with underscores
    hunyuan = {k.replace("img_attn.qkv", "img_attn_qkv"): v for k, v in flux_native.items()}
    assert from_native(hunyuan) is None
    # a qkv that is not three hidden widths
    wrong = dict(flux_native)
    wrong["double_blocks.0.img_attn.qkv.bias"] = (2 * HIDDEN,)
    assert from_native(wrong) is None
    sd3 = {
        "x_embedder.proj.weight": (8, 4, 2, 2),
        "joint_blocks.0.x_block.attn.qkv.weight": (24, 8),
        "joint_blocks.0.context_block.attn.qkv.weight": (24, 8),
        "final_layer.linear.weight": (16, 8),
    }
    assert from_native(sd3) is None


def test_a_sd_unet_is_still_the_unet_s_and_no_flux(tmp_path):
    config = {
        "sample_size": 8,
        "block_out_channels": [4, 8],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 8,
        "attention_head_dim": 2,
        "norm_num_groups": 2,
    }
    unet = UNet2DConditionModel(**config)
    shapes = _shapes(unet.state_dict())
    saved = _saved_config(unet, tmp_path)
    assert from_diffusers(saved, shapes) is None
    unet_layout = UNetLayout.from_config(saved)
    original = {
        f"{unet_layout.original_path(k.rpartition('.')[0])}.{k.rpartition('.')[2]}": v
        for k, v in shapes.items()
    }
    assert from_native(original) is None
    assert from_native(shapes) is None
    assert native_layout(original) == unet_layout


def test_diffusers_tensors_that_disagree_with_the_config_give_no_layout(tmp_path):
    model = _model(FluxTransformer2DModel, FLUX_CONFIGS["schnell"])
    shapes = _shapes(model.state_dict())
    config = _saved_config(model, tmp_path)
    assert from_diffusers(config, shapes) is not None
    # the config says guidance, the tensors have none; one block more than the tensors
    assert from_diffusers({**config, "guidance_embeds": True}, shapes) is None
    assert from_diffusers({**config, "num_single_layers": 4}, shapes) is None
    assert from_diffusers({**config, "num_attention_heads": 3}, shapes) is None
    # the same tensors under Chroma's class name: Chroma has no per-block modulation, but
    # it does have an approximator these tensors lack
    assert from_diffusers({**config, "_class_name": "ChromaTransformer2DModel"}, shapes) is None
    assert from_diffusers({**config, "_class_name": "SD3Transformer2DModel"}, shapes) is None
