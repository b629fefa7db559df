"""PEFT's module-name regexes, matched in time linear in the name, whatever the file holds.

PEFT matches ``rank_pattern`` / ``alpha_pattern`` keys as ``re.match(rf"(.*\\.)?({key})$",
name)`` and a string ``target_modules`` as ``re.fullmatch(target_modules, name)``. Both the
pattern and the names come from the adapter file, and Python's backtracking engine takes
exponential time on patterns such as ``(a+)+`` against ``"aaaa...a!"``: a 2 KB file would hang
every command. This module answers the same yes/no question with a set-of-states (Thompson /
Pike) simulation of the pattern Python's own parser produces, so the work is at most
``len(name) x states``. Single characters and zero-width assertions (``$``, ``\\b``...) are
decided by Python's ``re`` itself, one position at a time, so every answer is the one ``re``
gives; greediness and group order change which match ``re`` finds, never whether one exists.

Constructs whose meaning needs backtracking (back-references, look-around, conditionals,
atomic groups, possessive repeats) and patterns whose expansion exceeds :data:`MAX_STATES`
(``a{99999999999}``) raise :class:`PatternError` instead of running unbounded.

Example:
    >>> peft_pattern_matches("q_proj", "model.layers.0.self_attn.q_proj")
    True
    >>> peft_pattern_matches("(a+)+", "a" * 32 + "!")
    False
    >>> fullmatch("(a+)+", "a" * 32 + "!")
    False
"""

from __future__ import annotations

import re
from functools import lru_cache

try:  # Python >= 3.11
    from re import _compiler as _sre_compile
    from re import _constants as _sre_const
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_compile as _sre_compile  # type: ignore[no-redef]
    import sre_constants as _sre_const  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

#: Most NFA states one pattern may expand to (bounded repeats are unrolled).
MAX_STATES = 20_000

_C = _sre_const
_ONE_CHAR = {_C.LITERAL, _C.NOT_LITERAL, _C.ANY, _C.IN}
_UNSUPPORTED = {
    _C.GROUPREF: "a back-reference",
    _C.GROUPREF_EXISTS: "a conditional group",
    _C.ASSERT: "a look-ahead / look-behind",
    _C.ASSERT_NOT: "a negative look-ahead / look-behind",
}
for _name, _what in (
    ("ATOMIC_GROUP", "an atomic group"),
    ("POSSESSIVE_REPEAT", "a possessive repeat"),
):
    if hasattr(_C, _name):
        _UNSUPPORTED[getattr(_C, _name)] = _what

_CHAR, _SPLIT, _ASSERT, _ACCEPT = range(4)


class PatternError(ValueError):
    """A pattern Python's ``re`` rejects, or one that cannot be matched in bounded time.

    The message says what is wrong with the pattern, without naming it: callers say where the
    pattern comes from (``alpha_pattern key 'x' is not a valid regular expression (...)``).
    """


