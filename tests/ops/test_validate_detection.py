"""validate detects a file's format exactly as loading it does (one detection, in formats/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tools.formats import detect_format, open_source
from lora_tools.ops.validate import validate

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
ADAPTERS = sorted(
    p.relative_to(FIXTURES).as_posix()
    for family in ("peft", "diffusers", "kohya", "diffusers-old")
    for p in (FIXTURES / family).iterdir()
)


def test_every_format_family_has_fixtures():
    assert {a.split("/")[0] for a in ADAPTERS} == {"peft", "diffusers", "kohya", "diffusers-old"}


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_validate_reports_the_format_loading_detects(adapter):
    path = FIXTURES / adapter
    report = validate([path], select="LT1")
    assert [f.format for f in report.files] == [detect_format(open_source(path)).name]
