"""The OpenCLIP text encoder in its two layouts: SD2.x's text encoder (single files:
``cond_stage_model.model.``) and SDXL's second one (``conditioner.embedders.1.model.``), against
transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` as diffusers saves them.

Per residual block ``N`` (``transformer.resblocks.N`` <-> ``text_model.encoder.layers.N``):

- ``attn.in_proj_weight`` (and ``attn.in_proj_bias``) stacks ``self_attn.q_proj``, ``k_proj``
  and ``v_proj`` by rows, ``width`` rows each: three pieces of one native weight.
- ``attn.out_proj`` / ``ln_1`` / ``ln_2`` / ``mlp.c_fc`` / ``mlp.c_proj`` are
  ``self_attn.out_proj`` / ``layer_norm1`` / ``layer_norm2`` / ``mlp.fc1`` / ``mlp.fc2``.

transformers 5 saves a ``CLIPTextModel`` without the ``text_model.`` level (its modules are
``encoder.layers.N...``; ``CLIPTextModelWithProjection`` keeps it), and PEFT names LoRA modules
after the model in memory: a layout has the folder's spelling (``prefix``), and
:meth:`OpenClipLayout.to_native` takes either.

Outside the blocks ``token_embedding`` is ``text_model.embeddings.token_embedding`` and
``ln_final`` is ``text_model.final_layer_norm``. Two tensors are left out, because a
:class:`~lora_tools.layouts.base.Piece` cannot say what relates them: ``text_projection`` is
stored transposed (OpenCLIP computes ``x @ P``; transformers' ``text_projection`` is a Linear
whose weight is ``P.T``), and ``positional_embedding`` is a bare parameter (no module to name;
it equals ``text_model.embeddings.position_embedding.weight``). ``logit_scale`` has no
counterpart.

Diffusers' SD2 text encoder stops one block early: ``convert_open_clip_checkpoint`` drops
``resblocks.23`` of SD2's 24 (its config has 23 hidden layers, the penultimate-layer output
SD2 was trained on). A layout from a diffusers config therefore maps only the blocks the
config has; a layout from native tensors maps every block they hold.

These are the facts diffusers' ``convert_open_clip_checkpoint`` and ComfyUI's
``clip_text_transformers_convert`` encode.

Example:
    >>> layout = OpenClipLayout(width=8, layers=2)
    >>> pieces = layout.to_diffusers("transformer.resblocks.1.attn.in_proj")
    >>> [p.diffusers.rsplit(".", 1)[1] for p in pieces], pieces[2].native_rows
    (['q_proj', 'k_proj', 'v_proj'], (16, 24))
    >>> layout.to_native("text_model.final_layer_norm")[0].native_key
    'ln_final.weight'
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from lora_tools.layouts.base import Piece, PieceTable, Shapes, config_value, stacked

#: Whole modules of a residual block: native name -> transformers name.
BLOCK_PARTS: tuple[tuple[str, str], ...] = (
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)
#: Whole modules outside the blocks.
BASIC_PARTS: tuple[tuple[str, str], ...] = (
    ("token_embedding", "embeddings.token_embedding"),
    ("ln_final", "final_layer_norm"),
)
#: Native tensors the map leaves out (see the module docstring).
UNMAPPED = ("text_projection", "positional_embedding", "logit_scale")
#: The level transformers puts the text transformer under (diffusers' converter writes it).
TEXT_MODEL = "text_model."
#: transformers classes whose folders this layout describes.
CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")

_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$")


@dataclass(frozen=True)
class OpenClipLayout:
    """An OpenCLIP text transformer of ``layers`` blocks of ``width`` channels; ``prefix``:
    ``text_model.`` or ``""``, how the diffusers side spells its modules."""

    width: int
    layers: int
    prefix: str = TEXT_MODEL

    architecture = "open-clip"

    @cached_property
    def table(self) -> PieceTable:
        return PieceTable(self._pieces())

    def _pieces(self) -> Iterator[Piece]:
        for n in range(self.layers):
            native, diffusers = f"transformer.resblocks.{n}", f"{self.prefix}encoder.layers.{n}"
            yield from stacked(
                f"{native}.attn.in_proj",
                [(f"{diffusers}.self_attn.{c}_proj", self.width) for c in "qkv"],
                native_suffix="_weight",
            )
            for ours, theirs in BLOCK_PARTS:
                yield Piece(f"{native}.{ours}", f"{diffusers}.{theirs}")
        for ours, theirs in BASIC_PARTS:
            yield Piece(ours, self.prefix + theirs)

    def to_native(self, diffusers_path: str) -> tuple[Piece, ...]:
        """The native pieces of a transformers module path (q / k / v: one piece each), with
        or without the ``text_model.`` level."""
        found = self.table.to_native(diffusers_path)
        if found:
            return found
        if self.prefix:
            other = self.prefix + diffusers_path
        elif diffusers_path.startswith(TEXT_MODEL):
            other = diffusers_path.removeprefix(TEXT_MODEL)
        else:
            return ()
        return tuple(replace(p, diffusers=diffusers_path) for p in self.table.to_native(other))

    def to_diffusers(self, native_path: str) -> tuple[Piece, ...]:
        """The transformers pieces of a native module path (``attn.in_proj``: three)."""
        return self.table.to_diffusers(native_path)


def from_native(shapes: Shapes) -> OpenClipLayout | None:
    """The layout of a native OpenCLIP text transformer from its tensors (file prefix
    removed): blocks ``0 .. L-1`` with an ``attn.in_proj_weight`` of ``[3 * width, width]``."""
    widths: dict[int, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        m = _IN_PROJ.match(key)
        if m:
            widths[int(m.group(1))] = tuple(shape)
    if not widths or sorted(widths) != list(range(len(widths))):
        return None
    found = set(widths.values())
    if len(found) != 1:
        return None
    shape = found.pop()
    if len(shape) != 2 or shape[0] != 3 * shape[1]:
        return None
    return OpenClipLayout(width=shape[1], layers=len(widths))


def from_diffusers(config: Mapping[str, Any], shapes: Shapes) -> OpenClipLayout | None:
    """The layout of a diffusers text encoder folder holding an OpenCLIP model: a transformers
    ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` config with ``hidden_act: gelu``
    (OpenAI's CLIP-L, SD1's and SDXL's first text encoder, uses ``quick_gelu`` and its single
    files keep the transformers names). ``shapes``, the folder's tensors, tell whether its
    modules sit under ``text_model.``; without them they do."""
    classes = config.get("architectures") or [config.get("_class_name")]
    if not any(c in CLASSES for c in classes) or config.get("hidden_act") != "gelu":
        return None
    width = config_value(config, "hidden_size")
    layers = config_value(config, "num_hidden_layers")
    if not isinstance(width, int) or not isinstance(layers, int):
        return None
    bare = shapes and not any(key.startswith(TEXT_MODEL) for key in shapes)
    return OpenClipLayout(width=width, layers=layers, prefix="" if bare else TEXT_MODEL)


__all__ = [
    "BASIC_PARTS",
    "BLOCK_PARTS",
    "CLASSES",
    "TEXT_MODEL",
    "UNMAPPED",
    "OpenClipLayout",
    "from_diffusers",
    "from_native",
]
