"""The Stable Diffusion UNet (SD1.x, SD2.x, SDXL) in its two layouts, mapped module by module.

Original (LDM / SGM) single files number their blocks as one flat sequence; diffusers groups
them by resolution level. For ``n`` levels with ``L[k]`` layers each:

- ``input_blocks.0.0`` is ``conv_in``; then, per level ``d``, ``L[d]`` entries
  ``input_blocks.i.0`` (a resnet: ``down_blocks.d.resnets.j``) with ``input_blocks.i.1`` (its
  transformer: ``down_blocks.d.attentions.j``) where the level has attention, and, below every
  level but the last, one entry ``input_blocks.i.0.op`` (``down_blocks.d.downsamplers.0.conv``).
- ``middle_block.0`` / ``.1`` / ``.2``: ``mid_block.resnets.0``, ``mid_block.attentions.0``,
  ``mid_block.resnets.1``.
- per up block ``u`` (level ``n - 1 - u``), ``L + 1`` entries ``output_blocks.i.0`` (resnet),
  ``output_blocks.i.1`` (transformer, where the block has attention) and, on the block's last
  entry unless it is the last block, the upsampler ``output_blocks.i.{1|2}.conv``
  (``up_blocks.u.upsamplers.0.conv``).
- inside a resnet: ``in_layers.0`` / ``in_layers.2`` / ``out_layers.0`` / ``out_layers.3`` /
  ``emb_layers.1`` / ``skip_connection`` are ``norm1`` / ``conv1`` / ``norm2`` / ``conv2`` /
  ``time_emb_proj`` / ``conv_shortcut``; inside a transformer the names are the same.
- ``time_embed.0`` / ``.2``: ``time_embedding.linear_1`` / ``_2``; ``out.0`` / ``out.2``:
  ``conv_norm_out`` / ``conv_out``; ``label_emb.0.0`` / ``.0.2``: ``add_embedding`` (SDXL) or
  ``class_embedding`` ``.linear_1`` / ``_2``; an ``nn.Embedding`` ``label_emb``:
  ``class_embedding``.

These are the facts diffusers' ``convert_ldm_unet_checkpoint`` and ComfyUI's
``unet_to_diffusers`` encode. The structure comes from a diffusers config
(:meth:`UNetLayout.from_config`) or, for a single file that has none, from its own key names
(:meth:`UNetLayout.from_keys`); both give the same layout for the same model.

Example:
    >>> layout = UNetLayout.from_config({"layers_per_block": 2,
    ...     "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    ...     "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3})
    >>> layout.original_path("down_blocks.0.attentions.0.proj_in")
    'input_blocks.1.1.proj_in'
    >>> layout.diffusers_path("output_blocks.2.1.conv")
    'up_blocks.0.upsamplers.0.conv'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from lora_tools.layouts.base import Piece, Shapes

#: A resnet's layers: original name -> diffusers name.
RESNET_PARTS: tuple[tuple[str, str], ...] = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
)
#: Modules outside the blocks: original -> diffusers.
BASIC_PARTS: tuple[tuple[str, str], ...] = (
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
)
_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_MID_TYPES = {"UNetMidBlock2DCrossAttn": "attention", "UNetMidBlock2D": "resnets"}
_BLOCK_RE = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.([^.]+)")
_MIDDLE_RE = re.compile(r"^middle_block\.(\d+)\.([^.]+)")
#: Direct children that tell what an entry of a block is.
_RESNET_CHILD = "in_layers"
_ATTENTION_CHILDREN = {"proj_in", "transformer_blocks"}

#: leaf: the module itself; resnet: a resnet whose layers are renamed; block: a transformer,
#: whose sub-modules keep their names.
_LEAF, _RESNET, _BLOCK = "leaf", "resnet", "block"


@dataclass(frozen=True)
class Level:
    """One resolution level: its layer count and which of its two blocks have attention."""

    layers: int
    down_attention: bool
    up_attention: bool


@dataclass(frozen=True)
class UNetLayout:
    """A UNet's block structure, and the module map it implies.

    Attributes:
        levels: the resolution levels, highest resolution first (``down_blocks`` order).
        mid: ``"attention"`` (resnet, transformer, resnet), ``"resnets"`` (two resnets) or
            None (no middle block).
        label_emb: diffusers names the label embedding may have (``add_embedding``,
            ``class_embedding``); both where a single file does not say which.
    """

    levels: tuple[Level, ...]
    mid: str | None = "attention"
    label_emb: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout | None:
        """The layout of a diffusers ``UNet2DConditionModel`` config; None for block types
        outside the SD family (their original layout is not this one)."""
        down = list(config.get("down_block_types") or ())
        up = list(config.get("up_block_types") or ())
        mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if (
            not down
            or len(up) != len(down)
            or not all(t in _DOWN_TYPES for t in down)
            or not all(t in _UP_TYPES for t in up)
            or (mid_type is not None and mid_type not in _MID_TYPES)
        ):
            return None
        per_block = config.get("layers_per_block", 2)
        layers = [per_block] * len(down) if isinstance(per_block, int) else list(per_block)
        if len(layers) != len(down):
            return None
        n = len(down)
        levels = tuple(
            Level(layers[k], _DOWN_TYPES[down[k]], _UP_TYPES[up[n - 1 - k]]) for k in range(n)
        )
        label: list[str] = []
        if config.get("addition_embed_type") == "text_time":
            label.append("add_embedding")
        if config.get("class_embed_type") in ("timestep", "projection") or config.get(
            "num_class_embeds"
        ):
            label.append("class_embedding")
        return cls(levels, _MID_TYPES[mid_type] if mid_type else None, tuple(label))

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> UNetLayout | None:
        """The layout an original-layout UNet's own tensor names (without the file's prefix,
        e.g. ``input_blocks.1.1.proj_in.weight``) show; None where they are not one.

        Each entry of a block is told apart by its children (a resnet has ``in_layers``, a
        transformer ``proj_in`` / ``transformer_blocks``, a down/upsampler only ``op`` /
        ``conv``); the levels are where the downsamplers are, and the output blocks must
        mirror them (``L + 1`` entries per level, upsamplers where diffusers has them).
        """
        children: dict[tuple[str, int], dict[int, set[str]]] = {}
        label: set[str] = set()
        for key in keys:
            found = _BLOCK_RE.match(key)
            if found:
                block, i, sub, child = found.groups()
                children.setdefault((block, int(i)), {}).setdefault(int(sub), set()).add(child)
                continue
            mid = _MIDDLE_RE.match(key)
            if mid:
                children.setdefault(("middle_block", 0), {}).setdefault(
                    int(mid.group(1)), set()
                ).add(mid.group(2))
            elif key.startswith("label_emb.0.0."):
                label.update(("add_embedding", "class_embedding"))
            elif key.startswith("label_emb.") and key.count(".") == 1:
                label.add("class_embedding")
        inputs = _entries(children, "input_blocks")
        outputs = _entries(children, "output_blocks")
        if inputs is None or outputs is None or not inputs or inputs[0] != ["other"]:
            return None
        levels = _down_levels(inputs[1:])
        up = _up_groups(outputs)
        if levels is None or up is None or len(up) != len(levels):
            return None
        n = len(levels)
        mirrored = []
        for k, (layers, down_attention) in enumerate(levels):
            entries, up_attention = up[n - 1 - k]
            if entries != layers + 1:
                return None
            mirrored.append(Level(layers, down_attention, up_attention))
        mid_entries = children.get(("middle_block", 0))
        mid = _mid_kind(mid_entries) if mid_entries else None
        if mid_entries and mid is None:
            return None
        return cls(tuple(mirrored), mid, tuple(sorted(label)))

    def entries(self) -> Iterator[tuple[str, str, str]]:
        """``(original path, diffusers path, kind)`` for every module or block of the map."""
        yield from ((o, d, _LEAF) for o, d in BASIC_PARTS)
        for name in self.label_emb:
            yield "label_emb.0.0", f"{name}.linear_1", _LEAF
            yield "label_emb.0.2", f"{name}.linear_2", _LEAF
        if "class_embedding" in self.label_emb:
            yield "label_emb", "class_embedding", _LEAF
        i = 1
        for d, level in enumerate(self.levels):
            for j in range(level.layers):
                yield f"input_blocks.{i}.0", f"down_blocks.{d}.resnets.{j}", _RESNET
                if level.down_attention:
                    yield f"input_blocks.{i}.1", f"down_blocks.{d}.attentions.{j}", _BLOCK
                i += 1
            if d < len(self.levels) - 1:
                yield f"input_blocks.{i}.0.op", f"down_blocks.{d}.downsamplers.0.conv", _LEAF
                i += 1
        if self.mid is not None:
            yield "middle_block.0", "mid_block.resnets.0", _RESNET
            if self.mid == "attention":
                yield "middle_block.1", "mid_block.attentions.0", _BLOCK
                yield "middle_block.2", "mid_block.resnets.1", _RESNET
            else:
                yield "middle_block.1", "mid_block.resnets.1", _RESNET
        i = 0
        for u, level in enumerate(reversed(self.levels)):
            for j in range(level.layers + 1):
                yield f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{j}", _RESNET
                if level.up_attention:
                    yield f"output_blocks.{i}.1", f"up_blocks.{u}.attentions.{j}", _BLOCK
                if j == level.layers and u < len(self.levels) - 1:
                    sub = 2 if level.up_attention else 1
                    yield f"output_blocks.{i}.{sub}.conv", f"up_blocks.{u}.upsamplers.0.conv", _LEAF
                i += 1

    @cached_property
    def _to_diffusers(self) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        for original, diffusers, kind in self.entries():
            out.setdefault(original, (diffusers, kind))
        return out

    @cached_property
    def _to_original(self) -> dict[str, tuple[str, str]]:
        return {d: (o, kind) for o, d, kind in self.entries()}

    def diffusers_path(self, path: str) -> str | None:
        """The diffusers module path of an original one; None where the map has none (the
        first of the two names where the label embedding's is not known)."""
        return _translate(path, self._to_diffusers, dict(RESNET_PARTS))

    def original_path(self, path: str) -> str | None:
        """The original module path of a diffusers one; None where the map has none."""
        return _translate(path, self._to_original, {d: o for o, d in RESNET_PARTS})

    def diffusers_paths(self, path: str) -> list[str]:
        """Every diffusers path an original module may be named by (two for a label
        embedding of unknown kind, else at most one)."""
        if path.startswith("label_emb.0.") and len(self.label_emb) > 1:
            return [d for o, d, _ in self.entries() if o == path]
        found = self.diffusers_path(path)
        return [found] if found is not None else []

    def to_native(self, diffusers_path: str) -> tuple[Piece, ...]:
        """The :class:`~lora_tools.layouts.base.Layout` lookup: one whole weight, or none."""
        found = self.original_path(diffusers_path)
        return () if found is None else (Piece(found, diffusers_path),)

    def to_diffusers(self, native_path: str) -> tuple[Piece, ...]:
        """The :class:`~lora_tools.layouts.base.Layout` lookup: whole weights (two candidates
        for a label embedding of unknown kind)."""
        return tuple(Piece(native_path, d) for d in self.diffusers_paths(native_path))

    @property
    def architecture(self) -> str:
        """``sdxl`` for a UNet with SDXL's text-time embedding (a single file's ``label_emb.0``
        may be it), else ``sd``."""
        return "sdxl" if "add_embedding" in self.label_emb else "sd"


def from_native(shapes: Shapes) -> UNetLayout | None:
    """The layout of an original-layout UNet from its tensors (file prefix removed)."""
    if not any(key.startswith("input_blocks.") for key in shapes):
        return None
    return UNetLayout.from_keys(shapes)


def from_diffusers(config: Mapping[str, Any], shapes: Shapes) -> UNetLayout | None:
    """The layout of a diffusers ``UNet2DConditionModel`` folder."""
    if config.get("_class_name") != "UNet2DConditionModel":
        return None
    return UNetLayout.from_config(config)


def _translate(path: str, table: dict[str, tuple[str, str]], resnet: dict[str, str]) -> str | None:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        hit = table.get(".".join(parts[:cut]))
        if hit is None:
            continue
        target, kind = hit
        rest = ".".join(parts[cut:])
        if kind == _LEAF:
            return target if not rest else None
        if kind == _RESNET:
            return f"{target}.{resnet[rest]}" if rest in resnet else None
        return f"{target}.{rest}" if rest else target
    return None


def _kind(children: set[str]) -> str:
    if "op" in children:
        return "down"
    if children == {"conv"}:
        return "up"
    if _RESNET_CHILD in children:
        return "resnet"
    if children & _ATTENTION_CHILDREN:
        return "attention"
    return "other"


def _entries(
    children: dict[tuple[str, int], dict[int, set[str]]], block: str
) -> list[list[str]] | None:
    """The kinds of each numbered entry of ``block``, in order; None if numbers are missing."""
    numbers = sorted(i for b, i in children if b == block)
    if numbers != list(range(len(numbers))):
        return None
    out = []
    for i in numbers:
        subs = children[(block, i)]
        if sorted(subs) != list(range(len(subs))):
            return None
        out.append([_kind(subs[s]) for s in sorted(subs)])
    return out


def _down_levels(entries: list[list[str]]) -> list[tuple[int, bool]] | None:
    """``(layers, attention)`` per level from the input blocks after ``conv_in``."""
    levels: list[tuple[int, bool]] = []
    flags: list[bool] = []
    for entry in entries:
        if entry == ["down"]:
            if not flags or len(set(flags)) > 1:
                return None
            levels.append((len(flags), flags[0]))
            flags = []
        elif entry in (["resnet"], ["resnet", "attention"]):
            flags.append(len(entry) == 2)
        else:
            return None
    if not flags or len(set(flags)) > 1:
        return None
    levels.append((len(flags), flags[0]))
    return levels


def _up_groups(entries: list[list[str]]) -> list[tuple[int, bool]] | None:
    """``(entries, attention)`` per up block; an upsampler closes its block."""
    groups: list[tuple[int, bool]] = []
    flags: list[bool] = []
    for entry in entries:
        closes = entry[-1:] == ["up"]
        body = entry[:-1] if closes else entry
        if body not in (["resnet"], ["resnet", "attention"]):
            return None
        flags.append(len(body) == 2)
        if closes:
            if len(set(flags)) > 1:
                return None
            groups.append((len(flags), flags[0]))
            flags = []
    if not flags or len(set(flags)) > 1:
        return None
    groups.append((len(flags), flags[0]))
    return groups


def _mid_kind(entries: dict[int, set[str]]) -> str | None:
    kinds = [_kind(entries[i]) for i in sorted(entries)]
    if kinds == ["resnet", "attention", "resnet"]:
        return "attention"
    if kinds == ["resnet", "resnet"]:
        return "resnets"
    return None


__all__ = ["BASIC_PARTS", "RESNET_PARTS", "Level", "UNetLayout", "from_diffusers", "from_native"]
