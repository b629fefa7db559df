"""``loratool convert ADAPTER --for vllm|sglang|llamacpp``: output, JSON, exit codes, refusals."""

from __future__ import annotations

import hashlib
import json

import pytest

from lora_tools.formats import load_adapter
from lora_tools.results import json_schema
from tests.console import run_console

invoke = run_console


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("target", ["vllm", "sglang", "llamacpp"])
def test_writes_a_peft_folder_that_validates(fixtures_dir, tmp_path, target):
    src = fixtures_dir / "peft/llama-patterns"
    before = digest(src)
    out = tmp_path / "out"
    result = invoke("convert", src, "--for", target, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"peft -> peft for {target}, 8 modules at rank 6" in result.output
    assert "7 modules zero-padded from rank 2, 4 to 6" in result.output
    assert digest(src) == before  # the input is untouched
    adapter = load_adapter(out)
    assert adapter.ranks == {6: 8} and {m.scale for m in adapter.modules.values()} == {1.0}
    checked = invoke("validate", out, "--fail-on", "warning")
    assert checked.exit_code == 0, checked.output


def test_json_document_follows_the_convert_schema(fixtures_dir, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "out"
    result = invoke(
        "convert", fixtures_dir / "peft/llama-rslora", "--for", "vllm", "-o", out, "--json"
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    jsonschema.validate(doc, json_schema("convert"))
    assert (doc["to"], doc["for"], doc["rank"]) == ("peft", "vllm", 4)
    assert doc["counts"]["rescaled"] == 8 and doc["counts"]["padded"] == 0
    assert doc["server"] == {"max_lora_rank": 8}
    row = doc["modules"][0]
    assert row["scale"] == pytest.approx(8 / 2) and row["rescaled"] and not row["padded"]
    assert doc["outputs"] == [{"path": str(out), "kind": "folder"}]


@pytest.mark.parametrize(
    ("name", "args", "words"),
    [
        ("llama-dora", [], "is DoRA"),
        ("llama-modules-to-save", [], "'base_model.model.lm_head.weight'"),
        ("llama-bias", [], "lora_B bias"),
        ("llama-all-linear", ["--max-lora-rank", "1"], "rank is 8, above --max-lora-rank 1"),
    ],
)
def test_refusals_exit_3_with_one_line_and_write_nothing(fixtures_dir, tmp_path, name, args, words):
    out = tmp_path / "out"
    result = invoke("convert", fixtures_dir / "peft" / name, "--for", "vllm", "-o", out, *args)
    assert result.exit_code == 3, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratool: error:"), result.output
    assert words in lines[0] and "hint:" in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "OUT"],  # neither --to nor --for
        ["--to", "peft", "--for", "vllm", "-o", "OUT"],
        ["--for", "vllm", "--max-lora-rank", "12", "-o", "OUT"],  # no vLLM size
        ["--for", "llamacpp", "--max-lora-rank", "16", "-o", "OUT"],
        ["--to", "peft", "--max-lora-rank", "16", "-o", "OUT"],
    ],
)
def test_usage_errors_exit_2(fixtures_dir, tmp_path, args):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = invoke("convert", fixtures_dir / "peft/llama-lora", *args)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "out").exists()


def test_kohya_input_needs_its_base(fixtures_dir, tmp_path):
    kohya = tmp_path / "llama.safetensors"
    assert (
        invoke(
            "convert", fixtures_dir / "peft/llama-patterns", "--to", "kohya", "-o", kohya
        ).exit_code
        == 0
    )
    result = invoke("convert", kohya, "--for", "sglang", "-o", tmp_path / "a")
    assert result.exit_code == 2 and "--base" in result.output
    result = invoke(
        "convert",
        kohya,
        "--for",
        "sglang",
        "-o",
        tmp_path / "b",
        "--base",
        fixtures_dir / "bases/tiny-llama",
    )
    assert result.exit_code == 0, result.output
    assert load_adapter(tmp_path / "b").ranks == {6: 8}
