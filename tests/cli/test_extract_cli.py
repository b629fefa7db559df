"""``loratool extract`` on the command line: exit codes, one-line errors, outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lora_tools.formats import load_adapter
from lora_tools.io.safetensors import SafetensorsFile, save_tensors
from tests.console import run_console

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "fixtures/bases/tiny-llama"
FT = ROOT / "fixtures/finetuned/tiny-llama-ft"


def run(*args: object) -> tuple[int, str, str]:
    """The CLI in-process: exit code, stdout, stderr."""
    r = run_console(*args)
    return r.exit_code, r.stdout, r.stderr


def test_writes_a_peft_folder_and_reports_each_module(tmp_path: Path) -> None:
    code, out, err = run("extract", BASE, FT, "-o", tmp_path / "x", "--rank", "3")
    assert code == 0, err
    assert "14 LoRA modules from 21 tensors (5 unchanged" in out
    assert "listed: model.layers.0.input_layernorm.weight [32]" in out
    assert "--keep-diffs stores them" in err
    adapter = load_adapter(tmp_path / "x")
    assert adapter.format == "peft" and set(adapter.ranks) == {3}
    assert all(m.scale == 1.0 for m in adapter.modules.values())
    code, _, _ = run("validate", tmp_path / "x", "--base", BASE, "--fail-on", "warning")
    assert code == 0


def test_json_document(tmp_path: Path) -> None:
    code, out, _ = run("extract", BASE, FT, "-o", tmp_path / "x", "--energy", "0.999", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["command"] == "extract"
    assert doc["counts"]["modules"] == 14 and doc["counts"]["unchanged"] == 5
    assert all(m["retained_energy"] >= 0.999 for m in doc["modules"])
    assert doc["outputs"] == [{"path": str(tmp_path / "x"), "kind": "folder"}]
    assert [i["role"] for i in doc["inputs"]] == ["base", "model"]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--rank", "2", "--energy", "0.9"],
        ["--rank", "0"],
        ["--energy", "1.5"],
        ["--rank", "2", "--max-rank", "4"],
        ["--energy", "0.9", "--min-rank", "5", "--max-rank", "2"],
        ["--rank", "2", "--modules", "("],
        ["--rank", "2", "--device", "tpu"],
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    code, _, err = run("extract", BASE, FT, "-o", tmp_path / "x", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_a_missing_tensor_exits_3_naming_it(tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    shutil.copytree(FT, ft)
    with SafetensorsFile(FT / "model.safetensors") as f:
        tensors = {k: f.read(k) for k in f if k != "model.layers.1.self_attn.k_proj.weight"}
    save_tensors(ft / "model.safetensors", tensors)
    code, _, err = run("extract", BASE, ft, "-o", tmp_path / "x", "--rank", "2")
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert "'model.layers.1.self_attn.k_proj.weight' is in the base but not in the fine-tune" in err
    assert not (tmp_path / "x").exists()


def test_cuda_without_a_gpu_exits_3(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run("extract", BASE, FT, "-o", tmp_path / "x", "--rank", "2", "--device", "cuda")
    assert code == 3 and "--device cuda" in err and len(err.strip().splitlines()) == 1


def test_an_existing_output_needs_force_and_never_an_input(tmp_path: Path) -> None:
    out = tmp_path / "x"
    assert run("extract", BASE, FT, "-o", out, "--rank", "2", "-q")[0] == 0
    code, _, err = run("extract", BASE, FT, "-o", out, "--rank", "3", "-q")
    assert code != 0 and "exists" in err
    assert run("extract", BASE, FT, "-o", out, "--rank", "3", "--force", "-q")[0] == 0
    assert set(load_adapter(out).ranks) == {3}
    code, _, _ = run("extract", BASE, FT, "-o", FT, "--rank", "2", "--force")
    assert code != 0
    with SafetensorsFile(FT / "model.safetensors") as f:
        assert "model.norm.weight" in f  # the fine-tune is untouched


def test_kohya_for_a_single_file_and_dtype(tmp_path: Path) -> None:
    base = ROOT / "fixtures/bases/tiny-flux.safetensors"
    ft = ROOT / "fixtures/finetuned/tiny-flux-ft.safetensors"
    out = tmp_path / "x.safetensors"
    code, _, err = run("extract", base, ft, "-o", out, "--rank", "2", "--dtype", "float32", "-q")
    assert code == 0, err
    adapter = load_adapter(out)
    assert adapter.format == "kohya" and len(adapter.modules) == 6
    with SafetensorsFile(out) as f:
        assert {f.info(k).dtype for k in f if not k.endswith(".alpha")} == {"F32"}
        alphas = [float(np.asarray(f.read(k))) for k in f if k.endswith(".alpha")]
    assert alphas == [2.0] * 6
    assert run("validate", out, "--base", base, "--fail-on", "warning")[0] == 0
