"""Render a :class:`~lora_tools.ops.validate.report.Report` for machines: JSON, GitHub Actions
workflow commands, SARIF 2.1.0 (the human text view lives in the CLI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from lora_tools import __version__
from lora_tools.errors import printable
from lora_tools.ops.validate.report import Report
from lora_tools.ops.validate.rules import ERROR, INFO, RULES, WARNING


def to_json(report: Report, fail_on: str = ERROR) -> dict[str, Any]:
    """The ``--output-format json`` document (docs/json.md): ``report.to_json(fail_on)``."""
    return report.to_json(fail_on)


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


_GITHUB_LEVEL = {ERROR: "error", WARNING: "warning", INFO: "notice"}


def to_github(report: Report) -> list[str]:
    """GitHub Actions workflow commands, one line per finding.

    Example line: ``::error file=a.safetensors,title=LT012 truncated::a.safetensors: ...``
    """
    lines = []
    for f in report.findings:
        title = f"{f.rule.code} {f.rule.name}"
        text = f.message + (f" (hint: {f.hint})" if f.hint else "")
        lines.append(  # printable: an ESC or newline in a name cannot fake a log line
            f"::{_GITHUB_LEVEL[f.severity]} file={_escape_property(printable(f.path))},"
            f"title={_escape_property(title)}::{_escape_data(printable(text))}"
        )
    return lines


_SARIF_LEVEL = {ERROR: "error", WARNING: "warning", INFO: "note"}
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def artifact_uri(path: str) -> str:
    """A SARIF artifact URI: relative paths as forward-slash URI references, absolute as file:."""
    p = Path(path)
    if p.is_absolute():
        return p.as_uri()
    return quote(p.as_posix())


def to_sarif(report: Report, docs_url: str | None = None) -> dict[str, Any]:
    """A SARIF 2.1.0 log that GitHub code scanning accepts (one run, every rule described).

    Args:
        report: the validation report.
        docs_url: where docs/rules.md is published; rule anchors are appended to it. Defaults to
            the package's documentation URL (see :func:`rules_doc_url`).
    """
    docs = docs_url or rules_doc_url()
    codes = sorted(report.rules | {f.rule.code for f in report.findings})
    index = {code: i for i, code in enumerate(codes)}
    rules = []
    for code in codes:
        rule = RULES[code]
        rules.append(
            {
                "id": rule.code,
                "name": rule.name,
                "shortDescription": {"text": rule.summary},
                "fullDescription": {"text": f"{rule.summary} ({rule.category} rule)"},
                "helpUri": f"{docs}#{rule.anchor}",
                "help": {
                    "text": f"{rule.code} {rule.name}: {rule.summary}. See {docs}#{rule.anchor}",
                    "markdown": f"**{rule.code} {rule.name}**: {rule.summary}. "
                    f"[Documentation]({docs}#{rule.anchor})",
                },
                "defaultConfiguration": {"level": _SARIF_LEVEL[rule.severity]},
                "properties": {"category": rule.category, "tags": [rule.category]},
            }
        )
    results = []
    for f in report.findings:
        text = f.message + (f" (hint: {f.hint})" if f.hint else "")
        result: dict[str, Any] = {
            "ruleId": f.rule.code,
            "ruleIndex": index[f.rule.code],
            "level": _SARIF_LEVEL[f.severity],
            "message": {"text": text},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": artifact_uri(f.path)},
                        "region": {"startLine": 1},
                    }
                }
            ],
        }
        if f.module:
            result["locations"][0]["logicalLocations"] = [{"name": f.module, "kind": "member"}]
        props = {k: v for k, v in (("expected", f.expected), ("found", f.found)) if v is not None}
        if props:
            result["properties"] = props
        results.append(result)
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "loratool",
                        "version": __version__,
                        "semanticVersion": __version__,
                        "informationUri": docs.split("#")[0],
                        "rules": rules,
                    }
                },
                "results": results,
                "columnKind": "unicodeCodePoints",
            }
        ],
    }


#: Used when the installed package's metadata names no documentation URL.
FALLBACK_DOCS_URL = "https://pypi.org/project/loratool/"


def rules_doc_url() -> str:
    """The published docs/rules.md: the package's ``Documentation`` project URL, if any."""
    try:
        from importlib.metadata import PackageNotFoundError, metadata

        urls = metadata("loratool").get_all("Project-URL") or []
    except PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("documentation", "rules"):
            return url.strip()
    return FALLBACK_DOCS_URL
