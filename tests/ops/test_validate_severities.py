"""Rule severities follow the principle in docs/rules.md ("Severities"): where the consumer
silently drops or misapplies weights, the rule is an error. The consumers themselves (PEFT,
diffusers) are the oracles here: each test shows the loss happening, then that validate fails.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_tools.ops.validate import validate
from lora_tools.ops.validate.rules import RULES

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
LLAMA_LORA = FIXTURES / "peft" / "llama-lora"
TINY_LLAMA = FIXTURES / "bases" / "tiny-llama"


def errors(report) -> list[str]:
    return sorted(f.rule.code for f in report.findings if f.severity == "error")


def peft_copy(tmp_path: Path, **config_changes) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(LLAMA_LORA, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(config_changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def peft_load(folder: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
    return PeftModel.from_pretrained(base, folder)


def test_uncovered_module_is_dropped_by_peft_and_is_an_error(tmp_path):
    folder = peft_copy(tmp_path, target_modules=["q_proj", "k_proj", "v_proj"])
    saved = load_file(folder / "adapter_model.safetensors")
    assert any(".o_proj.lora_A" in k for k in saved)
    model = peft_load(folder)
    layers = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert layers and not any(n.endswith("o_proj") for n in layers)  # PEFT dropped them

    report = validate([folder])
    assert errors(report) == ["LT307", "LT307"]
    assert report.failed()


def test_zero_peft_alpha_makes_an_adapter_with_no_effect_and_is_an_error(tmp_path):
    folder = peft_copy(tmp_path, lora_alpha=0)
    model = peft_load(folder)
    scalings = [
        m.scaling["default"]
        for m in model.modules()
        if isinstance(getattr(m, "scaling", None), dict)
    ]
    assert scalings and all(s == 0 for s in scalings)  # every update multiplied by 0

    report = validate([folder])
    assert "LT106" in errors(report)
    assert report.failed()


def test_zero_kohya_alpha_is_scale_zero_in_diffusers_and_is_an_error(tmp_path):
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
    )

    source = load_file(FIXTURES / "kohya" / "sd-lora.safetensors")
    tensors = {k: (np.zeros_like(v) if k.endswith(".alpha") else v) for k, v in source.items()}
    path = tmp_path / "alpha-zero.safetensors"
    save_file(tensors, path)

    # diffusers' kohya loader: scale alpha / r = 0, the update is dropped (sd-scripts would
    # read the same alpha as scale 1)
    unet_part = {k: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("lora_unet")}
    state, alphas = _convert_non_diffusers_lora_to_diffusers(unet_part)
    unet = UNet2DConditionModel.from_pretrained(FIXTURES / "bases" / "tiny-sd" / "unet")
    unet.load_lora_adapter(
        {k: v for k, v in state.items() if k.startswith("unet.")},
        network_alphas={k: v for k, v in alphas.items() if k.startswith("unet.")},
        prefix="unet",
        adapter_name="x",
    )
    scalings = [
        m.scaling["x"] for m in unet.modules() if isinstance(getattr(m, "scaling", None), dict)
    ]
    assert scalings and all(s == 0 for s in scalings)

    report = validate([path])
    assert set(errors(report)) == {"LT106"}
    assert report.failed()


def test_invalid_pattern_key_makes_peft_fail_and_is_an_error(tmp_path):
    folder = peft_copy(tmp_path, alpha_pattern={"(": 3})
    with pytest.raises(re.error):
        peft_load(folder)
    report = validate([folder])
    assert errors(report) == ["LT302"]


def test_unknown_kohya_tensor_is_an_error_bundled_embeddings_are_not(tmp_path):
    source = load_file(FIXTURES / "kohya" / "sd-lora.safetensors")
    stray = tmp_path / "stray.safetensors"
    save_file({**source, "lora_unet_extra.weight": np.ones((2, 2), np.float32)}, stray)
    report = validate([stray])
    assert errors(report) == ["LT112"] and report.failed()

    bundled = tmp_path / "bundled.safetensors"
    embedding = {"bundle_emb.mytoken.string_to_param.*": np.ones((2, 768), np.float32)}
    save_file({**source, **embedding}, bundled)
    assert validate([bundled]).findings == []


def test_intact_files_with_unmatched_pattern_keys_still_pass_as_errors(tmp_path):
    # PEFT saves the alpha_pattern it was given verbatim, also for layers it never targeted:
    # the adapter loads as trained, so this must not fail validate.
    folder = peft_copy(tmp_path, alpha_pattern={"lm_head": 16})
    peft_load(folder)
    report = validate([folder])
    assert [f.rule.code for f in report.findings] == ["LT305"]
    assert not report.failed()


SEVERITY_CHANGES = {"LT106": "error", "LT112": "error", "LT307": "error", "LT206": "info"}


@pytest.mark.parametrize("code", sorted(SEVERITY_CHANGES))
def test_catalogue_severities(code):
    assert RULES[code].severity == SEVERITY_CHANGES[code]


@pytest.mark.parametrize("exclude", [["o_proj"], r".*\.o_proj"])
def test_excluded_module_is_dropped_by_peft_and_is_an_error(tmp_path, exclude):
    folder = peft_copy(tmp_path, exclude_modules=exclude)
    model = peft_load(folder)
    layers = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert layers and not any(n.endswith("o_proj") for n in layers)  # PEFT dropped them

    report = validate([folder])
    assert errors(report) == ["LT307", "LT307"]
    assert all("exclude_modules" in f.message for f in report.findings)


def _peft_adapter(tmp_path: Path, config) -> Path:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
    folder = tmp_path / type(config).__name__
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def _other_peft_types():
    from peft import IA3Config, LoHaConfig, LoKrConfig

    return {
        "LoHa": LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
        "LoKr": LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]),
        "IA3": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }


@pytest.mark.parametrize("kind", ["LoHa", "LoKr", "IA3"])
def test_intact_peft_adapters_of_other_types_pass(tmp_path, kind):
    folder = _peft_adapter(tmp_path, _other_peft_types()[kind])
    report = validate([folder], base=TINY_LLAMA)
    # loratool computes them from the config (lora_tools.deltas.peft_types): no LT110; PEFT's
    # default init leaves LoHa's and LoKr's update zero: untrained (LT202), as a LoRA's
    zero = kind in ("LoHa", "LoKr")
    assert [f.rule.code for f in report.findings] == (["LT202"] if zero else [])
    assert zero or not report.failed("warning")
    # their modules are resolved against the base all the same
    wrong = validate([folder], base=FIXTURES / "bases" / "tiny-sd", ignore="LT2")
    assert "LT404" in errors(wrong)

    # the same tensors under peft_type LORA: PEFT would create LoRA layers and drop them
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    assert "LT303" in errors(validate([folder]))
