"""``validate --profile diffusers`` on Flux kohya files holding full diffs (``loratool extract
--keep-diffs`` writes them for ComfyUI): diffusers' Flux kohya converter itself is the oracle;
it drops ``diff_b`` (and norm diffs) with an info log only (LT546) and refuses any other
``.diff`` (LT542)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from lora_tools.io.safetensors import SafetensorsFile, save_tensors
from lora_tools.ops.validate import validate

FLUX = Path(__file__).resolve().parents[2] / "fixtures" / "kohya" / "flux-lora.safetensors"
STEM = "lora_unet_double_blocks_0_img_attn_proj"


def with_extra(tmp_path: Path, extra: dict[str, np.ndarray]) -> Path:
    """The fixture without its linear1 module (diffusers' converter hard-codes Flux-dev's
    linear1 split, 3072 x 3 + 12288 rows, which a tiny file cannot match), plus ``extra``."""
    with SafetensorsFile(FLUX) as f:
        tensors = {k: f.read(k) for k in f if "_linear1." not in k}
        width = f.info(f"{STEM}.lora_up.weight").shape[0]
    out = tmp_path / "flux.safetensors"
    save_tensors(out, {**tensors, **{k: v(width) for k, v in extra.items()}})
    return out


def ones(n: int) -> np.ndarray:
    return np.full(n, 0.01, np.float32)


def square(n: int) -> np.ndarray:
    return np.full((n, n), 0.01, np.float32)


def profile_codes(path: Path) -> list[str]:
    report = validate([path], profiles="diffusers")
    return sorted({f.rule.code for f in report.findings if f.rule.code.startswith("LT5")})


def diffusers_converts(path: Path, caplog) -> dict:
    diffusers = pytest.importorskip("diffusers")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_propagation()  # its records reach caplog
    caplog.set_level(logging.INFO, logger="diffusers")
    try:
        return diffusers.FluxPipeline.lora_state_dict(str(path))
    finally:
        diffusers_logging.disable_propagation()


def test_a_diff_b_is_dropped_by_diffusers_and_lt546_says_so(tmp_path, caplog) -> None:
    path = with_extra(tmp_path, {f"{STEM}.diff_b": ones})
    state = diffusers_converts(path, caplog)
    assert not any("diff_b" in k or "lora_B.bias" in k for k in state)
    records = [r for r in caplog.records if "diff_b" in r.getMessage()]
    assert records and all(r.levelno == logging.INFO for r in records)  # nothing louder
    assert profile_codes(path) == ["LT546"]


def test_a_weight_diff_is_refused_by_diffusers_and_lt542_says_so(tmp_path, caplog) -> None:
    path = with_extra(tmp_path, {"lora_unet_double_blocks_0_img_mod_lin.diff": square})
    with pytest.raises(ValueError, match="Incompatible keys"):
        diffusers_converts(path, caplog)
    assert profile_codes(path) == ["LT542"]


def test_the_plain_flux_file_loads_and_has_no_finding(tmp_path, caplog) -> None:
    path = with_extra(tmp_path, {})
    state = diffusers_converts(path, caplog)
    assert state and profile_codes(path) == []
