"""Reading small JSON files (configs, indexes, provenance) into dicts, with one-line errors."""

from __future__ import annotations

import json
import os
from typing import Any

from lora_tools.errors import FormatError


def read_json_object(path: str | os.PathLike[str], *, kind: str = "json") -> dict[str, Any]:
    """Parse a JSON file that must hold an object.

    Raises:
        FormatError: unreadable, not JSON, or not an object; names the file. ``kind`` is the
            error's stable slug (validate maps it to a rule).

    Example:
        >>> import pathlib
        >>> _ = pathlib.Path("/tmp/doc-config.json").write_text('{"r": 4}')
        >>> read_json_object("/tmp/doc-config.json")
        {'r': 4}
    """
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"cannot read: {exc}", path=path, kind=kind) from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(
            f"not valid JSON: {exc}",
            path=path,
            hint="fix or regenerate the file",
            kind=kind,
        ) from None
    if not isinstance(doc, dict):
        raise FormatError(
            f"expected a JSON object, found {type(doc).__name__}", path=path, kind=kind
        )
    return doc
