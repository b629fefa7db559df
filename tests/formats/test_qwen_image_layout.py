"""The Qwen-Image layout (lora_tools.layouts.qwen_image): the identity over the model's modules.

The reference is diffusers itself: its single-file loader maps a native Qwen-Image checkpoint
unchanged, and the layout's module list is exactly the modules with weights of a tiny
``QwenImageTransformer2DModel``.
"""

from __future__ import annotations

import pytest

from lora_tools.layouts import diffusers_layout, native_layout, qwen_image, sd3, unet
from lora_tools.layouts.qwen_image import QwenImageLayout

TINY = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "axes_dims_rope": (2, 2, 4),
}


def _model(config: dict):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(**config).eval()
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return {**model.config, "_class_name": "QwenImageTransformer2DModel"}, state, shapes


@pytest.mark.oracle
@pytest.mark.parametrize("extra", [{}, {"use_additional_t_cond": True}], ids=["base", "t-cond"])
def test_the_layout_is_the_models_modules(extra):
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    config, state, shapes = _model({**TINY, **extra})
    layout = qwen_image.from_diffusers(config, shapes)
    assert layout == QwenImageLayout(2, bool(extra))
    assert qwen_image.from_native(shapes) == layout
    assert native_layout(shapes) == layout and diffusers_layout(config, shapes) == layout
    modules = {key.rpartition(".")[0] for key in state}
    assert set(layout.modules()) == modules
    for module in modules:
        (piece,) = layout.to_native(module)
        assert piece.whole and piece.native == module and layout.to_diffusers(module) == (piece,)

    # diffusers loads a native single file under its own names, unchanged
    mapping = SINGLE_FILE_LOADABLE_CLASSES["QwenImageTransformer2DModel"]["checkpoint_mapping_fn"]
    assert sorted(mapping(checkpoint=dict(state))) == sorted(state)


@pytest.mark.parametrize(
    "path",
    [
        "transformer_blocks.2.attn.to_q",  # no such block
        "transformer_blocks.0.attn",  # not a leaf
        "transformer_blocks.0.img_mlp.gate_up",  # Qwen-Image 2.1
        "double_blocks.0.img_attn.qkv",  # Flux
        "joint_blocks.0.x_block.attn.qkv",  # SD3
    ],
)
def test_modules_the_model_does_not_have_map_to_nothing(path):
    layout = QwenImageLayout(2)
    assert layout.to_native(path) == () and layout.to_diffusers(path) == ()


def test_other_models_give_no_layout():
    marks = {
        "txt_norm.weight": (16,),
        "img_in.weight": (16, 16),
        "transformer_blocks.0.img_mod.1.weight": (96, 16),
    }
    assert qwen_image.from_native(marks) == QwenImageLayout(1)
    assert qwen_image.from_native({**marks, "txt_in.text_norm.weight": (16,)}) is None  # 2.1
    assert (
        qwen_image.from_native({**marks, "transformer_blocks.2.attn.to_q.weight": (16, 16)}) is None
    )
    assert qwen_image.from_native({"double_blocks.0.img_attn.qkv.weight": (48, 16)}) is None
    assert sd3.from_native(marks) is None and unet.from_native(marks) is None
    for name in ("QwenImage21Transformer2DModel", "SD3Transformer2DModel", None):
        assert qwen_image.from_diffusers({"_class_name": name, "num_layers": 2}, {}) is None
