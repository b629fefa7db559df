"""``validate --profile diffusers`` / ``--profile comfyui``: pipeline LoRA files against the two
loaders' rules.

diffusers is the oracle here: each file is loaded with ``load_lora_weights`` into the tiny SD
pipeline (``tests/consumers.py``) and what diffusers does (refuses it, filters tensors out with a
warning, loads nothing, applies another scale) must be what the profile reports, and a file it
loads right must get no finding. ComfyUI does not run here (no install): its cases are written
from comfy/lora.py and comfy/weight_adapter/*.py (docs/rules.md names the commits), each case a
different rule.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_tools.formats import load_adapter
from lora_tools.ops.validate import validate
from tests import consumers as oracle
from tests.ops.pipeline_adapters import ONE_MODULE, SD, SD_KOHYA, make_files


def profile_codes(path: Path, profile: str) -> list[str]:
    report = validate([path], profiles=profile)
    assert not [f for f in report.findings if not f.rule.code.startswith(("LT5", "LT1"))]
    return sorted({f.rule.code for f in report.findings if f.rule.code.startswith("LT5")})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_files(tmp_path_factory.mktemp("pipeline-profiles"))


# what diffusers 0.42.1 does with each file (measured by the oracle test below), and the
# profile's finding for it
DIFFUSERS = {
    "kohya": ("loads", []),
    "kohya-noalpha": ("loads", []),
    "locon": ("loads", []),
    "diffusers": ("loads", []),
    "diffusers-old": ("loads", []),
    "diffusers-dora": ("loads", []),
    "diffusers-rslora": ("loads", []),
    "diffusers-patterns": ("loads", []),
    "diffusers-text-model": ("loads", []),
    "diffusers-mixed-ranks": ("loads", []),  # 0.40 on: every alpha mirrors its rank
    "loha": ("refuses", ["LT542"]),
    "lokr": ("refuses", ["LT542"]),
    "kohya-diff-b": ("refuses", ["LT542"]),
    "kohya-dora": ("drops dora_scale", ["LT543"]),
    "peft-unet": ("loads nothing", ["LT541"]),
    "peft-llama": ("loads nothing", ["LT541"]),
    "kohya-extra-key": ("loads nothing", ["LT544"]),
    "kohya-partial-alpha": ("other scale", ["LT545"]),
}


def diffusers_verdict(path: Path) -> str:
    """What ``load_lora_weights`` does with the file on the tiny SD pipeline."""
    from peft.tuners.lora import LoraLayer

    pipe = oracle.model_copy("pipeline", SD)
    try:
        with oracle.captured() as messages:
            pipe.load_lora_weights(str(path), adapter_name="x")
    except ValueError as exc:
        assert "have not been correctly renamed" in str(exc)
        return "refuses"
    named = {
        f"{comp}.{name}": layer
        for comp in ("unet", "text_encoder")
        for name, layer in getattr(pipe, comp).named_modules()
        if isinstance(layer, LoraLayer)
    }
    layers = list(named.values())
    if not layers:
        return "loads nothing"
    if any("DoRA checkpoint" in m for m in messages):
        return "drops dora_scale"
    adapter = load_adapter(path)
    intended = {round(m.scale, 9) for m in adapter.modules.values()}
    if adapter.format == "kohya" and any(m.alpha is None for m in adapter.modules.values()):
        # a module without alpha is scale 1 as kohya and ComfyUI read it; diffusers gives it
        # the common alpha: the layers' scales are not the file's
        served = {round(layer.scaling["x"], 9) for layer in layers}
        return "loads" if served == intended else "other scale"
    if adapter.format == "diffusers":
        # transformers 5 names the text encoder's modules without text_model.
        scales = {key: layer.scaling["x"] for key, layer in named.items()}
        wrong = [
            k
            for k, m in adapter.modules.items()
            if not math.isclose(scales[k.replace(".text_model.", ".", 1)], m.scale)
        ]
        if len(named) != len(adapter.modules):
            return "loads part"
        if wrong:
            return "other scale"
    for layer in layers:
        dora = layer.lora_magnitude_vector
        assert ("x" in dora) == adapter.modules[next(iter(adapter.modules))].dora
    return "loads"


@pytest.mark.oracle
@pytest.mark.parametrize("name", sorted(DIFFUSERS))
def test_diffusers_profile_matches_what_diffusers_does(files, name):
    verdict, expected = DIFFUSERS[name]
    assert diffusers_verdict(files[name]) == verdict
    assert profile_codes(files[name], "diffusers") == expected


def test_diffusers_scale_finding_names_both_scales(files):
    report = validate([files["kohya-partial-alpha"]], profiles="diffusers")
    (finding,) = [f for f in report.findings if f.rule.code == "LT545"]
    # kohya / ComfyUI: no alpha means scale 1; diffusers gives the module the common alpha 2 / 4
    assert finding.module == ONE_MODULE
    assert (finding.expected, finding.found) == ("1", "0.5")


def test_diffusers_before_0_40_scales_mixed_ranks_by_the_first_rank(files):
    # measured with diffusers 0.39.0 (its wheel, in a separate environment, on this file): the
    # text encoder's first lora_B key has rank 2, so its rank-4 modules run at 2 / 4; the
    # UNet's first has rank 4, so its rank-2 attn2 modules run at 4 / 2. From 0.40 all are 1.
    path = files["diffusers-mixed-ranks"]
    assert profile_codes(path, "diffusers") == []
    report = validate([path], profiles="diffusers:0.39")
    (finding,) = report.findings
    assert finding.rule.code == "LT545" and "23 module(s)" in finding.message
    assert finding.module == "text_encoder.encoder.layers.0.self_attn.out_proj"
    assert (finding.expected, finding.found) == ("1", "0.5")
    assert profile_codes(path, "diffusers:0.40") == []
    from lora_tools.consumers.diffusers import first_rank_scales

    unet = [m for m in load_adapter(path).modules.values() if m.component == "unet"]
    assert {m.rank: s for m in unet for k, s in first_rank_scales(unet).items() if k == m.key} == {
        4: 1.0,
        2: 2.0,
    }


# ComfyUI (read, not run): load_lora reads the spellings of comfy/weight_adapter/lora.py and the
# LyCORIS types, drops every other tensor with "lora key not loaded", and scales by the .alpha
# tensor alone
COMFYUI = {
    "kohya": [],
    "kohya-noalpha": [],
    "kohya-partial-alpha": [],  # no alpha: scale 1, as kohya meant
    "kohya-extra-key": [],
    "kohya-diff-b": [],
    "locon": [],
    "loha": [],
    "lokr": [],
    "kohya-dora": [],  # dora_scale: weight_decompose
    "diffusers-old": [],  # unet ...processor.to_q_lora, text_encoder.text_model...
    # alpha only in lora_adapter_metadata (PR 15830); unet ...attn1.to_q and text_encoder.
    # encoder.layers... (no text_model.) are in no key map
    "diffusers": ["LT554"],
    "diffusers-rslora": ["LT554"],
    "diffusers-patterns": ["LT554"],
    "diffusers-dora": ["LT552", "LT554"],  # lora_magnitude_vector is not read
    # text_encoder.text_model... maps, at scale 1 instead of 2 (the unet attention does not)
    "diffusers-text-model": ["LT553", "LT554"],
    "diffusers-mixed-ranks": ["LT554"],
    "peft-unet": ["LT551"],
    "peft-llama": ["LT551"],
}


@pytest.mark.parametrize("name", sorted(COMFYUI))
def test_comfyui_verdicts(files, name):
    assert profile_codes(files[name], "comfyui") == COMFYUI[name]


def test_comfyui_unread_tensors_are_named(files):
    report = validate([files["diffusers-dora"]], profiles="comfyui")
    (finding,) = [f for f in report.findings if f.rule.code == "LT552"]
    assert finding.module.endswith(".lora_magnitude_vector") and "40 tensor(s)" in finding.message


def test_comfyui_unmapped_modules(files):
    from lora_tools.consumers.comfyui import diffusers_name_unmapped, module_stem

    report = validate([files["diffusers"]], profiles="comfyui")
    (finding,) = [f for f in report.findings if f.rule.code == "LT554"]
    assert "40 of 40" in finding.message
    # what model_lora_keys_unet / model_lora_keys_clip map, and what they do not
    unet = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert diffusers_name_unmapped(f"{unet}.to_q.lora_B.weight")
    assert diffusers_name_unmapped(f"{unet}.to_out.0.lora_B.weight")
    assert not diffusers_name_unmapped(f"{unet}.processor.to_q_lora.up.weight")
    assert not diffusers_name_unmapped("unet.down_blocks.1.attentions.0.proj_in.lora_B.weight")
    te = "text_encoder.text_model.encoder.layers.3.self_attn.q_proj"
    assert not diffusers_name_unmapped(f"{te}.lora_linear_layer.up.weight")
    assert diffusers_name_unmapped("text_encoder.encoder.layers.3.self_attn.q_proj.lora_B.weight")
    assert diffusers_name_unmapped("text_encoder.text_model.embeddings.token_embedding.lora_B")
    assert module_stem(f"{unet}.processor.to_q_lora.up.weight") == f"{unet}.processor.to_q"


def test_comfyui_scale_finding_values(files):
    report = validate([files["diffusers-text-model"]], profiles="comfyui")
    (finding,) = [f for f in report.findings if f.rule.code == "LT553"]
    # the text encoder's lora_alpha 8 at r 4 is 2 in diffusers, 1 in ComfyUI
    assert finding.found == "1" and math.isclose(float(finding.expected), 2.0)
    assert "8 module(s)" in finding.message and finding.module.startswith("text_encoder.")
    (unmapped,) = [f for f in report.findings if f.rule.code == "LT554"]
    assert "32 of 40" in unmapped.message


def test_comfyui_spellings_cover_what_loratool_writes(tmp_path):
    # every tensor loratool writes for ComfyUI, kohya and diffusers is one load_lora reads
    from lora_tools.consumers.comfyui import tensor_read
    from lora_tools.formats import save_adapter
    from lora_tools.ops.convert import convert_adapter

    for fmt in ("comfyui", "kohya", "diffusers"):
        result = convert_adapter(load_adapter(SD_KOHYA), fmt, base=SD)
        out = save_adapter(result.adapter, tmp_path / f"{fmt}.safetensors")
        names = list(load_file(out))
        assert names and all(tensor_read(k) for k in names), fmt


def test_xlabs_flux_files_are_left_to_the_flux_loader(tmp_path):
    # diffusers' FluxLoraLoaderMixin converts XLabs names (_convert_xlabs_flux_lora_to_diffusers)
    rng = np.random.default_rng(0)
    tensors = {
        "double_blocks.0.processor.proj_lora1.up.weight": rng.normal(size=(64, 4)),
        "double_blocks.0.processor.proj_lora1.down.weight": rng.normal(size=(4, 64)),
    }
    path = tmp_path / "xlabs.safetensors"
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, path)
    assert load_adapter(path).format == "xlabs"
    assert profile_codes(path, "diffusers") == []


def test_flux_kohya_files_take_the_flux_converter():
    # _convert_kohya_flux_lora_to_diffusers bakes each alpha into the factors (no tiny Flux
    # pipeline here; tests/ops/test_consumer_scales.py runs the converter): no LT542 / LT544,
    # though Flux names are none of the SD prefixes' modules
    flux = SD_KOHYA.parent / "flux-lora.safetensors"
    assert profile_codes(flux, "diffusers") == []
    assert profile_codes(flux, "comfyui") == []
