"""README's "Where each adapter feature loads" table: every cell is what the profile says.

The table is parsed from README.md. For each cell, the row's feature is built into an adapter:
a PEFT folder saved by real PEFT on a tiny Llama (tests/ops/profile_adapters.py) for the serving
engines and PEFT, a pipeline LoRA file (tests/ops/pipeline_adapters.py) for diffusers and
ComfyUI. ``validate --profile`` of the column's consumer must then give:

- *yes*: no ``LT5xx`` finding (with ``(from VERSION)``: none at that version, and a finding at the
  oldest version checked);
- *no*: an ``LT5xx`` error other than the consumer's "does not load this kind of file" rule;
- *n/a*: that rule alone.

The profiles' own verdicts are checked against the consumers (diffusers and PEFT run, the others'
loading code) in tests/ops/test_profiles.py and tests/ops/test_profiles_pipelines.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_tools.consumers import consumers, fmt_version
from lora_tools.ops.validate import validate
from tests.ops import pipeline_adapters, profile_adapters

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| feature | PEFT |"

#: The rule each consumer reports for a file it does not load at all.
NOT_ITS_FILES = {
    "vllm": "LT501",
    "sglang": "LT511",
    "tgi": "LT521",
    "llamacpp": "LT531",
    "diffusers": "LT541",
    "comfyui": "LT551",
    "peft": "LT561",
}
PIPELINE_CONSUMERS = ("diffusers", "comfyui")

#: feature (the row's first cell) -> (PEFT adapter for the serving engines and PEFT, pipeline
#: file for diffusers and ComfyUI); None: the other kind's adapter (n/a cells).
ADAPTERS = {
    "plain LoRA": ("clean", "kohya"),
    "`rank_pattern` / `alpha_pattern`": ("patterns", "diffusers-patterns"),
    "rsLoRA (`use_rslora`)": ("rslora", "diffusers-rslora"),
    "DoRA, PEFT names (`lora_magnitude_vector`)": ("dora", "diffusers-dora"),
    "DoRA, kohya names (`dora_scale`)": (None, "kohya-dora"),
    "LoRA bias (`lora_bias`)": ("lora-bias", None),
    "bias difference (`diff_b`)": (None, "kohya-diff-b"),
    "`modules_to_save`": ("modules-to-save", None),
    "embedding LoRA": ("embedding", None),
    "base-changing init (PiSSA, OLoRA...)": ("pissa", None),
    "LoHa, SD kohya names": (None, "loha"),
    "LoKr, SD kohya names": (None, "lokr"),
    "kohya names, SD": (None, "kohya"),
    "kohya names, alpha on some modules only": (None, "kohya-partial-alpha"),
    "diffusers names (`unet.` / `text_encoder.`, `lora_A` / `lora_B`)": (None, "diffusers"),
    "diffusers names, mixed ranks, no `lora_adapter_metadata`": (None, "diffusers-mixed-ranks"),
    "old diffusers names (attention processors)": (None, "diffusers-old"),
}


def table() -> tuple[list[str], list[list[str]]]:
    """The consumers (profile names, in column order) and the rows of cells."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    titles = {c.title: c.name for c in consumers().values()}
    columns = [titles[t.strip()] for t in lines[start].strip("|").split("|")[1:]]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return columns, rows


COLUMNS, ROWS = table()
CELLS = [
    (row[0], consumer, mark)
    for row in ROWS
    for consumer, mark in zip(COLUMNS, row[1:], strict=False)  # widths: the test below
]


def test_table_covers_every_consumer_and_feature():
    assert sorted(COLUMNS) == sorted(consumers())
    assert [row[0] for row in ROWS] == list(ADAPTERS)
    assert all(len(row) == len(COLUMNS) + 1 for row in ROWS)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("support-table")
    (root / "pipeline").mkdir()
    out = dict(pipeline_adapters.make_files(root / "pipeline"))
    for llm, _ in ADAPTERS.values():
        if llm is not None and llm not in out:
            out[llm] = profile_adapters.make(root / "peft", llm)
    return out


def codes(path: Path, profile: str) -> list[str]:
    report = validate([path], profiles=profile)
    return sorted({f.rule.code for f in report.findings if f.rule.code.startswith("LT5")})


@pytest.mark.parametrize(("feature", "consumer", "mark"), CELLS)
def test_cell(built, feature, consumer, mark):
    llm, pipeline = ADAPTERS[feature]
    name = pipeline if consumer in PIPELINE_CONSUMERS else llm
    name = name if name is not None else (llm or pipeline)
    path = built[name]
    found = codes(path, consumer)
    verdict = re.fullmatch(r"(yes|no|n/a)(?: \(from (\S+)\))?", mark)
    assert verdict, f"cell {mark!r}: expected yes, no, n/a or 'yes (from VERSION)'"
    word, since = verdict.groups()
    if word == "yes":
        assert found == [], found
        if since is not None:
            assert codes(path, f"{consumer}:{since}") == []
            oldest = fmt_version(consumers()[consumer].oldest)
            assert codes(path, f"{consumer}:{oldest}") != []
    elif word == "no":
        assert found and NOT_ITS_FILES[consumer] not in found, found
    else:
        assert found == [NOT_ITS_FILES[consumer]], found
