"""Parse and check a safetensors header (the JSON after the 8-byte length) without trusting it.

Every number in the header is checked before it is used to allocate or seek; every problem is
reported, not only the first (``loratool validate`` lists them all).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from lora_tools.io.safetensors.dtypes import DTYPES
from lora_tools.io.safetensors.tensors import TensorInfo

METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a container. ``kind`` is a stable slug (validate maps it to a rule)."""

    kind: str
    message: str
    tensor: str | None = None
    hint: str | None = None


@dataclass(frozen=True)
class Header:
    """A parsed, fully checked safetensors header."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    header_bytes: int
    file_bytes: int
    duplicate_keys: tuple[str, ...] = field(default=())

    @property
    def data_start(self) -> int:
        """Absolute file offset of the data buffer."""
        return 8 + self.header_bytes

    @property
    def data_bytes(self) -> int:
        return self.file_bytes - self.data_start


def _pairs_with_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = dict(pairs)  # one C call per object: the common case, no duplicates
    if len(out) == len(pairs):
        return out
    seen: set[str] = set()
    dups: list[str] = []
    for key, _ in pairs:
        if key in seen:
            dups.append(key)
        seen.add(key)
    out.setdefault("\x00duplicates", []).extend(dups)  # type: ignore[union-attr]
    return out


def _lone_surrogate(doc: dict[str, object]) -> str | None:
    """The first tensor name, metadata key or value that cannot be encoded as UTF-8."""
    metadata = doc.get(METADATA_KEY)
    strings = list(doc)
    if isinstance(metadata, dict):
        strings += [s for kv in metadata.items() for s in kv if isinstance(s, str)]
    for text in strings:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return text
    return None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small acyclic objects (a
    million-tensor header): its collections would visit every live object again and again,
    doubling the parse time. Reference counting still frees everything as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_header(
    header_json: bytes, header_bytes: int, file_bytes: int
) -> tuple[Header | None, list[Problem]]:
    """Check a header against every rule of the reference reader, plus duplicate keys.

    Returns the parsed header (None if it could not be parsed far enough to locate tensors) and
    every problem found. :func:`read_header` raises the first problem; ``loratool validate``
    reports all of them.
    """
    problems: list[Problem] = []
    try:
        text = header_json.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [Problem("header-utf8", f"header is not valid UTF-8 ({exc.reason})")]
    if not text.startswith("{"):
        return None, [Problem("header-json", "header does not start with '{'")]
    try:
        with gc_paused():
            doc = json.loads(text, object_pairs_hook=_pairs_with_duplicates)
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = str(exc) if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        return None, [Problem("header-json", f"header is not valid JSON: {msg}")]
    if not isinstance(doc, dict):
        return None, [Problem("header-json", "header JSON is not an object")]
    if "\\ud" in text.lower() and (lone := _lone_surrogate(doc)) is not None:
        return None, [
            Problem(
                "header-json",
                f"header string {lone!r} holds a lone UTF-16 surrogate escape, which is not "
                "valid Unicode; the reference reader rejects the header",
            )
        ]
    duplicates = tuple(doc.pop("\x00duplicates", ()))
    for name in duplicates:
        problems.append(
            Problem(
                "duplicate-key",
                f"key {name!r} appears more than once in the header; readers disagree on which wins",
                tensor=name,
                hint="rewrite the file with a tool that writes each key once",
            )
        )

    metadata = doc.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict):
            problems.append(Problem("metadata-type", "__metadata__ is not an object"))
            metadata = None
        else:
            bad = {k: v for k, v in metadata.items() if not isinstance(v, str)}
            if bad:
                key, value = next(iter(bad.items()))
                problems.append(
                    Problem(
                        "metadata-type",
                        f"__metadata__[{key!r}] must be a string, found "
                        f"{type(value).__name__} {json.dumps(value)[:40]}",
                        hint="metadata values must be strings; JSON-encode structured values",
                    )
                )
                metadata = {k: v for k, v in metadata.items() if isinstance(v, str)}

    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    with gc_paused():
        for name, entry in doc.items():
            info = _check_entry(name, entry, problems)
            if info is not None:
                tensors[name] = info
                spans.append((info.begin, info.end, name))
            elif (span := _valid_offsets(entry)) is not None:
                # An entry rejected for its dtype or shape still occupies its bytes: keeping its
                # span stops one bad entry from also being reported as a gap or as trailing bytes.
                spans.append((*span, name))

    expected_end = 0
    for begin, end, name in sorted(spans):
        if begin > expected_end:
            problems.append(
                Problem(
                    "gap",
                    f"tensor {name!r} starts at byte {begin} of the data buffer, "
                    f"expected {expected_end}: {begin - expected_end} bytes belong to no tensor",
                    tensor=name,
                )
            )
        elif begin < expected_end:
            problems.append(
                Problem(
                    "overlap",
                    f"tensor {name!r} starts at byte {begin}, inside the previous "
                    f"tensor which ends at {expected_end}",
                    tensor=name,
                )
            )
        expected_end = max(expected_end, end)

    actual_data = file_bytes - 8 - header_bytes
    if expected_end > actual_data:
        problems.append(
            Problem(
                "truncated",
                f"tensors need {expected_end} data bytes but the file holds {actual_data}",
                hint="the file is truncated; copy or download it again",
            )
        )
    elif expected_end < actual_data:
        problems.append(
            Problem(
                "trailing-bytes",
                f"{actual_data - expected_end} bytes after the last tensor belong to no tensor",
            )
        )
    header = Header(tensors, metadata, header_bytes, file_bytes, duplicates)
    return header, problems


def _valid_offsets(entry: object) -> tuple[int, int] | None:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_uint(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        return offsets[0], offsets[1]
    return None


def _check_entry(name: str, entry: object, problems: list[Problem]) -> TensorInfo | None:
    if not isinstance(entry, dict):
        problems.append(Problem("header-json", f"entry {name!r} is not an object", tensor=name))
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        problems.append(
            Problem(
                "dtype",
                f"tensor {name!r} has unknown dtype {dtype!r}",
                tensor=name,
                hint=f"known dtypes: {', '.join(DTYPES)}",
            )
        )
        return None
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        problems.append(
            Problem(
                "shape",
                f"tensor {name!r} has shape {shape!r}, expected a list of non-negative integers",
                tensor=name,
            )
        )
        return None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_uint(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        problems.append(
            Problem(
                "offsets",
                f"tensor {name!r} has data_offsets {offsets!r}, expected [begin, end] with "
                "0 <= begin <= end",
                tensor=name,
            )
        )
        return None
    numel = math.prod(shape)
    bits = numel * DTYPES[dtype].bits
    if bits % 8:
        problems.append(
            Problem(
                "size-mismatch",
                f"tensor {name!r}: {numel} elements of {dtype} do not fill whole bytes",
                tensor=name,
            )
        )
        return None
    begin, end = offsets
    if bits // 8 != end - begin or bits >= 2**64:
        problems.append(
            Problem(
                "size-mismatch",
                f"tensor {name!r}: shape {shape} of {dtype} needs {bits // 8} bytes, "
                f"data_offsets span {end - begin}",
                tensor=name,
            )
        )
        return None
    return TensorInfo(name, dtype, tuple(shape), begin, end)
