"""Stable Diffusion 3 / 3.5 (MMDiT) in its two layouts: native ``joint_blocks`` <-> diffusers
``transformer_blocks`` (``SD3Transformer2DModel``).

Per block ``i`` (``joint_blocks.i`` is ``transformer_blocks.i``):

- ``x_block.attn.qkv`` stacks ``attn.to_q``, ``to_k``, ``to_v`` by rows (``dim`` rows each);
  ``context_block.attn.qkv`` stacks ``attn.add_q_proj``, ``add_k_proj``, ``add_v_proj``.
- ``x_block.attn.proj`` / ``context_block.attn.proj``: ``attn.to_out.0`` / ``attn.to_add_out``;
  ``x_block.mlp.fc1`` / ``fc2``: ``ff.net.0.proj`` / ``ff.net.2`` (``context_block``:
  ``ff_context``); ``x_block.adaLN_modulation.1``: ``norm1.linear`` (``context_block``:
  ``norm1_context.linear``).
- the last block's context stream is "pre only": no ``attn.proj`` and no ``mlp``, and its
  ``adaLN_modulation.1`` holds (shift, scale) where diffusers' ``norm1_context.linear`` holds
  (scale, shift): two pieces with the halves swapped, as for ``final_layer.adaLN_modulation.1``
  -> ``norm_out.linear``.
- SD3.5 Large (``qk_norm``): ``attn.ln_q`` / ``ln_k`` are ``attn.norm_q`` / ``norm_k``
  (``context_block``: ``norm_added_q`` / ``norm_added_k``).
- SD3.5 Medium (``dual_attention_layers``): ``x_block.attn2.qkv`` / ``proj`` / ``ln_q`` /
  ``ln_k`` are ``attn2.to_q|k|v`` / ``to_out.0`` / ``norm_q`` / ``norm_k``.

Outside the blocks: ``x_embedder.proj`` (``pos_embed.proj``), ``context_embedder``,
``t_embedder.mlp.0|2`` (``time_text_embed.timestep_embedder.linear_1|2``), ``y_embedder.mlp.0|2``
(``time_text_embed.text_embedder.linear_1|2``), ``final_layer.linear`` (``proj_out``). The
positional table ``pos_embed`` (diffusers ``pos_embed.pos_embed``) is a bare parameter, no Piece:
:attr:`SD3Layout.parameters`.

These are the facts of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` and
ComfyUI's ``mmdit_to_diffusers``.

Example:
    >>> layout = SD3Layout(num_layers=2, dim=64)
    >>> [p.native_rows for p in layout.to_native("transformer_blocks.0.attn.to_k")]
    [(64, 128)]
    >>> [(p.native_rows, p.diffusers_rows) for p in layout.to_native("norm_out.linear")]
    [((64, 128), (0, 64)), ((0, 64), (64, 128))]
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from lora_tools.layouts.base import Piece, PieceTable, Shapes, config_value, stacked

#: Modules outside the blocks: native -> diffusers.
BASIC_PARTS: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("context_embedder", "context_embedder"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
#: The image stream's renamed modules in every block: native (under ``x_block``) -> diffusers.
X_PARTS: tuple[tuple[str, str], ...] = (
    ("attn.proj", "attn.to_out.0"),
    ("adaLN_modulation.1", "norm1.linear"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
)
#: The context stream's, in every block but the last (under ``context_block``).
CONTEXT_PARTS: tuple[tuple[str, str], ...] = (
    ("attn.proj", "attn.to_add_out"),
    ("adaLN_modulation.1", "norm1_context.linear"),
    ("mlp.fc1", "ff_context.net.0.proj"),
    ("mlp.fc2", "ff_context.net.2"),
)
#: The positional table: a bare parameter, native key -> diffusers key.
POS_EMBED = ("pos_embed", "pos_embed.pos_embed")
_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
_BLOCK_RE = re.compile(r"^joint_blocks\.(\d+)\.")
_SAMPLE_QKV = "joint_blocks.0.x_block.attn.qkv.weight"


@dataclass(frozen=True)
class SD3Layout:
    """An MMDiT's structure, and the module map it implies.

    Attributes:
        num_layers: joint blocks (the last one's context stream is pre only).
        dim: the hidden size: rows of each of q, k, v, and of each half of an adaLN-continuous
            modulation (``norm_out``, the last block's ``norm1_context``).
        dual_attention_layers: blocks with a second image attention (SD3.5 Medium).
        qk_norm: the attentions normalise q and k (SD3.5).
    """

    num_layers: int
    dim: int
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: bool = False
    architecture: ClassVar[str] = "sd3"

    def pieces(self) -> Iterator[Piece]:
        """Every piece of the map, blocks in order."""
        d = self.dim
        yield from (Piece(n, f) for n, f in BASIC_PARTS)
        yield from _swapped("final_layer.adaLN_modulation.1", "norm_out.linear", d)
        for i in range(self.num_layers):
            x, c = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
            t = f"transformer_blocks.{i}"
            yield from stacked(f"{x}.attn.qkv", [(f"{t}.attn.{p}", d) for p in _QKV])
            yield from stacked(f"{c}.attn.qkv", [(f"{t}.attn.{p}", d) for p in _ADD_QKV])
            yield from (Piece(f"{x}.{n}", f"{t}.{f}") for n, f in X_PARTS)
            if i < self.num_layers - 1:
                yield from (Piece(f"{c}.{n}", f"{t}.{f}") for n, f in CONTEXT_PARTS)
            else:
                yield from _swapped(f"{c}.adaLN_modulation.1", f"{t}.norm1_context.linear", d)
            if self.qk_norm:
                yield Piece(f"{x}.attn.ln_q", f"{t}.attn.norm_q")
                yield Piece(f"{x}.attn.ln_k", f"{t}.attn.norm_k")
                yield Piece(f"{c}.attn.ln_q", f"{t}.attn.norm_added_q")
                yield Piece(f"{c}.attn.ln_k", f"{t}.attn.norm_added_k")
            if i in self.dual_attention_layers:
                yield from stacked(f"{x}.attn2.qkv", [(f"{t}.attn2.{p}", d) for p in _QKV])
                yield Piece(f"{x}.attn2.proj", f"{t}.attn2.to_out.0")
                if self.qk_norm:
                    yield Piece(f"{x}.attn2.ln_q", f"{t}.attn2.norm_q")
                    yield Piece(f"{x}.attn2.ln_k", f"{t}.attn2.norm_k")

    @cached_property
    def table(self) -> PieceTable:
        """The pieces, indexed by either name."""
        return PieceTable(self.pieces())

    @property
    def parameters(self) -> tuple[tuple[str, str], ...]:
        """``(native key, diffusers key)`` of the bare parameters, which no Piece names (a
        Piece's diffusers key ends in ``.weight``); LoRAs do not train them."""
        return (POS_EMBED,)

    def to_native(self, diffusers_path: str) -> tuple[Piece, ...]:
        return self.table.to_native(diffusers_path)

    def to_diffusers(self, native_path: str) -> tuple[Piece, ...]:
        return self.table.to_diffusers(native_path)


def _swapped(native: str, diffusers: str, half: int) -> tuple[Piece, Piece]:
    """Native (shift, scale) rows as diffusers (scale, shift)."""
    return Piece(native, diffusers, half, 0, half), Piece(native, diffusers, 0, half, half)


def from_native(shapes: Shapes) -> SD3Layout | None:
    """The layout of a native SD3 / SD3.5 model from its tensors (file prefix removed); None
    for another model."""
    qkv = shapes.get(_SAMPLE_QKV)
    if qkv is None or "context_embedder.weight" not in shapes or qkv[0] % 3:
        return None
    blocks = {int(m.group(1)) for m in map(_BLOCK_RE.match, shapes) if m}
    if blocks != set(range(len(blocks))):
        return None
    dual = tuple(
        i for i in sorted(blocks) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes
    )
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    return SD3Layout(len(blocks), qkv[0] // 3, dual, qk_norm)


def from_diffusers(config: Mapping[str, Any], shapes: Shapes) -> SD3Layout | None:
    """The layout of a diffusers ``SD3Transformer2DModel`` folder; the hidden size from its
    ``to_q`` weight where the shapes have it, else from the config."""
    if config.get("_class_name") != "SD3Transformer2DModel":
        return None
    to_q = shapes.get("transformer_blocks.0.attn.to_q.weight")
    heads = config_value(config, "num_attention_heads", default=18)
    dim = to_q[0] if to_q else heads * config_value(config, "attention_head_dim", default=64)
    return SD3Layout(
        num_layers=config_value(config, "num_layers", default=18),
        dim=dim,
        dual_attention_layers=tuple(
            sorted(config_value(config, "dual_attention_layers", default=()))
        ),
        qk_norm=config_value(config, "qk_norm") is not None,
    )


__all__ = [
    "BASIC_PARTS",
    "CONTEXT_PARTS",
    "POS_EMBED",
    "X_PARTS",
    "SD3Layout",
    "from_diffusers",
    "from_native",
]
