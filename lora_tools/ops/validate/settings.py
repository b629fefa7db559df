"""Command-line defaults from ``[tool.loratool.validate]`` in the nearest pyproject.toml."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_tools.errors import UsageError
from lora_tools.ops.validate.rules import ERROR, WARNING, select_rules, split_selectors

OUTPUT_FORMATS = ("text", "json", "github", "sarif")
FAIL_ON = (ERROR, WARNING)


@dataclass(frozen=True)
class Settings:
    """Defaults for the command line, from ``[tool.loratool.validate]`` in pyproject.toml."""

    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    fail_on: str = ERROR
    output_format: str = "text"
    source: Path | None = None


_SETTING_KEYS = {"select", "ignore", "fail-on", "output-format"}


def load_settings(start: str | os.PathLike[str] | None = None) -> Settings:
    """Read ``[tool.loratool.validate]`` from the nearest pyproject.toml at or above ``start``.

    Keys: ``select`` and ``ignore`` (a list, or a comma-separated string of codes, prefixes or
    names), ``fail-on`` (``error`` or ``warning``), ``output-format`` (``text``, ``json``,
    ``github`` or ``sarif``). A pyproject.toml without the table gives the defaults.

    Raises:
        UsageError: unparsable TOML, an unknown key or an invalid value (names the file).

    Example:
        >>> load_settings("/").fail_on
        'error'
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            break
    else:
        return Settings()
    try:
        doc = tomllib.loads(candidate.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read settings: {exc}", path=candidate) from None
    table = doc.get("tool", {}).get("loratool", {}).get("validate")
    if table is None:
        return Settings()

    def bad(key: str, value: object, expected: str) -> UsageError:
        return UsageError(
            f"[tool.loratool.validate] {key} = {value!r}: expected {expected}", path=candidate
        )

    if not isinstance(table, dict):
        raise bad("validate", table, "a table")
    unknown = sorted(set(table) - _SETTING_KEYS)
    if unknown:
        raise UsageError(
            f"[tool.loratool.validate] has unknown key(s) {', '.join(unknown)}",
            path=candidate,
            hint=f"known keys: {', '.join(sorted(_SETTING_KEYS))}",
        )
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("select", "ignore"):
        value = table.get(key, [])
        if isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            lists[key] = tuple(split_selectors(value))
            try:
                select_rules(lists[key] or None)
            except UsageError as exc:
                raise UsageError(
                    f"[tool.loratool.validate] {key}: {exc.message}", path=candidate, hint=exc.hint
                ) from None
        else:
            raise bad(key, value, "a list of rule codes")
    fail_on = table.get("fail-on", ERROR)
    if fail_on not in FAIL_ON:
        raise bad("fail-on", fail_on, " or ".join(FAIL_ON))
    output_format = table.get("output-format", "text")
    if output_format not in OUTPUT_FORMATS:
        raise bad("output-format", output_format, ", ".join(OUTPUT_FORMATS))
    return Settings(lists["select"], lists["ignore"], fail_on, output_format, candidate)
