"""Re-lay an adapter's modules from one checkpoint layout into the other, exactly.

A model's native layout and its diffusers layout name modules differently and sometimes group
them differently (:mod:`lora_tools.layouts`). Moving a LoRA across is exact on the factors:

- **Rename**: a module that is a whole weight in both layouts keeps its tensors.
- **Split** (native -> diffusers): a native fused module (``qkv`` with ``B [3h, r]``,
  ``A [r, h]``) becomes one module per diffusers weight with the same ``A`` and the rows of
  ``B`` that weight holds (``B_q = B[0:h]``...), rank and alpha unchanged, so
  ``B_q @ A`` is row for row ``B @ A``. Rank columns of ``B_q`` that are all zero are dropped
  with their rows of ``A`` (a fused module made by :func:`fuse` splits back into exactly its
  parts), alpha scaled to keep ``alpha / r``. A part whose rows of ``B`` are all zero (the
  ``to_k`` of a fused module trained on ``to_q`` alone) updates nothing and is left out, unless
  every part is (an untrained module stays one, for ``validate`` to report).
- **Fuse** (diffusers -> native): the diffusers modules of one native weight become one module
  with ``A`` stacked (``[r_q + r_k + r_v, h]``) and ``B`` block-diagonal (``B_q`` in rows
  ``0:h`` and columns ``0:r_q``...), rank the sum, alpha ``s * rank`` for the parts' common
  scale ``s``. Rows of a part the adapter does not train stay zero: their update is zero, as it
  was. Parts with different scales, DoRA parts and conv parts are refused (no exact fused
  factors exist in kohya's one-alpha-per-module naming).

The DoRA magnitude, ``lora_B.bias`` and a ``.diff_b`` are per output row: a split takes their
rows with ``B``'s.

Example:
    >>> from lora_tools.layouts.base import PieceTable, stacked
    >>> table = PieceTable(stacked("qkv", [("to_q", 2), ("to_k", 2), ("to_v", 2)]))
    >>> table.to_diffusers("qkv")[1].diffusers
    'to_k'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from lora_tools.adapter import CONV, LoraModule
from lora_tools.errors import UnsupportedAdapterError
from lora_tools.io.safetensors import ArrayTensor, Tensor
from lora_tools.layouts.base import Layout, Piece, tiles

#: Denoiser components: a kohya ``lora_unet_`` module may be an SD UNet or a DiT transformer.
DENOISERS = ("unet", "transformer")
#: Architectures whose kohya (sd-scripts) LoRAs use the diffusers / transformers module names
#: (SD1.x / SD2.x UNets, text encoders); every other architecture's kohya-style trainers use
#: native names (sd-scripts SDXL: SGM ``input_blocks``; sd-scripts Flux / SD3 and musubi-tuner:
#: BFL / MMDiT / Wan / HunyuanVideo names).
KOHYA_DIFFUSERS_NAMED = ("sd", "open-clip")


def layout_for(layouts: dict[str, Layout], component: str | None) -> Layout | None:
    """The layout of a module's component (denoisers under either name)."""
    if component in DENOISERS:
        return next((layouts[c] for c in DENOISERS if c in layouts), None)
    return layouts.get(component or "")


def target_side(to: str, layout: Layout) -> str:
    """``diffusers`` or ``native``: the names the ``to`` format's consumers look up. ComfyUI
    looks denoisers up by the checkpoint's own names, text encoders by transformers'."""
    if to == "kohya" and layout.architecture not in KOHYA_DIFFUSERS_NAMED:
        return "native"
    if to == "comfyui" and layout.architecture != "open-clip":
        return "native"
    return "diffusers"


def diffusers_component(component: str | None, layout: Layout) -> str | None:
    """The diffusers pipeline component a denoiser module belongs to under this layout."""
    if component not in DENOISERS:
        return component
    return "unet" if layout.architecture in ("sd", "sdxl") else "transformer"


