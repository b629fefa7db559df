"""Checkpoint layouts: how one model's modules are named in its native (single-file) layout and
in diffusers, derived from the model's structure rather than listed per case.

- :mod:`lora_tools.layouts.base`: :class:`Piece` (rows of a native weight that are rows of a
  diffusers weight) and the :class:`Layout` protocol every architecture implements.
- :mod:`lora_tools.layouts.unet`: the Stable Diffusion UNet (SD1.x, SD2.x, SDXL), original
  ``input_blocks`` / ``middle_block`` / ``output_blocks`` <-> diffusers ``down_blocks`` /
  ``mid_block`` / ``up_blocks``.
- :mod:`lora_tools.layouts.flux`: Flux.1 (dev / schnell / Kontext / Fill) and Chroma, BFL
  ``double_blocks`` / ``single_blocks`` (fused ``qkv``, ``linear1``; the final adaLN's halves
  swapped) <-> ``FluxTransformer2DModel`` / ``ChromaTransformer2DModel``.
- :mod:`lora_tools.layouts.wan`: Wan 2.x, native ``blocks.N.self_attn.q`` <-> diffusers
  ``WanTransformer3DModel`` ``blocks.N.attn1.to_q`` (renames only).
- :mod:`lora_tools.layouts.hunyuan_video`: HunyuanVideo, native ``double_blocks`` /
  ``single_blocks`` (fused ``img_attn_qkv``, ``linear1``) <-> ``HunyuanVideoTransformer3DModel``.
- :mod:`lora_tools.layouts.open_clip`: the OpenCLIP text encoder (SD2.x, SDXL's second),
  ``transformer.resblocks`` <-> transformers ``text_model.encoder.layers``.
- :mod:`lora_tools.layouts.sd3`: SD3 / SD3.5 MMDiT, ``joint_blocks`` (fused ``qkv``; the
  pre-only and final adaLN halves swapped) <-> ``SD3Transformer2DModel``.
- :mod:`lora_tools.layouts.qwen_image`: Qwen-Image, the same names in both layouts.

Each architecture module offers ``from_native(shapes)`` (the layout a native model's own tensor
names and shapes show, file prefix removed) and ``from_diffusers(config, shapes)`` (the layout of
a diffusers model folder from its ``config.json``); both give None for another model. The maps
work on module paths (no ``.weight``), know nothing of files and import nothing of loratool:
:mod:`lora_tools.resolve` uses them to find a base weight named in the other layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lora_tools.layouts import flux, hunyuan_video, open_clip, qwen_image, sd3, unet, wan
from lora_tools.layouts.base import Layout, Piece, PieceTable, Shapes
from lora_tools.layouts.unet import UNetLayout

#: Architecture modules, tried in order: each has ``from_native`` and ``from_diffusers``.
ARCHITECTURES = (
    open_clip,
    flux,
    wan,
    hunyuan_video,
    sd3,
    qwen_image,
    unet,
)


def _first(builders: list[Callable[[], Layout | None]]) -> Layout | None:
    for build in builders:
        layout = build()
        if layout is not None:
            return layout
    return None


def native_layout(shapes: Shapes) -> Layout | None:
    """The layout of a native model from its tensors (keys without the file's prefix, e.g.
    ``double_blocks.0.img_attn.qkv.weight``, and their shapes); None when no architecture
    recognises them."""
    return _first([lambda m=m: m.from_native(shapes) for m in ARCHITECTURES])


def diffusers_layout(config: Mapping[str, Any], shapes: Shapes) -> Layout | None:
    """The layout of a diffusers model folder from its ``config.json`` (``_class_name`` names
    the model class) and its tensors; None when no architecture knows the class."""
    return _first([lambda m=m: m.from_diffusers(config, shapes) for m in ARCHITECTURES])


__all__ = [
    "ARCHITECTURES",
    "Layout",
    "Piece",
    "PieceTable",
    "Shapes",
    "UNetLayout",
    "diffusers_layout",
    "native_layout",
]
