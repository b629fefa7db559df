"""What every checkpoint layout answers: which rows of which native weight a diffusers weight is.

A model saved natively (a single file from its authors: SGM / LDM UNets, BFL Flux, SD3,
Wan...) and the same model saved by diffusers hold the same numbers under other names, and
sometimes in other groupings: Flux's native ``double_blocks.0.img_attn.qkv`` is diffusers'
``to_q``, ``to_k`` and ``to_v`` stacked by rows. A :class:`Piece` says that ``rows`` rows of
one native weight, from ``native_start``, are the same rows of one diffusers weight, from
``diffusers_start`` (the columns always whole); ``rows=None`` means the whole weight, a plain
rename. A layout is a set of pieces, asked for by either name.

Everything works on module paths (no ``.weight``), relative to the model (no file prefix such
as ``model.diffusion_model.``). Layouts import nothing of loratool: they are facts about models.

Example:
    >>> qkv = [Piece("img_attn.qkv", f"attn.to_{c}", 8 * i, 0, 8) for i, c in enumerate("qkv")]
    >>> qkv[1].native_key, qkv[1].diffusers
    ('img_attn.qkv.weight', 'attn.to_k')
    >>> qkv[1].native_rows, qkv[1].diffusers_rows
    ((8, 16), (0, 8))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

#: Tensor shapes by key, as a checkpoint's header gives them.
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Piece:
    """Rows of a native weight that are rows of a diffusers weight.

    ``native[native_start : native_start + rows] == diffusers[diffusers_start :
    diffusers_start + rows]`` over whole columns; with ``rows=None`` the two weights are the
    same tensor under two names (both starts are then 0).

    The native weight's key is ``native + native_suffix``: ``.weight`` for every
    ``nn.Linear``-style module; OpenCLIP's fused attention stores ``attn.in_proj_weight`` and
    ``attn.in_proj_bias`` (``native="attn.in_proj"``, ``native_suffix="_weight"``; its bias
    key replaces ``weight`` with ``bias``). The diffusers key is always ``diffusers + ".weight"``.
    """

    native: str
    diffusers: str
    native_start: int = 0
    diffusers_start: int = 0
    rows: int | None = None
    native_suffix: str = ".weight"

    @property
    def native_key(self) -> str:
        """The native weight's tensor key (``<native>.weight`` for most modules)."""
        return self.native + self.native_suffix

    @property
    def native_bias_key(self) -> str | None:
        """The native bias's tensor key; None for a parameter that is no weight (a norm's
        ``.scale``), which has no bias next to it."""
        if "weight" not in self.native_suffix:
            return None
        return self.native + self.native_suffix.replace("weight", "bias")

    @property
    def whole(self) -> bool:
        """The piece is the whole weight on both sides (a rename)."""
        return self.rows is None

    @property
    def native_rows(self) -> tuple[int, int] | None:
        """``(start, stop)`` in the native weight; None for a whole weight."""
        return None if self.rows is None else (self.native_start, self.native_start + self.rows)

    @property
    def diffusers_rows(self) -> tuple[int, int] | None:
        """``(start, stop)`` in the diffusers weight; None for a whole weight."""
        if self.rows is None:
            return None
        return self.diffusers_start, self.diffusers_start + self.rows


@runtime_checkable
class Layout(Protocol):
    """One model's map between its native and its diffusers module paths.

    Attributes:
        architecture: a short name (``sd1``, ``sdxl``, ``flux``, ``sd3``, ``wan``...) shown by
            ``inspect`` and used in messages.
    """

    architecture: str

    def to_native(self, diffusers_path: str) -> tuple[Piece, ...]:
        """The pieces of native weights a diffusers module is made of; () where the map has
        none. Pieces of one call all name ``diffusers_path``."""
        ...

    def to_diffusers(self, native_path: str) -> tuple[Piece, ...]:
        """The pieces of diffusers weights a native module is made of; () where the map has
        none. Pieces of one call all name ``native_path``."""
        ...


class PieceTable:
    """A layout given as a list of pieces of leaf modules: both lookups are dictionary hits.

    Layout classes whose map is a finite list (every transformer: so many blocks, so many
    projections each) build one of these from their structure and delegate to it.
    """

    def __init__(self, pieces: Iterable[Piece]) -> None:
        self.pieces = tuple(pieces)
        self._native: dict[str, list[Piece]] = {}
        self._diffusers: dict[str, list[Piece]] = {}
        for piece in self.pieces:
            self._native.setdefault(piece.native, []).append(piece)
            self._diffusers.setdefault(piece.diffusers, []).append(piece)

    def __iter__(self) -> Iterator[Piece]:
        return iter(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def to_native(self, diffusers_path: str) -> tuple[Piece, ...]:
        return tuple(self._diffusers.get(diffusers_path, ()))

    def to_diffusers(self, native_path: str) -> tuple[Piece, ...]:
        return tuple(self._native.get(native_path, ()))


def stacked(
    native: str, parts: Iterable[tuple[str, int]], native_suffix: str = ".weight"
) -> Iterator[Piece]:
    """Pieces of a native weight that stacks whole diffusers weights by rows, in order.

    Example:
        >>> [p.native_rows for p in stacked("qkv", [("to_q", 4), ("to_k", 4), ("to_v", 4)])]
        [(0, 4), (4, 8), (8, 12)]
    """
    start = 0
    for diffusers, rows in parts:
        yield Piece(native, diffusers, start, 0, rows, native_suffix)
        start += rows


def tiles(spans: Iterable[tuple[int, int]], total: int) -> bool:
    """Whether ``(start, count)`` row spans cover rows ``0 : total`` exactly once.

    Example:
        >>> tiles([(4, 4), (0, 4)], 8), tiles([(0, 4), (2, 6)], 8), tiles([(0, 4)], 8)
        (True, False, False)
    """
    at = 0
    for start, count in sorted(spans):
        if start != at:
            return False
        at += count
    return at == total


def config_value(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    """The first of ``names`` present in a diffusers config (models rename their fields)."""
    for name in names:
        if name in config and config[name] is not None:
            return config[name]
    return default


__all__ = ["Layout", "Piece", "PieceTable", "Shapes", "config_value", "stacked", "tiles"]
