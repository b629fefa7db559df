"""What a validation run returns: findings, grouped per adapter file, and the progress hook.

Nothing here checks anything; the rule families in :mod:`lora_tools.ops.validate.checks` fill a
:class:`FileReport` per target, and :mod:`lora_tools.ops.validate.outputs` renders the
:class:`Report`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from lora_tools.ops.validate.rules import ERROR, SEVERITIES, Rule, at_least
from lora_tools.results import Result, envelope, input_ref


@dataclass(frozen=True)
class Finding:
    """One rule violation.

    Attributes:
        rule: the rule violated (code, name, severity).
        path: the file the finding is about (weights, config, or the folder), as given.
        message: what is wrong, naming the module or tensor, expected vs found.
        module: the module or tensor (or config key) concerned, if any.
        expected: what a valid file would hold, if there is one answer.
        found: what this file holds.
        hint: what to do about it.
    """

    rule: Rule
    path: str
    message: str
    module: str | None = None
    expected: str | None = None
    found: str | None = None
    hint: str | None = None

    @property
    def severity(self) -> str:
        return self.rule.severity

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.code,
            "name": self.rule.name,
            "severity": self.severity,
            "path": self.path,
            "module": self.module,
            "message": self.message,
            "expected": self.expected,
            "found": self.found,
            "hint": self.hint,
        }


@dataclass
class FileReport:
    """The findings for one adapter (a weights file, plus its config when it has one)."""

    path: str
    format: str | None = None
    config: str | None = None
    findings: list[Finding] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        found = Counter(f.severity for f in self.findings)
        return {sev: found.get(sev, 0) for sev in reversed(SEVERITIES)}


@dataclass(frozen=True, repr=False)
class Report(Result):
    """Everything one validation run found, file by file.

    ``to_json(fail_on)`` is the ``validate --output-format json`` document (docs/json.md).
    """

    command = "validate"

    files: list[FileReport]
    rules: frozenset[str]
    base: str | None = None

    def inputs(self) -> list[dict[str, Any]]:
        refs = []
        for fr in self.files:
            refs.append(input_ref(fr.path, "adapter", format=fr.format))
            if fr.config is not None:
                refs.append(input_ref(fr.config, "config"))
        if self.base is not None:
            refs.append(input_ref(self.base, "base"))
        return refs

    def fields(self, fail_on: str = ERROR) -> dict[str, Any]:
        return {
            "base": self.base,
            "fail_on": fail_on,
            "failed": self.failed(fail_on),
            "counts": {"files": len(self.files), **self.counts()},
            "files": [
                {
                    "path": fr.path,
                    "config": fr.config,
                    "format": fr.format,
                    "counts": fr.counts(),
                    "findings": [f.to_dict() for f in fr.findings],
                }
                for fr in self.files
            ],
        }

    def to_json(self, fail_on: str = ERROR) -> dict[str, Any]:
        """The JSON document, with the verdict for ``fail_on`` (``error`` or ``warning``)."""
        doc = envelope(self.command, self.inputs(), self.outputs())
        doc.update(self.fields(fail_on))
        return doc

    @property
    def findings(self) -> list[Finding]:
        return [f for fr in self.files for f in fr.findings]

    def counts(self) -> dict[str, int]:
        found = Counter(f.severity for f in self.findings)
        return {sev: found.get(sev, 0) for sev in reversed(SEVERITIES)}

    def failed(self, fail_on: str = ERROR) -> bool:
        """Whether any finding is at or above ``fail_on`` (``error`` or ``warning``)."""
        return any(at_least(f.severity, fail_on) for f in self.findings)


class Progress(Protocol):
    """Receives how many data bytes the value rules will read, then each chunk read."""

    def start(self, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...
