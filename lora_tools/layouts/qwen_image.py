"""Qwen-Image (and Qwen-Image-Edit: diffusers ``QwenImageTransformer2DModel``): native and
diffusers names are the same.

The released single files (ComfyUI's ``comfy/ldm/qwen_image``) name every module as diffusers
does (``img_in``, ``txt_norm``, ``txt_in``, ``transformer_blocks.N.img_mod.1``,
``attn.to_q`` ... ``to_add_out``, ``img_mlp.net.0.proj``, ``norm_out.linear``, ``proj_out``),
with no fused projection and no swapped halves (both split ``norm_out.linear`` as scale,
shift); diffusers' single-file loader maps the checkpoint unchanged. The layout is therefore
the identity over the model's modules: it names the architecture and tells which names are
the model's. (Qwen-Image 2.1 is another class, with a fused ``img_mlp.gate_up``: not this one.)

Example:
    >>> layout = QwenImageLayout(num_layers=2)
    >>> layout.to_native("transformer_blocks.1.attn.add_k_proj")[0].native
    'transformer_blocks.1.attn.add_k_proj'
    >>> layout.to_diffusers("transformer_blocks.2.attn.to_q")
    ()
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from lora_tools.layouts.base import Piece, PieceTable, Shapes, config_value

#: Modules outside the blocks.
BASIC_MODULES: tuple[str, ...] = (
    "img_in",
    "txt_in",
    "txt_norm",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "norm_out.linear",
    "proj_out",
)
#: The modules of every block, under ``transformer_blocks.N``.
BLOCK_MODULES: tuple[str, ...] = (
    "img_mod.1",
    "txt_mod.1",
    *(f"attn.{p}" for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")),
    "attn.to_out.0",
    "attn.to_add_out",
    *(f"attn.{n}" for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")),
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
#: The embedding of Qwen-Image-Edit-2511-style models (``use_additional_t_cond``).
ADDITIONAL_T = "time_text_embed.addition_t_embedding"
_BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.")
#: Keys every Qwen-Image transformer has; 2.1's ``txt_in.text_norm`` marks the other class.
_MARKS = ("txt_norm.weight", "img_in.weight", "transformer_blocks.0.img_mod.1.weight")
_OTHER = "txt_in.text_norm.weight"


@dataclass(frozen=True)
class QwenImageLayout:
    """A Qwen-Image transformer's structure; its map is the identity on the modules it has.

    Attributes:
        num_layers: transformer blocks.
        additional_t_cond: the model has ``time_text_embed.addition_t_embedding``.
    """

    num_layers: int
    additional_t_cond: bool = False
    architecture: ClassVar[str] = "qwen-image"

    def modules(self) -> Iterator[str]:
        """Every module path with a weight, blocks in order."""
        yield from BASIC_MODULES
        if self.additional_t_cond:
            yield ADDITIONAL_T
        for i in range(self.num_layers):
            yield from (f"transformer_blocks.{i}.{m}" for m in BLOCK_MODULES)

    @cached_property
    def table(self) -> PieceTable:
        """One whole-weight piece per module, the same name on both sides."""
        return PieceTable(Piece(m, m) for m in self.modules())

    def to_native(self, diffusers_path: str) -> tuple[Piece, ...]:
        return self.table.to_native(diffusers_path)

    def to_diffusers(self, native_path: str) -> tuple[Piece, ...]:
        return self.table.to_diffusers(native_path)


def from_native(shapes: Shapes) -> QwenImageLayout | None:
    """The layout of a native Qwen-Image transformer from its tensors (file prefix removed);
    None for another model."""
    if not all(key in shapes for key in _MARKS) or _OTHER in shapes:
        return None
    blocks = {int(m.group(1)) for m in map(_BLOCK_RE.match, shapes) if m}
    if blocks != set(range(len(blocks))):
        return None
    return QwenImageLayout(len(blocks), f"{ADDITIONAL_T}.weight" in shapes)


def from_diffusers(config: Mapping[str, Any], shapes: Shapes) -> QwenImageLayout | None:
    """The layout of a diffusers ``QwenImageTransformer2DModel`` folder."""
    if config.get("_class_name") != "QwenImageTransformer2DModel":
        return None
    return QwenImageLayout(
        config_value(config, "num_layers", default=60),
        bool(config_value(config, "use_additional_t_cond", default=False)),
    )


__all__ = [
    "ADDITIONAL_T",
    "BASIC_MODULES",
    "BLOCK_MODULES",
    "QwenImageLayout",
    "from_diffusers",
    "from_native",
]
