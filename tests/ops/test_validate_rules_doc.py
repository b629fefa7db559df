"""docs/rules.md documents every rule, in the shape the catalogue promises."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_tools.ops.validate.rules import PROBLEM_RULES, RULES, SEVERITIES

DOC = (Path(__file__).resolve().parents[2] / "docs" / "rules.md").read_text()
SECTIONS = dict(re.findall(r"^### (LT\d{3} [a-z0-9-]+)\n(.*?)(?=^### |^## |\Z)", DOC, re.S | re.M))


def test_every_rule_has_a_section_and_nothing_else_does():
    assert set(SECTIONS) == {f"{r.code} {r.name}" for r in RULES.values()}


@pytest.mark.parametrize("code", sorted(RULES))
def test_section_shape_and_summary_row(code):
    rule = RULES[code]
    body = SECTIONS[f"{rule.code} {rule.name}"]
    for part in ("**What it checks**", "**Why it matters**", "**Example**", "**How to fix**"):
        assert part in body, (code, part)
    row = f"| {rule.code} | {rule.name} | {rule.severity} |"
    assert row in DOC, row
    # GitHub's anchor for "### LT012 truncated" is "lt012-truncated": what SARIF helpUri uses.
    assert rule.anchor == f"{rule.code} {rule.name}".lower().replace(" ", "-")


def test_catalogue_invariants():
    assert all(r.severity in SEVERITIES for r in RULES.values())
    assert len({r.name for r in RULES.values()}) == len(RULES)
    assert set(PROBLEM_RULES.values()) <= set(RULES)
    # every Problem.kind the io layer emits has a rule
    package = Path(__file__).resolve().parents[2] / "lora_tools" / "io" / "safetensors"
    sources = [path.read_text() for path in sorted(package.glob("*.py"))]
    assert len(sources) > 1, package  # the safetensors package, not an empty glob
    io_kinds = {
        kind
        for text in sources
        for kind in re.findall(r'(?:Problem\(\s*|kind=)"([a-z0-9-]+)"', text)
    }
    assert io_kinds - {"dtype-not-decodable"} <= set(PROBLEM_RULES)
