"""HunyuanVideo (Tencent) in its native layout and diffusers' ``HunyuanVideoTransformer3DModel``.

Native HunyuanVideo looks like Flux (``double_blocks`` / ``single_blocks``) but spells its
modules differently (``img_attn_qkv``, not Flux's ``img_attn.qkv``; ``img_mod.linear``, not
``img_mod.lin``; a 3-D patch embedding ``img_in.proj``; a text token refiner ``txt_in.
individual_token_refiner``). With ``h`` the hidden size (heads x head dim) and ``m`` the MLP
width:

- ``double_blocks.N`` is ``transformer_blocks.N``: ``img_attn_qkv`` stacks ``attn.to_q`` /
  ``to_k`` / ``to_v`` (``h`` rows each), ``txt_attn_qkv`` ``attn.add_q_proj`` / ``add_k_proj``
  / ``add_v_proj``; ``img_attn_proj`` / ``txt_attn_proj``: ``attn.to_out.0`` /
  ``attn.to_add_out``; ``{img,txt}_attn_{q,k}_norm``: ``attn.norm_{q,k}`` /
  ``attn.norm_added_{q,k}``; ``img_mlp.fc1`` / ``fc2``: ``ff.net.0.proj`` / ``ff.net.2``
  (``txt_mlp``: ``ff_context``); ``img_mod.linear`` / ``txt_mod.linear``: ``norm1.linear`` /
  ``norm1_context.linear``.
- ``single_blocks.N`` is ``single_transformer_blocks.N``: ``linear1`` stacks ``attn.to_q``,
  ``to_k``, ``to_v`` (``h`` rows each) and ``proj_mlp`` (``m`` rows); ``linear2``:
  ``proj_out``; ``q_norm`` / ``k_norm``: ``attn.norm_q`` / ``norm_k``; ``modulation.linear``:
  ``norm.linear``.
- ``txt_in``: ``context_embedder``; its ``individual_token_refiner.blocks.N`` are
  ``token_refiner.refiner_blocks.N`` (``self_attn_qkv`` stacks ``attn.to_q/k/v``,
  ``self_attn_proj``: ``attn.to_out.0``, ``mlp.fc1/fc2``: ``ff.net.0.proj`` / ``ff.net.2``,
  ``adaLN_modulation.1``: ``norm_out.linear``, ``norm1`` / ``norm2`` the same);
  ``input_embedder``: ``proj_in``; ``t_embedder.mlp.0/2`` and ``c_embedder.linear_1/2``:
  ``time_text_embed.timestep_embedder.linear_1/2`` and ``time_text_embed.text_embedder.
  linear_1/2``.
- ``img_in.proj``: ``x_embedder.proj``; ``time_in.mlp.0/2``, ``guidance_in.mlp.0/2``,
  ``vector_in.in_layer/out_layer``: ``time_text_embed.{timestep,guidance,text}_embedder.
  linear_1/2``; ``final_layer.linear``: ``proj_out``.
- ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with its halves swapped (native
  shift then scale, diffusers scale then shift): two pieces.

These are the facts of diffusers' ``convert_hunyuan_video_transformer_to_diffusers`` (which
hard-codes ``h = 3072``, the released model's size; this map takes ``h`` from the model);
``tests/formats/test_hunyuan_video_layout.py`` checks the map against it.

Example:
    >>> layout = HunyuanVideoLayout(hidden=4, mlp=16, layers=1, single_layers=1, refiner_layers=0)
    >>> [(p.diffusers, p.native_rows) for p in layout.to_diffusers("single_blocks.0.linear1")]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('single_transformer_blocks.0.attn.to_q', (0, 4)),
     ('single_transformer_blocks.0.attn.to_k', (4, 8)),
     ('single_transformer_blocks.0.attn.to_v', (8, 12)),
     ('single_transformer_blocks.0.proj_mlp', (12, 28))]
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from lora_tools.layouts.base import Piece, PieceTable, Shapes, config_value, stacked

_EMBEDDINGS = (
    ("img_in.proj", "x_embedder.proj"),
    ("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("txt_in.input_embedder", "context_embedder.proj_in"),
    ("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    ("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    ("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
    ("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
_GUIDANCE = (
    ("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"),
)
_DOUBLE = (
    ("img_mod.linear", "norm1.linear"),
    ("txt_mod.linear", "norm1_context.linear"),
    ("img_attn_proj", "attn.to_out.0"),
    ("txt_attn_proj", "attn.to_add_out"),
    ("img_mlp.fc1", "ff.net.0.proj"),
    ("img_mlp.fc2", "ff.net.2"),
    ("txt_mlp.fc1", "ff_context.net.0.proj"),
    ("txt_mlp.fc2", "ff_context.net.2"),
)
_DOUBLE_QK_NORM = (
    ("img_attn_q_norm", "attn.norm_q"),
    ("img_attn_k_norm", "attn.norm_k"),
    ("txt_attn_q_norm", "attn.norm_added_q"),
    ("txt_attn_k_norm", "attn.norm_added_k"),
)
_SINGLE = (("linear2", "proj_out"), ("modulation.linear", "norm.linear"))
_SINGLE_QK_NORM = (("q_norm", "attn.norm_q"), ("k_norm", "attn.norm_k"))
_REFINER = (
    ("norm1", "norm1"),
    ("self_attn_proj", "attn.to_out.0"),
    ("norm2", "norm2"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
    ("adaLN_modulation.1", "norm_out.linear"),
)
_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
_REFINER_NATIVE = "txt_in.individual_token_refiner.blocks"
_REFINER_DIFFUSERS = "context_embedder.token_refiner.refiner_blocks"
_FINAL_MODULATION = "final_layer.adaLN_modulation.1"


@dataclass(frozen=True)
class HunyuanVideoLayout:
    """A HunyuanVideo transformer's sizes and structure, and the module map they imply.

    Attributes:
        hidden: the hidden size (rows of each of q, k, v in the fused projections).
        mlp: the MLP width (rows of ``proj_mlp`` in a single block's ``linear1``).
        layers: double-stream blocks; single_layers: single-stream blocks;
        refiner_layers: blocks of the text token refiner.
        qk_norm: attention has RMS norms on queries and keys.
        guidance: the model has the guidance embedding (``guidance_in``).
    """

    architecture: ClassVar[str] = "hunyuan-video"

    hidden: int
    mlp: int
    layers: int
    single_layers: int
    refiner_layers: int
    qk_norm: bool = True
    guidance: bool = True

    def _qkv(self, native: str, diffusers: str, names: tuple[str, str, str]) -> Iterator[Piece]:
        return stacked(native, [(f"{diffusers}.{name}", self.hidden) for name in names])

    def all_pieces(self) -> Iterator[Piece]:
        """Every piece of the map: fused projections, renames, the final modulation's halves."""
        renames = list(_EMBEDDINGS) + (list(_GUIDANCE) if self.guidance else [])
        for n in range(self.refiner_layers):
            native, diffusers = f"{_REFINER_NATIVE}.{n}", f"{_REFINER_DIFFUSERS}.{n}"
            renames += [(f"{native}.{a}", f"{diffusers}.{b}") for a, b in _REFINER]
            yield from self._qkv(f"{native}.self_attn_qkv", f"{diffusers}.attn", _QKV)
        for n in range(self.layers):
            native, diffusers = f"double_blocks.{n}", f"transformer_blocks.{n}"
            parts = _DOUBLE + (_DOUBLE_QK_NORM if self.qk_norm else ())
            renames += [(f"{native}.{a}", f"{diffusers}.{b}") for a, b in parts]
            yield from self._qkv(f"{native}.img_attn_qkv", f"{diffusers}.attn", _QKV)
            yield from self._qkv(f"{native}.txt_attn_qkv", f"{diffusers}.attn", _ADD_QKV)
        for n in range(self.single_layers):
            native, diffusers = f"single_blocks.{n}", f"single_transformer_blocks.{n}"
            parts = _SINGLE + (_SINGLE_QK_NORM if self.qk_norm else ())
            renames += [(f"{native}.{a}", f"{diffusers}.{b}") for a, b in parts]
            qkv = [(f"{diffusers}.attn.to_{c}", self.hidden) for c in "qkv"]
            yield from stacked(f"{native}.linear1", [*qkv, (f"{diffusers}.proj_mlp", self.mlp)])
        yield from (Piece(native, diffusers) for native, diffusers in renames)
        # native shift, scale; diffusers' AdaLayerNormContinuous scale, shift
        yield Piece(_FINAL_MODULATION, "norm_out.linear", 0, self.hidden, self.hidden)
        yield Piece(_FINAL_MODULATION, "norm_out.linear", self.hidden, 0, self.hidden)

    @cached_property
    def _table(self) -> PieceTable:
        return PieceTable(self.all_pieces())

    @property
    def pieces(self) -> tuple[Piece, ...]:
        """Every piece of the map."""
        return self._table.pieces

    def to_native(self, diffusers_path: str) -> tuple[Piece, ...]:
        """The pieces of native weights a diffusers module is (one, or two for the final
        modulation), or ()."""
        return self._table.to_native(diffusers_path)

    def to_diffusers(self, native_path: str) -> tuple[Piece, ...]:
        """The pieces of diffusers weights a native module is made of (row pieces for the
        fused projections), or ()."""
        return self._table.to_diffusers(native_path)


def _count(shapes: Shapes, pattern: str) -> int | None:
    """How many blocks have a key matching ``pattern`` (one group: the block number); None
    where the numbers are not 0..n-1."""
    found = re.compile(pattern)
    numbers = sorted(int(m.group(1)) for m in map(found.match, shapes) if m)
    return len(numbers) if numbers == list(range(len(numbers))) else None


def from_native(shapes: Shapes) -> HunyuanVideoLayout | None:
    """The layout of a native HunyuanVideo transformer from its tensors (file prefix removed,
    e.g. ``double_blocks.0.img_attn_qkv.weight``); None for another model, Flux included."""
    embed = shapes.get("img_in.proj.weight")
    if embed is None or len(embed) != 5:
        return None
    hidden = embed[0]
    layers = _count(shapes, r"^double_blocks\.(\d+)\.img_attn_qkv\.weight$")
    single = _count(shapes, r"^single_blocks\.(\d+)\.linear1\.weight$")
    refiner = _count(shapes, rf"^{re.escape(_REFINER_NATIVE)}\.(\d+)\.self_attn_qkv\.weight$")
    if layers is None or single is None or refiner is None or not (layers or single):
        return None
    widths = set()
    if layers:
        fc1 = shapes.get("double_blocks.0.img_mlp.fc1.weight")
        if fc1 is None or shapes["double_blocks.0.img_attn_qkv.weight"][0] != 3 * hidden:
            return None
        widths.add(fc1[0])
    if single:
        widths.add(shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden)
    if len(widths) != 1:
        return None
    return HunyuanVideoLayout(
        hidden=hidden,
        mlp=widths.pop(),
        layers=layers,
        single_layers=single,
        refiner_layers=refiner,
        qk_norm=bool(
            {"double_blocks.0.img_attn_q_norm.weight", "single_blocks.0.q_norm.weight"}
            & set(shapes)
        ),
        guidance="guidance_in.mlp.0.weight" in shapes,
    )


def from_diffusers(config: Mapping[str, Any], shapes: Shapes) -> HunyuanVideoLayout | None:
    """The layout of a diffusers ``HunyuanVideoTransformer3DModel`` folder from its
    ``config.json`` (defaults as the class has them)."""
    if config.get("_class_name") != "HunyuanVideoTransformer3DModel":
        return None
    hidden = config_value(config, "num_attention_heads", default=24) * config_value(
        config, "attention_head_dim", default=128
    )
    return HunyuanVideoLayout(
        hidden=hidden,
        mlp=int(hidden * config_value(config, "mlp_ratio", default=4.0)),
        layers=config_value(config, "num_layers", default=20),
        single_layers=config_value(config, "num_single_layers", default=40),
        refiner_layers=config_value(config, "num_refiner_layers", default=2),
        qk_norm=config.get("qk_norm", "rms_norm") is not None,
        guidance=bool(config_value(config, "guidance_embeds", default=True)),
    )


__all__ = ["HunyuanVideoLayout", "from_diffusers", "from_native"]
