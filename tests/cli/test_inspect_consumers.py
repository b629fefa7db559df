"""``loratool inspect --consumers``: the table, the ``--json`` object (against its schema), and
that it stays header-only. The numbers themselves are proven in tests/ops/test_consumer_scales.py
against PEFT and diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.results import json_schema
from tests.cli.test_startup import bf16_kohya, run_probe

FIX = Path(__file__).resolve().parents[2] / "fixtures"
PATTERNS = FIX / "peft/llama-patterns"


def invoke(*args: object) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_table_marks_the_serving_engines_that_ignore_the_patterns():
    text = invoke("inspect", PATTERNS, "--consumers")
    assert "scale per consumer" in text
    rows = {
        line.split("│")[1].strip(): line
        for line in text.splitlines()
        if "│" in line and "self_attn" in line
    }
    cells = [c.strip() for c in rows["model.layers.0.self_attn.o_proj"].split("│")[2:-1]]
    # rank, loratool, PEFT, vLLM, SGLang, TGI, llama.cpp
    assert cells == ["4", "0.75", "0.75", "2 !", "2 !", "2 !", "2 !"]
    cells = [c.strip() for c in rows["model.layers.0.self_attn.q_proj"].split("│")[2:-1]]
    assert cells == ["2", "4", "4", "2 !", "2 !", "2 !", "4"]
    assert "!" not in rows["model.layers.0.self_attn.k_proj"]
    assert "vLLM: one scale for every module: lora_alpha / r; rank_pattern / alpha_pattern" in text
    assert "diffusers: does not load it" in text and "ComfyUI: does not load it" in text
    assert "5 of 8 modules are scaled differently" in text


def test_agreeing_kohya_file_says_so():
    text = invoke("inspect", FIX / "kohya/sd-lora.safetensors", "--consumers")
    assert "every consumer that loads it applies loratool's scale to every module" in text
    assert "!" not in text.split("scale per consumer")[1].split("\n", 2)[2]
    for title in ("vLLM", "SGLang", "TGI", "llama.cpp", "PEFT"):
        assert f"{title}: does not load it" in text


def test_json_object_validates_and_holds_the_scales():
    jsonschema = pytest.importorskip("jsonschema")
    doc = json.loads(invoke("inspect", PATTERNS, "--json", "--consumers"))
    jsonschema.validate(doc, json_schema("inspect"))
    table = doc["consumers"]
    assert [c["name"] for c in table["consumers"]] == [
        "peft", "diffusers", "comfyui", "vllm", "sglang", "tgi", "llamacpp"
    ]  # fmt: skip
    assert all(c["source"] for c in table["consumers"])
    rows = {r["module"].rsplit("layers.", 1)[1]: r for r in table["modules"]}
    v_proj = rows["1.self_attn.v_proj"]
    assert v_proj["rank"] == 6 and v_proj["intended"] == 8 / 6
    assert v_proj["scales"] == {
        "peft": 8 / 6, "vllm": 2.0, "sglang": 2.0, "tgi": 2.0, "llamacpp": 8 / 6
    }  # fmt: skip
    assert v_proj["differ"] == ["vllm", "sglang", "tgi"]
    assert table["disagreements"] == 5
    plain = json.loads(invoke("inspect", PATTERNS, "--json"))
    assert plain["consumers"] is None
    jsonschema.validate(plain, json_schema("inspect"))


def test_embedding_left_out_by_tgi_is_shown_as_skipped():
    text = invoke("inspect", FIX / "peft/llama-embedding", "--consumers")
    row = next(line for line in text.splitlines() if "embed_tokens" in line and "│" in line)
    assert "skipped" in row and "!" not in row


def test_consumers_is_header_only(tmp_path):
    kohya = bf16_kohya(FIX, tmp_path / "sd-lora-bf16.safetensors")
    report = run_probe(
        [
            ["inspect", str(PATTERNS), "--consumers"],
            ["inspect", str(kohya), "--consumers", "--json"],
        ]
    )
    for entry in report:
        assert entry["code"] in (0, None), entry
        assert entry["heavy"] == ["numpy"], f"{entry['args']} imported {entry['heavy']}"
    scales = json.loads(report[1]["output"])["consumers"]["modules"][0]["scales"]
    assert scales == {"diffusers": 0.5, "comfyui": 0.5}  # bf16 alpha 2 read without ml_dtypes
