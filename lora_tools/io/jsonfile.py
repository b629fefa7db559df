"""Reading JSON from files and metadata safely: bounded depth, one-line errors naming the file.

Every JSON document loratool reads from a file or from safetensors metadata goes through
:func:`parse_json`: configs, indexes, provenance records, ``ss_network_args``,
``lora_adapter_metadata``, ``loratool_history``. A document nested deeper than
:data:`MAX_DEPTH` (Python's own parser dies with RecursionError near 1,000), one that is not
JSON, and (with ``allow_nan=False``) one holding ``NaN`` / ``Infinity``, which JSON forbids, are
a :class:`~lora_tools.errors.FormatError` naming the file (and the metadata key).
"""

from __future__ import annotations

import json
import os
from typing import Any

from lora_tools.errors import FormatError

#: Deepest nesting of arrays and objects accepted. Real configs nest 3 or 4 levels.
MAX_DEPTH = 64


def _too_deep(doc: object) -> bool:
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            items: Any = value.values()
        elif isinstance(value, list):
            items = value
        else:
            continue
        if depth > MAX_DEPTH:
            return True
        stack.extend((item, depth + 1) for item in items if isinstance(item, (dict, list)))
    return False


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in JSON")


def parse_json(
    text: str | bytes,
    *,
    path: str | os.PathLike[str] | None = None,
    what: str = "",
    kind: str = "json",
    allow_nan: bool = True,
    hint: str | None = "fix or regenerate the file",
) -> Any:
    """Parse JSON text from a file or a metadata value.

    Args:
        text: the JSON text (bytes must be UTF-8).
        path: the file the text comes from, for the error.
        what: what the text is, for the error (``__metadata__['ss_network_args']``); empty
            for a whole file.
        kind: the error's stable slug (validate maps it to a rule).
        allow_nan: accept ``NaN`` / ``Infinity`` (Python's json writes them; JSON forbids
            them).
        hint: the error's hint.

    Raises:
        FormatError: not UTF-8, not JSON, nested deeper than :data:`MAX_DEPTH`, or NaN /
            Infinity where they are not allowed.

    Example:
        >>> parse_json('{"r": 4}')
        {'r': 4}
        >>> parse_json("[" * 100 + "]" * 100, what="ss_network_args")
        Traceback (most recent call last):
        ...
        lora_tools.errors.FormatError: ss_network_args is not valid JSON: nested deeper than 64 levels (hint: fix or regenerate the file)
    """
    prefix = f"{what} is not valid JSON" if what else "not valid JSON"
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        doc = json.loads(text, parse_constant=None if allow_nan else _no_constant)
    except UnicodeDecodeError as exc:
        raise FormatError(
            f"{prefix}: not UTF-8 ({exc.reason})", path=path, hint=hint, kind=kind
        ) from None
    except RecursionError:
        doc, deep = None, True
    except (json.JSONDecodeError, ValueError) as exc:
        raise FormatError(f"{prefix}: {exc}", path=path, hint=hint, kind=kind) from None
    else:
        deep = _too_deep(doc)
    if deep:
        raise FormatError(
            f"{prefix}: nested deeper than {MAX_DEPTH} levels", path=path, hint=hint, kind=kind
        )
    return doc


def read_json(path: str | os.PathLike[str], *, kind: str = "json", allow_nan: bool = True) -> Any:
    """Parse a JSON file (any top-level value) with :func:`parse_json`'s limits.

    Raises:
        FormatError: unreadable, or :func:`parse_json` refuses it; names the file.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise FormatError(f"cannot read: {exc}", path=path, kind=kind) from None
    return parse_json(data, path=path, kind=kind, allow_nan=allow_nan)


def read_json_object(
    path: str | os.PathLike[str], *, kind: str = "json", allow_nan: bool = True
) -> dict[str, Any]:
    """Parse a JSON file that must hold an object.

    Raises:
        FormatError: unreadable, not JSON, too deep, or not an object; names the file.
            ``kind`` is the error's stable slug (validate maps it to a rule).

    Example:
        >>> import pathlib
        >>> _ = pathlib.Path("/tmp/doc-config.json").write_text('{"r": 4}')
        >>> read_json_object("/tmp/doc-config.json")
        {'r': 4}
    """
    doc = read_json(path, kind=kind, allow_nan=allow_nan)
    if not isinstance(doc, dict):
        raise FormatError(
            f"expected a JSON object, found {type(doc).__name__}", path=path, kind=kind
        )
    return doc
