"""Flux.1 (dev, schnell, Kontext, Fill, Depth) and Chroma in their two layouts, piece by piece.

The native layout is Black Forest Labs' (``flux1-dev.safetensors``; Chroma's own files follow
it); diffusers' is ``FluxTransformer2DModel`` / ``ChromaTransformer2DModel``. With ``H`` the
hidden size (heads x head dim) and ``M`` the single blocks' MLP width (``4 H``):

- ``double_blocks.N`` is ``transformer_blocks.N``: ``img_attn.qkv`` stacks ``attn.to_q``,
  ``to_k``, ``to_v`` (``H`` rows each), ``txt_attn.qkv`` stacks ``add_q_proj``, ``add_k_proj``,
  ``add_v_proj``; ``img_attn.proj`` / ``txt_attn.proj`` are ``attn.to_out.0`` /
  ``attn.to_add_out``; ``img_mlp.0`` / ``.2`` are ``ff.net.0.proj`` / ``ff.net.2`` (``txt_mlp``:
  ``ff_context``); ``img_mod.lin`` / ``txt_mod.lin`` are ``norm1.linear`` /
  ``norm1_context.linear``; the RMS norms ``img_attn.norm.query_norm`` / ``key_norm`` (tensor
  ``.scale``) are ``attn.norm_q`` / ``norm_k`` (``txt_attn``: ``norm_added_q`` / ``_k``).
- ``single_blocks.N`` is ``single_transformer_blocks.N``: ``linear1`` stacks ``attn.to_q``,
  ``to_k``, ``to_v`` (``H`` rows each) and ``proj_mlp`` (``M`` rows); ``linear2`` is
  ``proj_out``; ``modulation.lin`` is ``norm.linear``; ``norm.query_norm`` / ``key_norm`` are
  ``attn.norm_q`` / ``norm_k``.
- ``img_in`` / ``txt_in`` / ``final_layer.linear`` are ``x_embedder`` / ``context_embedder`` /
  ``proj_out``; ``time_in``, ``vector_in`` and (dev, Kontext, Fill, Depth: not schnell)
  ``guidance_in`` ``.in_layer`` / ``.out_layer`` are ``time_text_embed.timestep_embedder``,
  ``text_embedder``, ``guidance_embedder`` ``.linear_1`` / ``.linear_2``.
- ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with its halves swapped: native
  rows are (shift, scale), diffusers rows (scale, shift).

Chroma is Flux without the per-block and final modulations, without ``time_in`` /
``vector_in`` / ``guidance_in``, and with ``distilled_guidance_layer`` (``in_proj``,
``out_proj``, ``layers.N.in_layer`` / ``out_layer`` as ``layers.N.linear_1`` / ``linear_2``,
``norms.N`` with tensor ``.scale``), named alike in both layouts.

These are the facts diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` and
``convert_chroma_transformer_checkpoint_to_diffusers`` encode (ComfyUI's ``flux_to_diffusers``
agrees). The dimensions come from the native tensors (:func:`from_native`) or from a diffusers
config (:func:`from_diffusers`); both give the same layout for the same model.

Example:
    >>> layout = FluxLayout("flux", hidden=8, mlp=32, double=1, single=1)
    >>> [(p.diffusers, p.native_rows) for p in layout.to_diffusers("single_blocks.0.linear1")]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('single_transformer_blocks.0.attn.to_q', (0, 8)),
     ('single_transformer_blocks.0.attn.to_k', (8, 16)),
     ('single_transformer_blocks.0.attn.to_v', (16, 24)),
     ('single_transformer_blocks.0.proj_mlp', (24, 56))]
    >>> [(p.native_rows, p.diffusers_rows) for p in layout.to_native("norm_out.linear")]
    [((0, 8), (8, 16)), ((8, 16), (0, 8))]
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from lora_tools.layouts.base import Piece, PieceTable, Shapes, config_value, stacked

FLUX, CHROMA = "flux", "chroma"
#: diffusers model class -> architecture.
CLASSES = {"FluxTransformer2DModel": FLUX, "ChromaTransformer2DModel": CHROMA}
#: diffusers' Flux and Chroma blocks fix the MLP ratio at 4.
MLP_RATIO = 4.0
#: RMS norms store their weight as ``<module>.scale`` in the native layout.
SCALE = ".scale"

#: Whole modules of a double block: native -> diffusers (both under the block's prefix).
DOUBLE_PARTS: tuple[tuple[str, str], ...] = (
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
)
DOUBLE_NORMS: tuple[tuple[str, str], ...] = (
    ("img_attn.norm.query_norm", "attn.norm_q"),
    ("img_attn.norm.key_norm", "attn.norm_k"),
    ("txt_attn.norm.query_norm", "attn.norm_added_q"),
    ("txt_attn.norm.key_norm", "attn.norm_added_k"),
)
#: ``txt_attn.qkv`` stacks these (``img_attn.qkv``: ``to_q``, ``to_k``, ``to_v``).
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
DOUBLE_MODULATION: tuple[tuple[str, str], ...] = (
    ("img_mod.lin", "norm1.linear"),
    ("txt_mod.lin", "norm1_context.linear"),
)
SINGLE_NORMS: tuple[tuple[str, str], ...] = (
    ("norm.query_norm", "attn.norm_q"),
    ("norm.key_norm", "attn.norm_k"),
)
#: Embedders of Flux's time / pooled text / guidance vectors: native -> diffusers prefix.
EMBEDDERS: tuple[tuple[str, str], ...] = (
    ("time_in", "time_text_embed.timestep_embedder"),
    ("vector_in", "time_text_embed.text_embedder"),
)
GUIDANCE = ("guidance_in", "time_text_embed.guidance_embedder")
BASIC_PARTS: tuple[tuple[str, str], ...] = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("final_layer.linear", "proj_out"),
)
APPROXIMATOR = "distilled_guidance_layer"

_BLOCK_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")
_APPROXIMATOR_RE = re.compile(rf"^{APPROXIMATOR}\.layers\.(\d+)\.")


@dataclass(frozen=True)
class FluxLayout:
    """A Flux-family transformer's dimensions, and the module map they imply.

    Attributes:
        architecture: ``flux`` or ``chroma``.
        hidden: the hidden size ``H`` (rows of each of q, k, v).
        mlp: the single blocks' MLP width (rows of ``proj_mlp`` in ``linear1``).
        double: the number of double (joint) blocks.
        single: the number of single blocks.
        guidance: Flux with ``guidance_in`` (dev, Kontext, Fill, Depth; not schnell).
        approximator: Chroma's ``distilled_guidance_layer`` layer count.
    """

    architecture: str
    hidden: int
    mlp: int
    double: int
    single: int
    guidance: bool = False
    approximator: int = 0

    def pieces(self) -> Iterator[Piece]:
        """Every piece of the map, module by module."""
        h = self.hidden
        flux = self.architecture == FLUX
        for native, diffusers in BASIC_PARTS:
            yield Piece(native, diffusers)
        if flux:
            embedders = EMBEDDERS + ((GUIDANCE,) if self.guidance else ())
            for native, diffusers in embedders:
                yield Piece(f"{native}.in_layer", f"{diffusers}.linear_1")
                yield Piece(f"{native}.out_layer", f"{diffusers}.linear_2")
            final = "final_layer.adaLN_modulation.1"
            yield Piece(final, "norm_out.linear", 0, h, h)
            yield Piece(final, "norm_out.linear", h, 0, h)
        else:
            for native in ("in_proj", "out_proj"):
                yield Piece(f"{APPROXIMATOR}.{native}", f"{APPROXIMATOR}.{native}")
            for i in range(self.approximator):
                layer = f"{APPROXIMATOR}.layers.{i}"
                yield Piece(f"{layer}.in_layer", f"{layer}.linear_1")
                yield Piece(f"{layer}.out_layer", f"{layer}.linear_2")
                norm = f"{APPROXIMATOR}.norms.{i}"
                yield Piece(norm, norm, native_suffix=SCALE)
        for i in range(self.double):
            native, diffusers = f"double_blocks.{i}", f"transformer_blocks.{i}"
            for img, parts in (("img", ("to_q", "to_k", "to_v")), ("txt", ADDED_QKV)):
                yield from stacked(
                    f"{native}.{img}_attn.qkv", [(f"{diffusers}.attn.{p}", h) for p in parts]
                )
            yield from _renamed(native, diffusers, DOUBLE_PARTS)
            yield from _renamed(native, diffusers, DOUBLE_NORMS, SCALE)
            if flux:
                yield from _renamed(native, diffusers, DOUBLE_MODULATION)
        for i in range(self.single):
            native, diffusers = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
            parts = [(f"{diffusers}.attn.to_{c}", h) for c in "qkv"]
            yield from stacked(f"{native}.linear1", [*parts, (f"{diffusers}.proj_mlp", self.mlp)])
            yield Piece(f"{native}.linear2", f"{diffusers}.proj_out")
            yield from _renamed(native, diffusers, SINGLE_NORMS, SCALE)
            if flux:
                yield Piece(f"{native}.modulation.lin", f"{diffusers}.norm.linear")

    @cached_property
    def table(self) -> PieceTable:
        """The pieces, indexed by either name."""
        return PieceTable(self.pieces())

    def to_native(self, diffusers_path: str) -> tuple[Piece, ...]:
        """The :class:`~lora_tools.layouts.base.Layout` lookup by diffusers module path."""
        return self.table.to_native(diffusers_path)

    def to_diffusers(self, native_path: str) -> tuple[Piece, ...]:
        """The :class:`~lora_tools.layouts.base.Layout` lookup by native module path."""
        return self.table.to_diffusers(native_path)


def _renamed(
    native: str, diffusers: str, parts: tuple[tuple[str, str], ...], suffix: str = ".weight"
) -> Iterator[Piece]:
    for n, d in parts:
        yield Piece(f"{native}.{n}", f"{diffusers}.{d}", native_suffix=suffix)


def _rows(shapes: Shapes, module: str) -> int | None:
    """Output rows of a module: from its bias where there is one (quantized files, e.g.
    bitsandbytes NF4, pack the weight into another shape but keep biases), else its weight."""
    for key in (f"{module}.bias", f"{module}.weight"):
        shape = shapes.get(key)
        if shape:
            return int(shape[0])
    return None


def _count(indices: set[int]) -> int | None:
    """The count of numbered entries ``0 .. n-1``; None where numbers are missing or none."""
    if not indices or indices != set(range(len(indices))):
        return None
    return len(indices)


def _complete(layout: FluxLayout, keys: Shapes, native: bool) -> FluxLayout | None:
    """The layout, if every weight of its map is among ``keys``."""
    for piece in layout.table:
        key = piece.native_key if native else f"{piece.diffusers}.weight"
        if key not in keys:
            return None
    return layout


def from_native(shapes: Shapes) -> FluxLayout | None:
    """The layout of a BFL-layout Flux or Chroma transformer from its tensors (file prefix
    removed); None for anything else.

    Flux has the per-block modulations (``double_blocks.N.img_mod.lin``) and no
    ``distilled_guidance_layer``; Chroma the reverse. Every weight the map names must be there.
    """
    blocks: dict[str, set[int]] = {"double_blocks": set(), "single_blocks": set()}
    layers: set[int] = set()
    for key in shapes:
        found = _BLOCK_RE.match(key)
        if found:
            blocks[found.group(1)].add(int(found.group(2)))
        elif (layer := _APPROXIMATOR_RE.match(key)) is not None:
            layers.add(int(layer.group(1)))
    double, single = _count(blocks["double_blocks"]), _count(blocks["single_blocks"])
    hidden = _rows(shapes, "img_in")
    if double is None or single is None or hidden is None:
        return None
    if _rows(shapes, "double_blocks.0.img_attn.qkv") != 3 * hidden:
        return None
    linear1 = _rows(shapes, "single_blocks.0.linear1")
    if linear1 is None or linear1 <= 3 * hidden:
        return None
    modulated = "double_blocks.0.img_mod.lin.weight" in shapes
    distilled = f"{APPROXIMATOR}.in_proj.weight" in shapes
    if modulated and not distilled:
        guidance = "guidance_in.in_layer.weight" in shapes
        layout = FluxLayout(FLUX, hidden, linear1 - 3 * hidden, double, single, guidance)
    elif distilled and not modulated:
        approximator = _count(layers)
        if approximator is None:
            return None
        layout = FluxLayout(
            CHROMA, hidden, linear1 - 3 * hidden, double, single, approximator=approximator
        )
    else:
        return None
    return _complete(layout, shapes, native=True)


def from_diffusers(config: Mapping[str, Any], shapes: Shapes) -> FluxLayout | None:
    """The layout of a diffusers ``FluxTransformer2DModel`` / ``ChromaTransformer2DModel``
    folder; None for another class, or for tensors (where given) that lack a weight of the map.

    Missing config fields take the class's defaults, as diffusers does when it loads the
    folder; the MLP width is the tensors' where they are given.
    """
    architecture = CLASSES.get(config.get("_class_name", ""))
    if architecture is None:
        return None
    heads = config_value(config, "num_attention_heads", default=24)
    hidden = heads * config_value(config, "attention_head_dim", default=128)
    mlp = _rows(shapes, "single_transformer_blocks.0.proj_mlp") or int(hidden * MLP_RATIO)
    double = config_value(config, "num_layers", default=19)
    single = config_value(config, "num_single_layers", default=38)
    if architecture == FLUX:
        guidance = bool(config_value(config, "guidance_embeds", default=False))
        layout = FluxLayout(FLUX, hidden, mlp, double, single, guidance)
    else:
        approximator = config_value(config, "approximator_layers", default=5)
        layout = FluxLayout(CHROMA, hidden, mlp, double, single, approximator=approximator)
    if not shapes:
        return layout
    if _rows(shapes, "x_embedder") != hidden:
        return None
    return _complete(layout, shapes, native=False)


__all__ = [
    "CHROMA",
    "CLASSES",
    "FLUX",
    "FluxLayout",
    "from_diffusers",
    "from_native",
]
