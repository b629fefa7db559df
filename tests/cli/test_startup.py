"""Start-up stays light: ``--help`` and header-only work import neither ml_dtypes nor torch
(nor the gguf package, which only GGUF paths import).

``import ml_dtypes`` takes about 1 s with ml_dtypes 0.7 (it registers its ufunc loops
slowly), so it is imported only when a tensor of one of its dtypes (bf16, fp8, fp4) is decoded.
One subprocess runs every command in turn and reports which heavy modules each one loaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from lora_tools.cli import COMMANDS
from lora_tools.io.safetensors import SafetensorsFile, save_tensors

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ml_dtypes", "torch", "numpy", "gguf")

PROBE = """
import contextlib, io, json, sys
from lora_tools.cli import cli
from lora_tools.cli._common import run

report = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["loratool", *args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            run(cli)
        except SystemExit as exc:
            code = exc.code
    heavy = sorted(m for m in {heavy!r} if m in sys.modules)
    report.append({{"args": args, "code": code, "heavy": heavy, "output": out.getvalue()}})
print(json.dumps(report))
"""


def run_probe(commands: list[list[str]]) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(commands)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bf16_kohya(fixtures_dir: Path, dest: Path) -> Path:
    """fixtures' kohya SD LoRA saved in bf16, alpha tensors included (as sd-scripts saves)."""
    with SafetensorsFile(fixtures_dir / "kohya/sd-lora.safetensors") as f:
        tensors = {n: f.read(n).astype(ml_dtypes.bfloat16) for n in f.header.tensors}
        metadata = {k: v for k, v in (f.header.metadata or {}).items() if not k.startswith("sshs_")}
    save_tensors(dest, tensors, metadata)
    return dest


def fp8_peft(fixtures_dir: Path, dest: Path) -> Path:
    shutil.copytree(fixtures_dir / "peft/llama-lora", dest)
    weights = dest / "adapter_model.safetensors"
    with SafetensorsFile(weights) as f:
        tensors = {n: f.read(n).astype(ml_dtypes.float8_e4m3fn) for n in f.header.tensors}
    save_tensors(weights, tensors)
    return dest


def test_help_and_header_only_work_import_neither_ml_dtypes_nor_torch(fixtures_dir, tmp_path):
    kohya = bf16_kohya(fixtures_dir, tmp_path / "sd-lora-bf16.safetensors")
    fp8 = fp8_peft(fixtures_dir, tmp_path / "llama-lora-fp8")
    f = fixtures_dir
    helps = [["--help"]] + [[name, "--help"] for name in sorted(COMMANDS)]
    header_only = [
        ["inspect", str(f / "peft/llama-lora-bf16")],
        ["inspect", str(kohya), "--json"],
        ["inspect", str(fp8)],
        ["inspect", str(f / "kohya/sd-lora.safetensors")],
        ["validate", "--ignore", "LT2", str(f / "peft/llama-lora-bf16"), str(kohya), str(fp8)],
        ["validate", "--ignore", "LT2", str(f / "peft/llama-lora"), "--base",
         str(f / "bases/tiny-llama-bf16")],
        ["push", str(f / "peft/llama-lora-bf16"), "me/llama-lora", "--dry-run", "--no-validate"],
    ]  # fmt: skip
    report = run_probe(helps + header_only)
    for entry in report[: len(helps)]:  # --help stays at the cost of importing click
        assert entry["code"] in (0, None), entry
        assert entry["heavy"] == [], f"{entry['args']} imported {entry['heavy']}"
    for entry in report[len(helps) :]:
        assert entry["code"] in (0, None), entry
        assert entry["heavy"] == ["numpy"], f"{entry['args']} imported {entry['heavy']}"
    # the bf16 alpha tensors were read without ml_dtypes, and read right
    assert json.loads(report[len(helps) + 1]["output"])["alpha"] == {
        "histogram": {"2": 60},
        "unknown": None,
    }


def test_decoding_a_bf16_tensor_still_works(fixtures_dir, tmp_path):
    """The lazy import is not a missing one: the value rules decode bf16 data in a fresh process."""
    kohya = bf16_kohya(fixtures_dir, tmp_path / "sd-lora-bf16.safetensors")
    (entry,) = run_probe([["validate", str(kohya), "--output-format", "json"]])
    assert entry["code"] == 0, entry
    assert entry["heavy"] == ["ml_dtypes", "numpy"]


def test_gguf_paths_import_gguf_and_nothing_heavier(tmp_path):
    """A GGUF is read through the gguf package, imported for it alone: header-only work on it
    imports neither torch nor ml_dtypes, and neither does decoding its BF16 / Q8_0 values
    (gguf.quants dequantizes them with numpy)."""
    gguf = pytest.importorskip("gguf")
    paths = {}
    for name, qtype in (
        ("bf16", gguf.GGMLQuantizationType.BF16),
        ("q8", gguf.GGMLQuantizationType.Q8_0),
    ):
        path = tmp_path / f"{name}.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 8.0)
        rng = np.random.default_rng(0)
        a = rng.standard_normal((4, 64)).astype(np.float32)
        b = rng.standard_normal((64, 4)).astype(np.float32)
        writer.add_tensor(
            "blk.0.attn_q.weight.lora_a", gguf.quants.quantize(a, qtype), raw_dtype=qtype
        )
        writer.add_tensor("blk.0.attn_q.weight.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths[name] = str(path)
    report = run_probe(
        [
            ["inspect", paths["bf16"], "--json"],
            ["validate", "--ignore", "LT2", paths["q8"]],
            ["validate", "--fail-on", "warning", paths["bf16"], paths["q8"]],
        ]
    )
    for entry in report:
        assert entry["code"] in (0, None), entry
        assert entry["heavy"] == ["gguf", "numpy"], f"{entry['args']} imported {entry['heavy']}"
    assert json.loads(report[0]["output"])["dtypes"] == {"BF16": 1, "F32": 1}
