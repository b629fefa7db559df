"""Checks shared by the transformer layout tests: a native state dict built from a diffusers one
through a layout's pieces alone, for diffusers' own native -> diffusers converter to take back.

If the pieces are the map diffusers' converter implements, converting the built dict gives the
diffusers state dict back, bit for bit; a missing, misplaced or swapped piece shows up as a
missing key or a changed tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lora_tools.layouts import Layout, Piece


def _tensor_key(piece: Piece, kind: str) -> str:
    return piece.native_key if kind == "weight" else piece.native_bias_key


def native_state_dict(
    layout: Layout, state: Mapping[str, torch.Tensor], parameters: Mapping[str, str] = {}
) -> dict[str, torch.Tensor]:
    """The native tensors the layout's pieces make of a diffusers state dict.

    ``parameters`` maps diffusers keys of bare parameters (no module) to their native keys.
    Every diffusers tensor must be covered by pieces whose rows tile it exactly once, and the
    rows placed in each native weight must tile it from 0 without gaps or overlaps.
    """
    native: dict[str, torch.Tensor] = {}
    rows: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, value in state.items():
        if key in parameters:
            native[parameters[key]] = value.clone()
            continue
        path, _, kind = key.rpartition(".")
        pieces = layout.to_native(path)
        assert pieces, f"{key}: the layout has no native weight for it"
        assert {p.diffusers for p in pieces} == {path}, key
        covered = []
        for piece in pieces:
            assert piece in layout.to_diffusers(piece.native), f"{piece}: not found back"
            target = _tensor_key(piece, kind)
            if piece.whole:
                assert len(pieces) == 1 and target not in native, key
                native[target] = value.clone()
                covered.append((0, value.shape[0]))
                continue
            start, stop = piece.diffusers_rows
            rows.setdefault(target, []).append((piece.native_start, value[start:stop].clone()))
            covered.append((start, stop))
        assert _tiles(covered, value.shape[0]), f"{key}: rows {sorted(covered)}"
    for target, parts in rows.items():
        parts.sort(key=lambda part: part[0])
        spans = [(start, start + part.shape[0]) for start, part in parts]
        assert _tiles(spans, spans[-1][1]), f"{target}: rows {spans}"
        native[target] = torch.cat([part for _, part in parts])
    return native


def _tiles(spans: list[tuple[int, int]], total: int) -> bool:
    """The ``(start, stop)`` spans cover ``0..total`` exactly once."""
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            return False
        end = stop
    return end == total


def assert_same_tensors(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """Same keys, and every tensor bit-equal."""
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].shape == value.shape and torch.equal(got[key], value), key
