"""``inspect`` takes no base (``--base`` is validate's): given an fp8 base checkpoint of any
scheme instead of an adapter, it refuses it as it refuses the float model, in one line that
points to ``validate --base``, reading headers only; no scale tensor makes the base look like
an adapter format."""

from __future__ import annotations

import re
import shutil

from tests.cli.test_startup import run_probe
from tests.ops.test_validate_fp8_base import (
    BASES,
    comfy_flux,
    comfy_legacy_llama,
    ct_base,
    flux_float,
    hf_block_base,
    plain_llama_base,
)


def _normal(entry: dict) -> tuple[int, str]:
    """Exit code and message, the path and the keys it quotes taken out."""
    (line,) = entry["output"].strip().splitlines()
    line = line.replace(entry["args"][1], "PATH")
    return entry["code"], re.sub(r"first keys: .*? \(hint", "first keys: ... (hint", line)


def test_inspect_refuses_every_fp8_base_as_it_refuses_the_float_one(tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "llama"
    shutil.copytree(BASES / "tiny-llama-sharded", sharded)
    shutil.copytree(BASES / "tiny-llama", single)
    flux = flux_float(tmp_path / "flux.safetensors")
    pairs = [
        (sharded, hf_block_base(tmp_path / "hf")),
        (single, ct_base(tmp_path / "ct-tensor", "tensor")),
        (single, ct_base(tmp_path / "ct-channel", "channel")),
        (single, plain_llama_base(tmp_path / "plain", "F8_E4M3")),
        (single / "model.safetensors", comfy_legacy_llama(tmp_path / "legacy-llama.safetensors")),
        (flux, comfy_flux(tmp_path / "legacy.safetensors", "legacy")),
        (flux, comfy_flux(tmp_path / "metadata.safetensors", "metadata")),
        (flux, comfy_flux(tmp_path / "quant.safetensors", "comfy_quant")),
    ]
    commands = [
        ["inspect", str(base), *extra]
        for pair in pairs
        for base in pair
        for extra in ([], ["--json"])
    ]
    report = run_probe(commands)
    for entry in report:
        assert entry["heavy"] == ["numpy"], f"{entry['args']} imported {entry['heavy']}"
        assert entry["code"] in (2, 3) and "Traceback" not in entry["output"], entry
    for on_float, on_fp8 in zip(
        report[0::4] + report[1::4], report[2::4] + report[3::4], strict=True
    ):
        assert _normal(on_fp8) == _normal(on_float), (on_fp8["args"], on_float["args"])
    single_files = [e for e in report if e["code"] == 3]
    assert len(single_files) == len(report) - 4  # all but the sharded pair: "which file?"
    for entry in single_files:
        assert "inspect reads LoRA adapters, not base models" in entry["output"]
        assert "`loratool validate ADAPTER --base BASE`" in entry["output"]