def relayout(
    modules: dict[str, LoraModule],
    layouts: dict[str, Layout],
    to: str,
    refuse: Callable[[str], UnsupportedAdapterError],
) -> tuple[dict[str, LoraModule], int]:
    """``modules`` laid out for the ``to`` format, and how many modules were split or fused.

    Args:
        modules: the adapter's modules, with their component and dotted path known.
        layouts: the base checkpoint's layouts by logical component
            (:func:`lora_tools.resolve.checkpoint_layouts`).
        to: the target format (``peft``, ``diffusers``, ``kohya``).
        refuse: builds the error for a module that cannot be moved exactly.
    """
    out: dict[str, LoraModule] = {}
    changed = 0
    fuse_groups: dict[tuple[str | None, str], list[tuple[LoraModule, tuple[Piece, ...]]]] = {}
    for key, m in modules.items():
        layout = layout_for(layouts, m.component)
        if layout is None or m.path is None:
            out[key] = m
            continue
        as_native = layout.to_diffusers(m.path)
        as_diffusers = layout.to_native(m.path)
        side = target_side(to, layout)
        if side == "diffusers" and as_native and not as_diffusers:
            component = diffusers_component(m.component, layout)
            for new in split(m, as_native, refuse):
                new.component = component
                out[f"{component}.{new.path}"] = new
            changed += len(as_native) > 1 or not as_native[0].whole
        elif side == "native" and as_diffusers and not as_native:
            native = {p.native for p in as_diffusers}
            if len(native) != 1:
                raise refuse(f"module {m.key!r} lies in {len(native)} native weights")
            fuse_groups.setdefault((m.component, native.pop()), []).append((m, as_diffusers))
        else:
            out[key] = m
    for (component, native), members in fuse_groups.items():
        layout = layout_for(layouts, component)
        assert layout is not None
        fused = fuse(native, members, layout.to_diffusers(native), refuse)
        out[f"{component}.{native}"] = fused
        changed += len(members) > 1 or not members[0][1][0].whole
    return out, changed


def _rows(tensor: Tensor | None, pieces: list[tuple[int, int, int]], total: int) -> np.ndarray:
    """A ``[total, ...]`` array whose rows ``dst : dst + n`` are rows ``src : src + n`` of
    ``tensor`` for each ``(dst, src, n)``; the other rows zero."""
    assert tensor is not None
    values = tensor.numpy()
    out = np.zeros((total, *values.shape[1:]), values.dtype)
    for dst, src, n in pieces:
        out[dst : dst + n] = values[src : src + n]
    return out


def split(
    m: LoraModule, pieces: tuple[Piece, ...], refuse: Callable[[str], UnsupportedAdapterError]
) -> list[LoraModule]:
    """A native module as the diffusers modules of its pieces (see the module docstring)."""
    if len(pieces) == 1 and pieces[0].whole:
        return [_renamed(m, pieces[0].diffusers)]
    if all(p.whole for p in pieces):
        names = ", ".join(repr(p.diffusers) for p in pieces)
        raise refuse(
            f"module {m.key!r} may be any of {names} in diffusers names (the base's layout does "
            "not say which); give the diffusers pipeline folder as --base"
        )
    if m.kind == CONV or any(p.whole for p in pieces):
        raise refuse(f"module {m.key!r} ({m.kind}) cannot be split into rows of its parts")
    by_target: dict[str, list[Piece]] = {}
    for p in pieces:
        by_target.setdefault(p.diffusers, []).append(p)
    out = []
    zero: list[LoraModule] = []
    for path, group in by_target.items():
        total = sum(p.rows or 0 for p in group)
        spans = [(p.diffusers_start, p.native_start, p.rows or 0) for p in group]
        if not tiles([(s, n) for s, _, n in spans], total):
            raise refuse(f"module {m.key!r}: the rows of {path!r} are not all in it")
        up = _rows(m.up, spans, total)
        down = m.down.numpy()
        keep = np.flatnonzero(np.any(up.reshape(total, up.shape[1], -1) != 0, axis=(0, 2)))
        if 0 < len(keep) < up.shape[1] and not m.rslora:
            up, down = up[:, keep], down[keep]
        new = _renamed(m, path, keep_alpha=False)
        new.up = ArrayTensor(up, m.up.dtype)
        new.down = m.down if down.shape[0] == m.rank else ArrayTensor(down, m.down.dtype)
        if m.alpha is not None and down.shape[0] != m.rank:
            new.alpha = m.alpha * down.shape[0] / m.rank  # the same alpha / r
        if m.magnitude is not None:
            new.magnitude = ArrayTensor(_rows(m.magnitude, spans, total), m.magnitude.dtype)
        if m.bias is not None:
            new.bias = ArrayTensor(_rows(m.bias, spans, total), m.bias.dtype)
        if m.bias_diff is not None:
            new.bias_diff = ArrayTensor(_rows(m.bias_diff, spans, total), m.bias_diff.dtype)
        out.append(new)
        if not len(keep) and m.magnitude is None and not _nonzero(new.bias, new.bias_diff):
            zero.append(new)
    if len(zero) < len(out):
        out = [new for new in out if not any(new is z for z in zero)]
    return out


