"""Wan 2.x (Wan-AI's video transformer) in its native layout and diffusers' ``WanTransformer3DModel``.

Every native weight is one whole diffusers weight (Wan fuses no projections), so the map is a
list of renames, per block ``N``:

- ``blocks.N.self_attn.{q,k,v,o}`` / ``norm_q`` / ``norm_k``: ``blocks.N.attn1.{to_q, to_k,
  to_v, to_out.0}`` / ``norm_q`` / ``norm_k``; ``cross_attn.*`` the same on ``attn2``, and
  for image-conditioned models (Wan 2.1 I2V / FLF2V) ``cross_attn.k_img`` / ``v_img`` /
  ``norm_k_img``: ``attn2.add_k_proj`` / ``add_v_proj`` / ``norm_added_k``.
- ``blocks.N.norm3`` (the cross-attention norm, the only one with weights) is diffusers'
  ``blocks.N.norm2``; ``ffn.0`` / ``ffn.2``: ``ffn.net.0.proj`` / ``ffn.net.2``.
- outside the blocks: ``patch_embedding`` (same name), ``text_embedding.0`` / ``.2`` and
  ``time_embedding.0`` / ``.2``: ``condition_embedder.{text,time}_embedder.linear_1`` / ``_2``,
  ``time_projection.1``: ``condition_embedder.time_proj``, ``head.head``: ``proj_out``,
  ``img_emb.proj.{0,1,3,4}``: ``condition_embedder.image_embedder.{norm1, ff.net.0.proj,
  ff.net.2, norm2}``.
- bare parameters (no module, no ``.weight``; not :class:`Piece` s): ``blocks.N.modulation``
  and ``head.modulation`` are ``blocks.N.scale_shift_table`` and ``scale_shift_table``; Wan 2.1
  FLF2V's ``img_emb.emb_pos`` is ``condition_embedder.image_embedder.pos_embed``.

Wan 2.2 keeps these names: its A14B models are two such transformers (diffusers
``transformer`` and ``transformer_2``), its I2V conditions by latent channels (no ``k_img``),
TI2V-5B only changes sizes. These are the facts of diffusers' ``convert_wan_transformer_to_
diffusers`` (which leaves ``emb_pos`` out: diffusers' ``scripts/convert_wan_to_diffusers.py``
maps it); ``tests/formats/test_wan_layout.py`` checks the map against it.

Example:
    >>> layout = WanLayout(layers=2, image_attention=True)
    >>> [p.diffusers for p in layout.to_diffusers("blocks.1.cross_attn.k_img")]
    ['blocks.1.attn2.add_k_proj']
    >>> [p.native for p in layout.to_native("condition_embedder.time_proj")]
    ['time_projection.1']
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from lora_tools.layouts.base import Piece, PieceTable, Shapes, config_value

_ATTENTION = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))
_QK_NORM = (("norm_q", "norm_q"), ("norm_k", "norm_k"))
_IMAGE_ATTENTION = (("k_img", "add_k_proj"), ("v_img", "add_v_proj"))
_FFN = (("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"))
_EMBEDDINGS = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
)
_IMAGE_EMBEDDER = (
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
)
_BLOCK_Q = re.compile(r"^blocks\.(\d+)\.self_attn\.q\.weight$")


@dataclass(frozen=True)
class WanLayout:
    """A Wan transformer's structure, and the module map it implies.

    Attributes:
        layers: the number of transformer blocks.
        qk_norm: attention has RMS norms on queries and keys (``norm_q`` / ``norm_k``).
        cross_attn_norm: blocks have the affine cross-attention norm (native ``norm3``).
        image_attention: cross-attention has image keys and values (``k_img`` / ``v_img``).
        image_embedder: the model has the CLIP image projection (``img_emb``).
        image_positions: the image projection has position embeddings (FLF2V's ``emb_pos``).
    """

    architecture: ClassVar[str] = "wan"

    layers: int
    qk_norm: bool = True
    cross_attn_norm: bool = True
    image_attention: bool = False
    image_embedder: bool = False
    image_positions: bool = False

    def renames(self) -> Iterator[tuple[str, str]]:
        """``(native path, diffusers path)`` of every module with weights."""
        yield from _EMBEDDINGS
        if self.image_embedder:
            yield from _IMAGE_EMBEDDER
        for n in range(self.layers):
            block = f"blocks.{n}"
            for native, diffusers in (("self_attn", "attn1"), ("cross_attn", "attn2")):
                parts = _ATTENTION + (_QK_NORM if self.qk_norm else ())
                for a, b in parts:
                    yield f"{block}.{native}.{a}", f"{block}.{diffusers}.{b}"
            if self.image_attention:
                for a, b in _IMAGE_ATTENTION:
                    yield f"{block}.cross_attn.{a}", f"{block}.attn2.{b}"
                if self.qk_norm:
                    yield f"{block}.cross_attn.norm_k_img", f"{block}.attn2.norm_added_k"
            if self.cross_attn_norm:
                yield f"{block}.norm3", f"{block}.norm2"
            for a, b in _FFN:
                yield f"{block}.{a}", f"{block}.{b}"

    @property
    def parameters(self) -> tuple[tuple[str, str], ...]:
        """``(native key, diffusers key)`` of the bare parameters, which no Piece names (a
        Piece's diffusers key ends in ``.weight``); LoRAs do not train them."""
        blocks = [
            (f"blocks.{n}.modulation", f"blocks.{n}.scale_shift_table") for n in range(self.layers)
        ]
        head = [("head.modulation", "scale_shift_table")]
        if self.image_positions:
            head.append(("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"))
        return (*head, *blocks)

    @cached_property
    def _table(self) -> PieceTable:
        return PieceTable(Piece(native, diffusers) for native, diffusers in self.renames())

    @property
    def pieces(self) -> tuple[Piece, ...]:
        """Every piece of the map."""
        return self._table.pieces

    def to_native(self, diffusers_path: str) -> tuple[Piece, ...]:
        """The native weight a diffusers module is (one whole-weight piece), or ()."""
        return self._table.to_native(diffusers_path)

    def to_diffusers(self, native_path: str) -> tuple[Piece, ...]:
        """The diffusers weight a native module is (one whole-weight piece), or ()."""
        return self._table.to_diffusers(native_path)


def from_native(shapes: Shapes) -> WanLayout | None:
    """The layout of a native Wan transformer from its tensors (file prefix removed, e.g.
    ``blocks.0.self_attn.q.weight``); None for another model."""
    if "patch_embedding.weight" not in shapes or "head.head.weight" not in shapes:
        return None
    blocks = sorted(int(m.group(1)) for m in map(_BLOCK_Q.match, shapes) if m)
    if not blocks or blocks != list(range(len(blocks))):
        return None
    return WanLayout(
        layers=len(blocks),
        qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
        image_attention="blocks.0.cross_attn.k_img.weight" in shapes,
        image_embedder="img_emb.proj.1.weight" in shapes,
        image_positions="img_emb.emb_pos" in shapes,
    )


def from_diffusers(config: Mapping[str, Any], shapes: Shapes) -> WanLayout | None:
    """The layout of a diffusers ``WanTransformer3DModel`` folder from its ``config.json``
    (defaults as the class has them)."""
    if config.get("_class_name") != "WanTransformer3DModel":
        return None
    return WanLayout(
        layers=config_value(config, "num_layers", default=40),
        # diffusers' WanAttention has norm_q / norm_k whatever the config's qk_norm says
        qk_norm=True,
        cross_attn_norm=bool(config_value(config, "cross_attn_norm", default=True)),
        image_attention=config.get("added_kv_proj_dim") is not None,
        image_embedder=config.get("image_dim") is not None,
        image_positions=config.get("pos_embed_seq_len") is not None,
    )


__all__ = ["WanLayout", "from_diffusers", "from_native"]
