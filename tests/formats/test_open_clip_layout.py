"""The OpenCLIP text encoder layout (lora_tools.layouts.open_clip), checked against diffusers.

A tiny transformers CLIP text model is written under native OpenCLIP names through the map's
pieces (q / k / v stacked into ``attn.in_proj_weight`` / ``_bias``), plus the two tensors the map
leaves out (``text_projection`` transposed, ``positional_embedding`` bare); diffusers' own
``convert_open_clip_checkpoint`` must turn that file back into the model's state dict, every
tensor bit-equal.
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_tools.layouts import native_layout
from lora_tools.layouts.open_clip import UNMAPPED, OpenClipLayout, from_diffusers, from_native

transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

SDXL = "conditioner.embedders.1.model."
SD2 = "cond_stage_model.model."
CONFIG = {
    "vocab_size": 50,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "max_position_embeddings": 7,
    "projection_dim": 6,
    "hidden_act": "gelu",
}


def _model(cls_name: str):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**CONFIG)
    model = getattr(transformers, cls_name)(config).eval()
    # random norms too, so a swapped ln_1 / ln_2 cannot pass
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.normal_()
    return model


def _native(state: dict[str, torch.Tensor], layout: OpenClipLayout) -> dict[str, torch.Tensor]:
    """The model's tensors under OpenCLIP names, through the map (and by hand where it has
    none)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
            continue
        if key.endswith("embeddings.position_embedding.weight"):
            out["positional_embedding"] = value.clone()
            continue
        module, _, param = key.rpartition(".")
        pieces = layout.to_native(module)
        assert len(pieces) == 1, f"{module}: {pieces}"
        piece = pieces[0]
        assert piece.diffusers == module
        assert piece in layout.to_diffusers(piece.native)
        native_key = piece.native_key if param == "weight" else piece.native_bias_key
        if piece.whole:
            out[native_key] = value.clone()
            continue
        shape = (3 * piece.rows, *value.shape[1:])
        full = out.setdefault(native_key, torch.zeros(shape, dtype=value.dtype))
        start, stop = piece.native_rows
        full[start:stop] = value
    return out


@pytest.mark.parametrize(
    ("cls_name", "prefix"),
    [("CLIPTextModelWithProjection", SDXL), ("CLIPTextModel", SD2)],
)
def test_diffusers_converts_the_native_file_back_bit_for_bit(cls_name, prefix, tmp_path):
    model = _model(cls_name)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    state = model.state_dict()
    # transformers 5 keeps CLIPTextModel's modules out of text_model. (WithProjection: in it)
    prefix_in_folder = "text_model." if cls_name == "CLIPTextModelWithProjection" else ""
    layout = from_diffusers(config, {k: tuple(v.shape) for k, v in state.items()})
    assert layout == OpenClipLayout(width=8, layers=3, prefix=prefix_in_folder)

    native = _native(state, layout)
    shapes = {k: tuple(v.shape) for k, v in native.items()}
    assert from_native(shapes) == native_layout(shapes) == OpenClipLayout(width=8, layers=3)
    # every native tensor is a piece's weight or bias, or one the map says it leaves out
    covered = {p.native_key for p in layout.table} | {p.native_bias_key for p in layout.table}
    assert set(native) - covered <= set(UNMAPPED)
    assert {"transformer.resblocks.2.attn.in_proj_weight", "ln_final.bias"} <= set(native)

    converted = single_file_utils.convert_open_clip_checkpoint(
        model, {prefix + k: v for k, v in native.items()}, prefix=prefix
    )
    # diffusers' converter always writes the text_model. level
    expected = {
        k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
        for k, v in state.items()
    }
    assert set(converted) == set(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


def test_in_proj_is_three_row_pieces_and_the_rest_renames():
    layout = OpenClipLayout(width=4, layers=2)
    q, k, v = layout.to_diffusers("transformer.resblocks.1.attn.in_proj")
    assert [p.diffusers for p in (q, k, v)] == [
        f"text_model.encoder.layers.1.self_attn.{c}_proj" for c in "qkv"
    ]
    assert [p.native_rows for p in (q, k, v)] == [(0, 4), (4, 8), (8, 12)]
    assert k.native_key == "transformer.resblocks.1.attn.in_proj_weight"
    assert k.native_bias_key == "transformer.resblocks.1.attn.in_proj_bias"
    assert layout.to_native("text_model.encoder.layers.0.mlp.fc2") == (
        layout.to_diffusers("transformer.resblocks.0.mlp.c_proj")
    )
    assert layout.to_native("text_model.encoder.layers.2.mlp.fc2") == ()  # no block 2
    assert layout.to_native("text_projection") == ()  # transposed: not a piece
    assert layout.to_diffusers("positional_embedding") == ()
    assert layout.architecture == "open-clip"


def test_to_native_takes_both_spellings_of_the_diffusers_path():
    layout = OpenClipLayout(width=4, layers=1)
    bare = layout.to_native("encoder.layers.0.self_attn.v_proj")
    full = layout.to_native("text_model.encoder.layers.0.self_attn.v_proj")
    assert bare and [p.diffusers for p in bare] == ["encoder.layers.0.self_attn.v_proj"]
    assert [(p.native, p.native_rows) for p in bare] == [(p.native, p.native_rows) for p in full]
    assert OpenClipLayout(4, 1, prefix="").to_native("text_model.final_layer_norm")[0].native == (
        "ln_final"
    )
    assert layout.to_native("text_model.text_model.final_layer_norm") == ()


def test_sd2s_diffusers_encoder_maps_the_blocks_it_keeps():
    """SD2's diffusers text encoder has 23 of the native file's 24 blocks: resblocks.23 has no
    diffusers counterpart in the layout from the folder's config."""
    layout = from_diffusers(
        {
            "architectures": ["CLIPTextModel"],
            "hidden_act": "gelu",
            "hidden_size": 16,
            "num_hidden_layers": 23,
        },
        {},
    )
    assert layout is not None and layout.layers == 23
    assert layout.to_diffusers("transformer.resblocks.22.attn.out_proj")
    assert layout.to_diffusers("transformer.resblocks.23.attn.out_proj") == ()


@pytest.mark.parametrize(
    "shapes",
    [
        {},
        {"input_blocks.0.0.weight": (4, 4, 3, 3)},  # a UNet
        {"text_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8)},  # transformers names
        {  # a block missing
            "transformer.resblocks.0.attn.in_proj_weight": (24, 8),
            "transformer.resblocks.2.attn.in_proj_weight": (24, 8),
        },
        {"transformer.resblocks.0.attn.in_proj_weight": (16, 8)},  # not three stacked
        {  # widths that disagree
            "transformer.resblocks.0.attn.in_proj_weight": (24, 8),
            "transformer.resblocks.1.attn.in_proj_weight": (12, 4),
        },
    ],
)
def test_other_tensors_give_no_native_layout(shapes):
    assert from_native(shapes) is None


@pytest.mark.parametrize(
    "config",
    [
        {
            "architectures": ["CLIPTextModel"],
            "hidden_act": "quick_gelu",
            "hidden_size": 8,
            "num_hidden_layers": 2,
        },  # OpenAI CLIP-L: its single files keep these names
        {"_class_name": "UNet2DConditionModel", "layers_per_block": 2},
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_act": "gelu",
            "hidden_size": 8,
            "num_hidden_layers": 2,
        },
    ],
)
def test_other_configs_give_no_diffusers_layout(config):
    assert from_diffusers(config, {}) is None