class _Program:
    """A Thompson NFA: ``ops[i]`` is ``(kind, arg, next states)``."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.ops: list[tuple[int, object, list[int]]] = []
        self.atoms: list[re.Pattern[str]] = []
        self._atom_ids: dict[tuple[object, int], int] = {}

    def add(self, kind: int, arg: object = None) -> int:
        if len(self.ops) >= MAX_STATES:
            raise PatternError(
                f"expands to more than {MAX_STATES} states (a repeat count too large to "
                "match in bounded time)"
            )
        self.ops.append((kind, arg, []))
        return len(self.ops) - 1

    def atom(self, node: tuple[object, object], flags: int) -> int:
        """Index of a compiled one-node pattern: Python decides that node at one position."""
        key = (repr(node), flags)
        if key not in self._atom_ids:
            state = _sre_parse.State()
            state.flags = flags
            self.atoms.append(_sre_compile.compile(_sre_parse.SubPattern(state, [node]), flags))
            self._atom_ids[key] = len(self.atoms) - 1
        return self._atom_ids[key]


def _build(prog: _Program, items: list, flags: int) -> tuple[int, list[int]]:
    """Append ``items`` to ``prog``; return (entry state, states whose ``next`` is still open)."""
    entry = prog.add(_SPLIT)
    outs = [entry]
    for op, av in items:
        start, ends = _build_one(prog, op, av, flags)
        for s in outs:
            prog.ops[s][2].append(start)
        outs = ends
    return entry, outs


def _build_one(prog: _Program, op: object, av: object, flags: int) -> tuple[int, list[int]]:
    if op in _ONE_CHAR:
        s = prog.add(_CHAR, prog.atom((op, av), flags))
        return s, [s]
    if op is _C.AT:
        s = prog.add(_ASSERT, prog.atom((op, av), flags))
        return s, [s]
    if op is _C.SUBPATTERN:
        _group, add_flags, del_flags, sub = av  # type: ignore[misc]
        return _build(prog, list(sub), (flags | add_flags) & ~del_flags)
    if op is _C.BRANCH:
        entry = prog.add(_SPLIT)
        ends: list[int] = []
        for alt in av[1]:  # type: ignore[index]
            start, alt_ends = _build(prog, list(alt), flags)
            prog.ops[entry][2].append(start)
            ends += alt_ends
        return entry, ends
    if op in (_C.MAX_REPEAT, _C.MIN_REPEAT):
        low, high, sub = av  # type: ignore[misc]
        items = list(sub)
        entry = prog.add(_SPLIT)
        outs = [entry]
        for _ in range(low):
            start, ends = _build(prog, items, flags)
            for s in outs:
                prog.ops[s][2].append(start)
            outs = ends
        if high is _C.MAXREPEAT:
            loop = prog.add(_SPLIT)
            for s in outs:
                prog.ops[s][2].append(loop)
            start, ends = _build(prog, items, flags)
            prog.ops[loop][2].append(start)
            for s in ends:
                prog.ops[s][2].append(loop)
            return entry, [loop]
        exits = list(outs)
        for _ in range(high - low):
            start, ends = _build(prog, items, flags)
            for s in outs:
                prog.ops[s][2].append(start)
            outs = ends
            exits += ends
        return entry, exits
    what = _UNSUPPORTED.get(op, f"the construct {op}")
    raise PatternError(f"uses {what}, which loratool cannot match in bounded time")


@lru_cache(maxsize=512)
def _compile(pattern: str) -> _Program:
    try:
        parsed = _sre_parse.parse(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise PatternError(f"is not a valid regular expression ({exc})") from None
    prog = _Program(pattern)
    try:
        entry, ends = _build(prog, list(parsed), parsed.state.flags)
    except RecursionError:
        raise PatternError("is nested too deeply") from None
    accept = prog.add(_ACCEPT)
    for s in ends:
        prog.ops[s][2].append(accept)
    prog.ops.append((_SPLIT, None, [entry]))  # the start state, last
    return prog


def _run(prog: _Program, text: str, full: bool) -> bool:
    ops, atoms = prog.ops, prog.atoms
    n = len(text)
    decided: dict[tuple[int, str], bool] = {}

    def takes(atom: int, pos: int) -> bool:
        key = (atom, text[pos])
        if key not in decided:
            decided[key] = atoms[atom].match(text, pos) is not None
        return decided[key]

    def closure(starts: list[int], pos: int) -> list[int]:
        seen: set[int] = set()
        chars: list[int] = []
        stack = list(starts)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            kind, arg, nexts = ops[s]
            if kind in (_CHAR, _ACCEPT):
                chars.append(s)
            elif kind == _SPLIT or atoms[arg].match(text, pos) is not None:  # type: ignore[index]
                stack.extend(nexts)
        return chars

    current = closure([len(ops) - 1], 0)
    for pos in range(n + 1):
        nxt: list[int] = []
        for s in current:
            kind, arg, nexts = ops[s]
            if kind == _ACCEPT:
                if not full or pos == n:
                    return True
            elif pos < n and takes(arg, pos):  # type: ignore[arg-type]
                nxt.extend(nexts)
        if not nxt or pos == n:
            return False
        current = closure(nxt, pos + 1)
    return False


def check(pattern: str) -> None:
    """Raise :class:`PatternError` if ``pattern`` cannot be matched here (see module doc)."""
    _compile(pattern)


def fullmatch(pattern: str, text: str) -> bool:
    """``re.fullmatch(pattern, text) is not None``, in time linear in ``len(text)``."""
    return _run(_compile(pattern), text, True)


def match(pattern: str, text: str) -> bool:
    """``re.match(pattern, text) is not None``, in time linear in ``len(text)``."""
    return _run(_compile(pattern), text, False)


def peft_pattern(key: str) -> str:
    """The regex PEFT builds from a rank_pattern / alpha_pattern key."""
    return rf"(.*\.)?({key})$"


def peft_pattern_matches(key: str, name: str) -> bool:
    """Whether PEFT's ``re.match(rf"(.*\\.)?({key})$", name)`` matches.

    Raises:
        PatternError: the key is no valid regex (PEFT fails on it too), or uses a construct
            that cannot be matched in bounded time.
    """
    # No metacharacter but dots (PEFT's own keys): the plain suffix, by far the common case,
    # matches; anything else needs the full check (a dot is a wildcard).
    plain = "\n" not in name and re.escape(key) == key.replace(".", r"\.")
    if plain and (name == key or name.endswith("." + key)):
        return True
    return match(peft_pattern(key), name)
