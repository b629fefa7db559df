"""The Wan 2.x layout map (lora_tools.layouts.wan), checked against diffusers.

The oracle is diffusers' ``convert_wan_transformer_to_diffusers`` (native -> diffusers): a
native single file built from a tiny ``WanTransformer3DModel`` through the map alone converts
back to the model's state dict tensor for tensor, and the layout read from those native names
and shapes is the one read from the model's config.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

from lora_tools.layouts import native_layout, wan  # noqa: E402
from lora_tools.layouts.wan import WanLayout  # noqa: E402
from tests.formats.layout_oracle import assert_same_tensors, native_state_dict  # noqa: E402

pytestmark = pytest.mark.oracle

TINY = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 12,
    "freq_dim": 32,
    "ffn_dim": 24,
    "num_layers": 3,
    "rope_max_seq_len": 32,
}
#: Wan 2.1 T2V (and Wan 2.2 T2V / TI2V / A14B experts: same names); Wan 2.1 I2V with its
#: CLIP image projection and image keys / values; Wan 2.2 I2V (latent-concat conditioning, more
#: input channels, no image attention); one without the cross-attention norm (diffusers'
#: attention has query / key norms whatever ``qk_norm`` says).
VARIANTS = {
    "t2v": {},
    "i2v-2.1": {"image_dim": 20, "added_kv_proj_dim": 16, "in_channels": 9},
    "flf2v-2.1": {"image_dim": 20, "added_kv_proj_dim": 16, "pos_embed_seq_len": 6},
    "i2v-2.2": {"in_channels": 9},
    "no-norm3": {"cross_attn_norm": False, "qk_norm": None},
}


POS_EMBED = "condition_embedder.image_embedder.pos_embed"


def _model(overrides):
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**{**TINY, **overrides})
    config = {"_class_name": "WanTransformer3DModel", **dict(model.config)}
    return model.state_dict(), config


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_native_file_built_by_the_map_converts_back_bit_exact(variant):
    state, config = _model(VARIANTS[variant])
    layout = wan.from_diffusers(config, _shapes(state))
    assert layout is not None
    parameters = {d: n for n, d in layout.parameters}
    native = native_state_dict(layout, state, parameters)
    if variant in ("i2v-2.1", "flf2v-2.1"):
        assert "blocks.2.cross_attn.k_img.weight" in native
        assert "img_emb.proj.3.weight" in native
    assert ("img_emb.emb_pos" in native) == (variant == "flf2v-2.1")
    assert "blocks.0.self_attn.q.weight" in native and "head.modulation" in native

    # diffusers' converter takes the single file's keys (with their prefix) back
    converted = convert_wan_transformer_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in native.items()}
    )
    if layout.image_positions:
        # the single-file converter keeps FLF2V's name; diffusers' conversion script renames it
        converted[POS_EMBED] = converted.pop("img_emb.emb_pos")
    assert_same_tensors(converted, state)

    # every native weight the map names is in the file, and maps to a diffusers one
    assert {p.native_key for p in layout.pieces} <= set(native)
    for key in native:
        if key not in parameters.values():
            assert layout.to_diffusers(key.rpartition(".")[0]), key

    assert wan.from_native(_shapes(native)) == layout
    found = native_layout(_shapes(native))
    assert isinstance(found, WanLayout) and found.architecture == "wan"


def test_optional_modules_follow_the_config():
    plain = wan.from_diffusers(_model({})[1], {})
    image = wan.from_diffusers(_model(VARIANTS["i2v-2.1"])[1], {})
    bare = wan.from_diffusers(_model(VARIANTS["no-norm3"])[1], {})
    assert plain == WanLayout(layers=3)
    assert image == WanLayout(layers=3, image_attention=True, image_embedder=True)
    assert bare == WanLayout(layers=3, cross_attn_norm=False)
    assert plain.to_native("blocks.1.attn2.add_k_proj") == ()
    assert [p.native for p in image.to_native("blocks.1.attn2.add_k_proj")] == [
        "blocks.1.cross_attn.k_img"
    ]
    assert [p.native for p in plain.to_native("blocks.2.norm2")] == ["blocks.2.norm3"]
    assert bare.to_native("blocks.2.norm2") == ()
    # a native file without query / key norms (Wan's qk_norm=False) has none to map
    state, config = _model({})
    layout = wan.from_diffusers(config, {})
    native = native_state_dict(layout, state, {d: n for n, d in layout.parameters})
    no_qk = {
        k: tuple(v.shape) for k, v in native.items() if "norm_q" not in k and "norm_k" not in k
    }
    assert wan.from_native(no_qk) == WanLayout(layers=3, qk_norm=False)
    assert wan.from_native(no_qk).to_native("blocks.0.attn1.norm_q") == ()
    assert plain.to_diffusers("blocks.3.self_attn.q") == ()


def test_other_models_are_not_wan():
    state, config = _model({})
    assert wan.from_native(_shapes(state)) is None  # diffusers names
    assert wan.from_diffusers({**config, "_class_name": "WanVACETransformer3DModel"}, {}) is None
    assert wan.from_diffusers({k: v for k, v in config.items() if k != "_class_name"}, {}) is None
    unet = {"input_blocks.0.0.weight": (4, 4, 3, 3), "time_embed.0.weight": (8, 4)}
    assert wan.from_native(unet) is None
    layout = wan.from_diffusers(config, {})
    native = native_state_dict(layout, state, {d: n for n, d in layout.parameters})
    # a gap in the block numbers is not a model
    gapped = {k: tuple(v.shape) for k, v in native.items() if not k.startswith("blocks.1.")}
    assert wan.from_native(gapped) is None
