"""What the rule families share while checking one target: :class:`Context`, and the spelling of
numbers and shapes in messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_tools.ops.validate.report import FileReport, Finding, Progress
from lora_tools.ops.validate.rules import ERROR, RULES
from lora_tools.ops.validate.scan import CHUNK_BYTES
from lora_tools.ops.validate.targets import Target


@dataclass
class Context:
    """One target under validation: the enabled rules, its findings so far, and the few facts
    one rule family hands to a later one.

    Findings for disabled rules are never produced: :meth:`add` drops them.

    Attributes:
        target: the adapter being checked.
        rules: the enabled rule codes.
        report: the findings so far (and the detected format).
        checkpoint: the opened ``--base`` checkpoint, if any.
        progress: told about every chunk the value scan reads.
        chunk_bytes: the value scan's chunk size for tensors that are not LoRA factors.
        nonfinite_alphas: modules whose non-finite alpha LT108 reported, so that the value
            scan does not report the same alpha tensor again as LT201.
        deployment: the ``--profile`` consumers and server settings (``LT5xx``), if any.
        copy_differences: the adapter's saved base layers whose ``--base`` tensor holds other
            values (:func:`lora_tools.ops.base_copies.differing_copies`), once compared; the
            consumer and profile rules report them.
    """

    target: Target
    rules: frozenset[str]
    report: FileReport
    checkpoint: Any | None = None
    progress: Progress | None = None
    chunk_bytes: int = CHUNK_BYTES
    nonfinite_alphas: set[str] = field(default_factory=set)
    deployment: Any | None = None
    copy_differences: list[Any] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The target as given on the command line; findings are about this path by default."""
        return self.target.path

    def runs(self, prefix: str) -> bool:
        """Whether any enabled rule starts with ``prefix`` (``LT2``: some value rule runs)."""
        return any(code.startswith(prefix) for code in self.rules)

    def add(
        self,
        code: str,
        message: str,
        *,
        module: str | None = None,
        expected: object = None,
        found: object = None,
        hint: str | None = None,
        path: str | None = None,
    ) -> None:
        """Record a finding of rule ``code``, unless that rule is disabled."""
        if code not in self.rules:
            return
        self.report.findings.append(
            Finding(
                RULES[code],
                path or self.path,
                message,
                module=module,
                expected=None if expected is None else str(expected),
                found=None if found is None else str(found),
                hint=hint,
            )
        )

    def has_errors(self, prefix: str) -> bool:
        """Whether an error-severity finding of a rule starting with ``prefix`` was recorded."""
        return any(
            f.rule.code.startswith(prefix) and f.severity == ERROR for f in self.report.findings
        )


def fmt_shape(shape: Sequence[int]) -> str:
    """``[4, 16]``: a tensor shape as messages spell it."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def fmt_number(value: float) -> str:
    """``8`` for integral values, else the shortest ``%g`` spelling (``0.5``)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