def _nonzero(*tensors: Tensor | None) -> bool:
    """Any of the tensors has a nonzero entry."""
    return any(t is not None and bool(np.any(t.numpy() != 0)) for t in tensors)


def fuse(
    native: str,
    members: list[tuple[LoraModule, tuple[Piece, ...]]],
    pieces: tuple[Piece, ...],
    refuse: Callable[[str], UnsupportedAdapterError],
) -> LoraModule:
    """The diffusers modules of one native weight as one module (see the module docstring)."""
    first = members[0][0]
    if len(members) == 1 and all(p.whole for p in members[0][1]):
        return _renamed(first, native)
    total = sum(p.rows or 0 for p in pieces)
    for m, own in members:
        if m.kind == CONV or any(p.whole for p in own):
            raise refuse(f"module {m.key!r} ({m.kind}) cannot be fused into rows of {native!r}")
        if m.magnitude is not None:
            raise refuse(f"module {m.key!r} is DoRA: its magnitude cannot be fused exactly")
        if m.bias_diff is not None:
            raise refuse(f"module {m.key!r} has a bias difference (.diff_b), not fused")
    scales = {m.scale for m, _ in members}
    if len(scales) > 1:
        names = ", ".join(repr(m.key) for m, _ in members)
        raise refuse(
            f"modules {names} of {native!r} have different scales (alpha / rank): one fused "
            "module has one scale"
        )
    rank = sum(m.rank for m, _ in members)
    up_dtype, down_dtype = first.up.dtype, first.down.dtype
    if any(m.up.dtype != up_dtype or m.down.dtype != down_dtype for m, _ in members):
        raise refuse(f"the modules of {native!r} have different dtypes")
    up = np.zeros((total, rank), first.up.numpy().dtype)
    downs = []
    bias = None
    if any(m.bias is not None for m, _ in members):
        bias = np.zeros(total, next(m.bias for m, _ in members if m.bias is not None).numpy().dtype)
    column = 0
    for m, own in members:
        values = m.up.numpy().reshape(m.up.shape[0], m.rank)
        own_bias = None if m.bias is None else m.bias.numpy()
        for p in own:
            n = p.rows or 0
            up[p.native_start : p.native_start + n, column : column + m.rank] = values[
                p.diffusers_start : p.diffusers_start + n
            ]
            if own_bias is not None and bias is not None:
                bias[p.native_start : p.native_start + n] = own_bias[
                    p.diffusers_start : p.diffusers_start + n
                ]
        downs.append(m.down.numpy().reshape(m.rank, -1))
        column += m.rank
    scale = scales.pop()
    new = _renamed(first, native, keep_alpha=False)
    new.up = ArrayTensor(up, up_dtype)
    new.down = ArrayTensor(np.concatenate(downs), down_dtype)
    new.alpha = scale * rank
    new.rslora = False
    new.bias = None if bias is None else ArrayTensor(bias, first.bias.dtype if first.bias else None)
    return new


def _renamed(m: LoraModule, path: str, *, keep_alpha: bool = True) -> LoraModule:
    """``m`` under another path, its file keys cleared (the writer names it); a rename keeps
    kohya's alpha tensor (written back byte for byte), new factors do not."""
    return dataclasses.replace(
        m, path=path, keys={}, alpha_tensor=m.alpha_tensor if keep_alpha else None
    )


__all__ = ["diffusers_component", "fuse", "layout_for", "relayout", "split", "target_side"]
