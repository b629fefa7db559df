"""The HunyuanVideo layout map (lora_tools.layouts.hunyuan_video), checked against diffusers.

The oracle is diffusers' ``convert_hunyuan_video_transformer_to_diffusers`` (native ->
diffusers): a native single file built from a tiny ``HunyuanVideoTransformer3DModel`` through
the map alone converts back to the model's state dict tensor for tensor. The converter splits
a single block's ``linear1`` at a hard-coded 3072 rows (the released model's hidden size), so
that weight is checked at full height on its own (a few columns wide).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_hunyuan_video_transformer_to_diffusers,
)

from lora_tools.layouts import hunyuan_video, native_layout  # noqa: E402
from lora_tools.layouts.hunyuan_video import HunyuanVideoLayout  # noqa: E402
from tests.formats.layout_oracle import assert_same_tensors, native_state_dict  # noqa: E402

pytestmark = pytest.mark.oracle

CLASS = "HunyuanVideoTransformer3DModel"
TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 2,
    "mlp_ratio": 3.0,
    "patch_size": 1,
    "patch_size_t": 1,
    "text_embed_dim": 12,
    "pooled_projection_dim": 8,
    "rope_axes_dim": (2, 2, 4),
}
#: HunyuanVideo T2V; its I2V (token-replace conditioning, more input channels); models without
#: the guidance embedding, without query / key norms.
VARIANTS = {
    "t2v": {},
    "i2v": {"image_condition_type": "token_replace", "in_channels": 9},
    "no-guidance": {"guidance_embeds": False},
    "no-qk-norm": {"qk_norm": None},
}
#: Bit patterns of a BFL Flux file (the other model with double_blocks / single_blocks).
FLUX = {
    "img_in.weight": (16, 4),
    "txt_in.weight": (16, 12),
    "time_in.in_layer.weight": (16, 256),
    "vector_in.in_layer.weight": (16, 8),
    "double_blocks.0.img_mod.lin.weight": (96, 16),
    "double_blocks.0.img_attn.qkv.weight": (48, 16),
    "double_blocks.0.img_attn.proj.weight": (16, 16),
    "double_blocks.0.img_mlp.0.weight": (64, 16),
    "double_blocks.0.txt_attn.qkv.weight": (48, 16),
    "single_blocks.0.linear1.weight": (112, 16),
    "single_blocks.0.linear2.weight": (16, 80),
    "single_blocks.0.modulation.lin.weight": (48, 16),
    "final_layer.linear.weight": (4, 16),
    "final_layer.adaLN_modulation.1.weight": (32, 16),
}


def _model(overrides):
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(**{**TINY, **overrides})
    return model.state_dict(), {"_class_name": CLASS, **dict(model.config)}


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def _linear1(key):
    return key.startswith("single_blocks.") and ".linear1." in key


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_native_file_built_by_the_map_converts_back_bit_exact(variant):
    state, config = _model(VARIANTS[variant])
    layout = hunyuan_video.from_diffusers(config, _shapes(state))
    flags = {"guidance": variant != "no-guidance", "qk_norm": variant != "no-qk-norm"}
    assert layout == HunyuanVideoLayout(16, 48, 2, 2, 2, **flags)
    native = native_state_dict(layout, state)
    assert native["double_blocks.1.img_attn_qkv.weight"].shape == (48, 16)
    assert native["single_blocks.1.linear1.weight"].shape == (3 * 16 + 48, 16)
    assert native["final_layer.adaLN_modulation.1.bias"].shape == (32,)

    # diffusers' converter, on all but the linear1 weights it cannot split at this size
    kept = {k: v for k, v in native.items() if not _linear1(k)}
    converted = convert_hunyuan_video_transformer_to_diffusers(dict(kept))
    split = {
        p.diffusers
        for key in native
        if _linear1(key)
        for p in layout.to_diffusers(key.rpartition(".")[0])
    }
    assert len(split) == 2 * 4
    assert_same_tensors(
        converted, {k: v for k, v in state.items() if k.rpartition(".")[0] not in split}
    )

    # every native weight the map names is in the file, and maps to diffusers weights
    assert {p.native_key for p in layout.pieces} <= set(native)
    for key in native:
        assert layout.to_diffusers(key.rpartition(".")[0]), key

    assert hunyuan_video.from_native(_shapes(native)) == layout
    found = native_layout(_shapes(native))
    assert isinstance(found, HunyuanVideoLayout) and found.architecture == "hunyuan-video"


def test_single_block_linear1_at_the_released_size_splits_as_diffusers_splits_it():
    config = {
        "_class_name": CLASS,
        "num_layers": 0,
        "num_single_layers": 1,
        "num_refiner_layers": 0,
    }
    layout = hunyuan_video.from_diffusers(config, {})
    assert (layout.hidden, layout.mlp) == (3072, 4 * 3072)
    torch.manual_seed(0)
    native = {
        "single_blocks.0.linear1.weight": torch.randn(4 * 3072 + 3 * 3072, 2),
        "single_blocks.0.linear1.bias": torch.randn(4 * 3072 + 3 * 3072),
    }
    converted = convert_hunyuan_video_transformer_to_diffusers(dict(native))
    pieces = layout.to_diffusers("single_blocks.0.linear1")
    assert len(pieces) == 4 and sorted(f"{p.diffusers}.weight" for p in pieces) == sorted(
        k for k in converted if k.endswith(".weight")
    )
    for piece in pieces:
        (start, stop), (d_start, d_stop) = piece.native_rows, piece.diffusers_rows
        for kind, key in (("weight", piece.native_key), ("bias", piece.native_bias_key)):
            want = converted[f"{piece.diffusers}.{kind}"]
            assert (d_start, d_stop) == (0, want.shape[0])
            assert torch.equal(native[key][start:stop], want), (piece, kind)


def test_final_modulation_halves_are_swapped():
    layout = HunyuanVideoLayout(hidden=4, mlp=8, layers=1, single_layers=0, refiner_layers=0)
    pieces = layout.to_native("norm_out.linear")
    assert [(p.native_rows, p.diffusers_rows) for p in pieces] == [
        ((0, 4), (4, 8)),
        ((4, 8), (0, 4)),
    ]
    assert layout.to_diffusers("final_layer.adaLN_modulation.1") == pieces


def test_other_models_are_not_hunyuan_video():
    state, config = _model({})
    assert hunyuan_video.from_native(_shapes(state)) is None  # diffusers names
    assert hunyuan_video.from_native(FLUX) is None
    assert not isinstance(native_layout(FLUX), HunyuanVideoLayout)
    assert (
        hunyuan_video.from_diffusers({**config, "_class_name": "FluxTransformer2DModel"}, {})
        is None
    )
    assert (
        hunyuan_video.from_diffusers(
            {**config, "_class_name": "HunyuanVideo15Transformer3DModel"}, {}
        )
        is None
    )
    native = _shapes(native_state_dict(hunyuan_video.from_diffusers(config, {}), state))
    assert hunyuan_video.from_native(native) is not None
    # double and single blocks that disagree on the MLP width, or a missing block
    wider = {**native, "single_blocks.0.linear1.weight": (3 * 16 + 64, 16)}
    assert hunyuan_video.from_native(wider) is None
    gapped = {k: v for k, v in native.items() if not k.startswith("double_blocks.0.")}
    assert hunyuan_video.from_native(gapped) is None
