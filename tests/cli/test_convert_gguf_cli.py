"""``loratool convert ADAPTER --to gguf``: the file, the JSON document, exit codes and messages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from tests.console import run_console

DATA = Path(__file__).resolve().parents[1] / "data" / "gguf"
SCHEMA = Path(__file__).resolve().parents[2] / "lora_tools" / "schemas" / "convert.json"


invoke = run_console


def _facts(name: str) -> dict:
    return json.loads((DATA / "facts" / name).read_text())


def test_writes_the_scripts_file(tmp_path):
    """The uniform Llama adapter at --outtype q8_0: the bytes convert_lora_to_gguf.py wrote."""
    out = tmp_path / "llama.gguf"
    result = invoke(
        "convert", DATA / "adapters/llama", "--to", "gguf", "-o", out,
        "--base", DATA / "bases/llama", "--outtype", "q8_0",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"wrote {out}: peft -> gguf (llama, q8_0), 15 modules\n"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == _facts("llama.q8_0.json")["file_sha256"]
    check = invoke("validate", "--fail-on", "warning", out)
    assert check.exit_code == 0, check.stdout + check.stderr


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_every_outtype_passes_validate_and_inspect_reads_it(tmp_path, outtype):
    """What convert writes passes `validate --fail-on warning`; inspect shows llama.cpp's
    alpha / r per module and the GGML types written."""
    out = tmp_path / f"patterns.{outtype}.gguf"
    result = invoke(
        "convert", DATA / "adapters/llama-patterns", "--to", "gguf", "-o", out,
        "--base", DATA / "bases/llama", "--outtype", outtype,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    check = invoke("validate", "--fail-on", "warning", out, "--output-format", "json")
    assert check.exit_code == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["files"][0]["format"] == "gguf"
    shown = invoke("inspect", out, "--json")
    assert shown.exit_code == 0, shown.stderr
    doc = json.loads(shown.stdout)
    jsonschema = pytest.importorskip("jsonschema")
    schemas = SCHEMA.parent
    jsonschema.validate(doc, json.loads((schemas / "inspect.json").read_text()))
    jsonschema.validate(
        json.loads(check.stdout), json.loads((schemas / "validate.json").read_text())
    )
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(out)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    ranks = {
        t.name.removesuffix(".lora_b"): int(t.shape[0])
        for t in reader.tensors
        if t.name.endswith(".lora_b")
    }
    assert {row["module"]: row["scale"] for row in doc["modules"]} == {
        stem: alpha / rank for stem, rank in ranks.items()
    }
    assert doc["alpha"]["histogram"] == {f"{alpha:g}": len(ranks)}
    types = {t.tensor_type.name for t in reader.tensors}
    assert set(doc["dtypes"]) == types


def test_json_document(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "p.gguf"
    result = invoke(
        "convert", DATA / "adapters/llama-patterns", "--to", "gguf", "-o", out,
        "--base", DATA / "bases/llama", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stdout
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    assert doc["to"] == "gguf" and doc["architecture"] == "llama" and doc["outtype"] == "f32"
    assert doc["counts"]["modules"] == 14 and doc["counts"]["scales_baked"] == 4
    assert doc["counts"]["tensors"] == 28 and doc["alpha"] == 8.0
    baked = {row["module"]: row["baked"] for row in doc["modules"] if "baked" in row}
    assert baked["base_model.model.model.layers.0.self_attn.k_proj"] == pytest.approx(0.375)
    assert doc["outputs"] == [{"path": str(out), "kind": "file"}]
    assert {ref["role"] for ref in doc["inputs"]} == {"adapter", "config", "base"}


def test_refused_module_is_one_line_exit_3(tmp_path):
    result = invoke(
        "convert", DATA / "adapters/llama-dora", "--to", "gguf", "-o", tmp_path / "d.gguf",
        "--base", DATA / "bases/llama",
    )  # fmt: skip
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratool: error:") and "is DoRA" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_without_base_names_the_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the adapter's base_model_name_or_path is no folder here
    result = invoke("convert", DATA / "adapters/llama", "--to", "gguf", "-o", tmp_path / "x.gguf")
    assert result.exit_code == 2
    assert "needs the base model's config.json" in result.stderr and "--base" in result.stderr


def test_outtype_is_for_gguf_only(tmp_path):
    result = invoke(
        "convert", DATA / "adapters/llama", "--to", "peft", "-o", tmp_path / "p", "--outtype", "f16"
    )
    assert result.exit_code == 2 and "--outtype applies to --to gguf only" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")
    args = ["convert", DATA / "adapters/gemma", "--to", "gguf", "-o", out]
    result = invoke(*args, "--base", DATA / "bases/gemma")
    assert result.exit_code == 3 and "output already exists" in result.stderr
    assert out.read_bytes() == b"old"
    result = invoke(*args, "--base", DATA / "bases/gemma", "--force")
    assert result.exit_code == 0, result.stdout
    assert hashlib.sha256(out.read_bytes()).hexdigest() == _facts("gemma.f32.json")["file_sha256"]


def test_output_inside_the_input_is_refused(tmp_path):
    result = invoke(
        "convert", DATA / "adapters/llama", "--to", "gguf",
        "-o", DATA / "adapters/llama/x.gguf", "--base", DATA / "bases/llama",
    )  # fmt: skip
    assert result.exit_code == 3 and "inside the input folder" in result.stderr
    assert not (DATA / "adapters/llama/x.gguf").exists()
