"""The scale each consumer applies to each module (lora_tools.consumers.scales), against the
consumers themselves where they run here and against their code where they do not.

- PEFT: adapters written by real PEFT (``get_peft_model`` + ``save_pretrained`` on the tiny
  Llama) and loaded back with ``PeftModel.from_pretrained``; each LoRA layer's ``.scaling`` is
  the measured scale.
- diffusers: kohya and diffusers files loaded into the tiny SD pipeline with
  ``load_lora_weights``; each injected layer's ``.scaling`` is the measured scale. For Flux
  kohya files (no tiny Flux pipeline here) diffusers' own converter bakes the scale into the
  factors: the measured scale is ``|B' A'| / |up down|``.
- ComfyUI, vLLM, SGLang, TGI, llama.cpp do not run here (no GPU, no ComfyUI install): the
  expected numbers are written out from their loading code (docs/rules.md, LT590, names the
  files), each case a different rule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lora_tools.consumers.scales import CONSUMERS, consumer_scales
from lora_tools.formats import load_adapter
from tests import consumers as oracle

pytestmark = pytest.mark.oracle

FIX = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA = FIX / "bases/tiny-llama"
SD = FIX / "bases/tiny-sd"
SD_KOHYA = FIX / "kohya/sd-lora.safetensors"
P = "base_model.model.model.layers"


def make_peft(tmp: Path, name: str, **config) -> Path:
    """A PEFT adapter folder written by PEFT itself on the tiny Llama."""
    import peft

    model = oracle.model_copy("causal-lm", LLAMA)
    cfg = peft.LoraConfig(init_lora_weights=False, **config)
    out = tmp / name
    peft.get_peft_model(model, cfg).save_pretrained(out)
    return out


def peft_measured(folder: Path) -> dict[str, float]:
    """module key -> the scale PEFT's loaded LoRA layers apply."""
    import peft
    from peft.tuners.lora import LoraLayer

    model = peft.PeftModel.from_pretrained(oracle.model_copy("causal-lm", LLAMA), folder)
    return {
        name: layer.scaling["default"]
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }


def diffusers_measured(path: Path) -> dict[str, float]:
    """kohya module name -> the scale diffusers' LoRA layers apply after load_lora_weights
    (component-prefixed key stems for diffusers files)."""
    from peft.tuners.lora import LoraLayer

    pipe = oracle.model_copy("pipeline", SD)
    pipe.load_lora_weights(str(path), adapter_name="x")
    kohya = load_adapter(path).format == "kohya"
    out = {}
    for comp, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for name, layer in getattr(pipe, comp).named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            if kohya:
                full = (
                    name
                    if comp == "unet" or name.startswith("text_model")
                    else f"text_model.{name}"
                )
                out[prefix + full.replace(".", "_")] = layer.scaling["x"]
            else:
                out[f"{comp}.{name}"] = layer.scaling["x"]
    return out


def scales_of(path: Path) -> dict[str, dict[str, float | None]]:
    """consumer -> module key -> scale (loading consumers), plus ``intended``."""
    adapter = load_adapter(path)
    table = consumer_scales(adapter)
    out: dict[str, dict[str, float | None]] = {c.consumer: dict(c.scales) for c in table.loading()}
    out["intended"] = {m.key: table.intended(m) for m in table.modules}
    return out


def assert_scales(got: dict[str, float | None], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] is not None and math.isclose(got[key], value, rel_tol=1e-9), (
            key,
            got[key],
            value,
        )


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scales")


# -- PEFT folders: PEFT measured, the serving engines from their code ------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_uniform_adapter_every_consumer_agrees(tmp):
    folder = make_peft(tmp, "uniform", r=4, lora_alpha=8, target_modules=TARGETS)
    got = scales_of(folder)
    measured = peft_measured(folder)
    assert len(measured) == 8
    assert_scales(got["peft"], measured)
    for name in ("intended", "vllm", "sglang", "tgi", "llamacpp"):
        assert_scales(got[name], dict.fromkeys(measured, 2.0))
    assert set(got) == {"intended", "peft", "vllm", "sglang", "tgi", "llamacpp"}
    assert consumer_scales(load_adapter(folder)).disagreements() == []


def test_rank_and_alpha_patterns(tmp):
    folder = make_peft(
        tmp,
        "patterns",
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
        alpha_pattern={"o_proj": 3},
    )
    got = scales_of(folder)
    measured = peft_measured(folder)
    # PEFT's own numbers: q 8/2, layer-1 v 8/6, o 3/4, the rest 8/4
    assert measured[f"{P}.0.self_attn.q_proj"] == 4.0
    assert measured[f"{P}.1.self_attn.v_proj"] == 8 / 6
    assert measured[f"{P}.1.self_attn.o_proj"] == 0.75
    assert_scales(got["peft"], measured)
    assert_scales(got["intended"], measured)
    # vLLM / SGLang / TGI: one lora_alpha / r = 2 for every module
    for name in ("vllm", "sglang", "tgi"):
        assert_scales(got[name], dict.fromkeys(measured, 2.0))
    # llama.cpp: lora_alpha / each tensor's rank (the alpha pattern is lost)
    llama = {k: 8 / {"q_proj": 2}.get(k.rsplit(".", 1)[1], 4) for k in measured}
    llama[f"{P}.1.self_attn.v_proj"] = 8 / 6
    assert_scales(got["llamacpp"], llama)

    table = consumer_scales(load_adapter(folder))
    by_module = {d.module: d for d in table.disagreements()}
    o_proj = by_module[f"{P}.0.self_attn.o_proj"]
    assert o_proj.intended == 0.75
    assert o_proj.differ == ("vllm", "sglang", "tgi", "llamacpp")
    q_proj = by_module[f"{P}.0.self_attn.q_proj"]
    assert q_proj.differ == ("vllm", "sglang", "tgi")
    assert f"{P}.0.self_attn.k_proj" not in by_module  # every consumer: 2
    assert len(by_module) == 2 + 2 + 1  # q and o in both layers, layer 1's v


def test_rslora(tmp):
    folder = make_peft(tmp, "rslora", r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS)
    got = scales_of(folder)
    measured = peft_measured(folder)
    assert set(measured.values()) == {4.0}  # 8 / sqrt(4)
    assert_scales(got["peft"], measured)
    assert_scales(got["intended"], measured)
    assert_scales(got["vllm"], measured)  # alpha / sqrt(r) since vLLM PR 6909
    assert_scales(got["tgi"], measured)  # get_scaling_factor(uses_rslora=...)
    assert_scales(got["sglang"], dict.fromkeys(measured, 2.0))  # use_rslora not read
    assert_scales(got["llamacpp"], dict.fromkeys(measured, 2.0))  # alpha / rank
    table = consumer_scales(load_adapter(folder))
    assert {d.differ for d in table.disagreements()} == {("sglang", "llamacpp")}


def test_tgi_leaves_embedding_modules_out(tmp):
    folder = make_peft(tmp, "embed", r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    table = consumer_scales(load_adapter(folder))
    tgi = next(c for c in table.consumers if c.consumer == "tgi")
    embed = "base_model.model.model.embed_tokens"
    assert tgi.scales[embed] is None and "lora_A.weight" in tgi.skipped[embed]
    assert_scales(scales_of(folder)["peft"], peft_measured(folder))
    assert table.disagreements() == []  # a module left out is no scale disagreement


def test_peft_refuses_a_config_rank_that_contradicts_the_tensors():
    table = consumer_scales(load_adapter(FIX / "broken/wrong-alpha-config", strict=False))
    peft = next(c for c in table.consumers if c.consumer == "peft")
    assert not peft.loads and "LT304" in (peft.reason or "")


def test_vllm_refuses_dora_and_modules_to_save():
    for fixture, word in (("llama-dora", "DoRA"), ("llama-modules-to-save", "modules_to_save")):
        table = consumer_scales(load_adapter(FIX / "peft" / fixture))
        vllm = next(c for c in table.consumers if c.consumer == "vllm")
        assert not vllm.loads and word in (vllm.reason or ""), fixture


def test_pipeline_consumers_do_not_load_peft_folders_and_servers_not_kohya():
    peft_table = consumer_scales(load_adapter(FIX / "peft/llama-lora"))
    loads = {c.consumer: c.loads for c in peft_table.consumers}
    assert loads == {
        "peft": True,
        "diffusers": False,
        "comfyui": False,
        "vllm": True,
        "sglang": True,
        "tgi": True,
        "llamacpp": True,
    }
    kohya = consumer_scales(load_adapter(SD_KOHYA))
    assert {c.consumer for c in kohya.loading()} == {"diffusers", "comfyui"}
    assert all("kohya" in (c.reason or "") for c in kohya.consumers if not c.loads)
    assert list(CONSUMERS) == [c.consumer for c in kohya.consumers]


# -- kohya and diffusers files: diffusers measured, ComfyUI from its code ---------------------


def kohya_variant(tmp: Path, name: str, edit) -> Path:
    tensors = load_file(SD_KOHYA)
    with safe_open(SD_KOHYA, "np") as f:
        meta = f.metadata()
    stems = sorted({k.split(".")[0] for k in tensors})
    edit(tensors, stems, meta)
    out = tmp / f"{name}.safetensors"
    save_file(tensors, out, meta)
    return out


def test_kohya_with_alpha_tensors(tmp):
    got = scales_of(SD_KOHYA)
    measured = diffusers_measured(SD_KOHYA)
    assert len(measured) == 60 and set(measured.values()) == {0.5}  # alpha 2, rank 4
    assert_scales(got["diffusers"], measured)
    assert_scales(got["comfyui"], measured)  # alpha / rank from each .alpha tensor
    assert_scales(got["intended"], measured)


def test_kohya_without_alpha_and_alpha_only_in_metadata(tmp):
    def drop(t, stems, meta):
        for s in stems:
            t.pop(f"{s}.alpha")
        meta["ss_network_alpha"] = "2.0"  # sd-scripts' record; no loader reads it

    path = kohya_variant(tmp, "metadata-alpha", drop)
    got = scales_of(path)
    measured = diffusers_measured(path)
    assert set(measured.values()) == {1.0}
    for name in ("diffusers", "comfyui", "intended"):
        assert_scales(got[name], measured)


def test_kohya_mixed_ranks_without_alpha(tmp):
    def truncate(t, stems, meta):
        for s in stems:
            t.pop(f"{s}.alpha")
        for s in stems[::7]:
            t[f"{s}.lora_down.weight"] = t[f"{s}.lora_down.weight"][:2].copy()
            t[f"{s}.lora_up.weight"] = t[f"{s}.lora_up.weight"][:, :2].copy()

    path = kohya_variant(tmp, "mixed", truncate)
    adapter = load_adapter(path)
    assert set(adapter.ranks) == {2, 4}
    got = scales_of(path)
    measured = diffusers_measured(path)
    # diffusers 0.42.1 mirrors each rank into its alpha (PR 14409): scale 1 whatever the order
    assert set(measured.values()) == {1.0}
    for name in ("diffusers", "comfyui", "intended"):
        assert_scales(got[name], measured)


def test_kohya_partial_and_differing_alphas(tmp):
    """diffusers gives a module without an alpha tensor, and an attention or text-encoder
    module whose alpha is not the most common one, the most common alpha; ComfyUI reads
    each module's own (none: scale 1)."""
    attention = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
    proj_in = "lora_unet_down_blocks_1_attentions_0_proj_in"
    missing = "lora_unet_down_blocks_1_attentions_0_proj_out"
    text = "lora_te_text_model_encoder_layers_0_mlp_fc1"

    def edit(t, stems, meta):
        t.pop(f"{missing}.alpha")
        for s in (attention, proj_in, text):
            t[f"{s}.alpha"] = np.array(8.0, np.float32)

    path = kohya_variant(tmp, "partial", edit)
    got = scales_of(path)
    measured = diffusers_measured(path)
    assert measured[missing] == 0.5 and measured[attention] == 0.5 and measured[text] == 0.5
    assert measured[proj_in] == 2.0
    assert_scales(got["diffusers"], measured)
    comfy = dict.fromkeys(measured, 0.5) | {missing: 1.0, attention: 2.0, proj_in: 2.0, text: 2.0}
    assert_scales(got["comfyui"], comfy)
    assert_scales(got["intended"], comfy)  # kohya's rule, as sd-scripts trains and ComfyUI reads

    by_module = {d.module: d for d in consumer_scales(load_adapter(path)).disagreements()}
    assert set(by_module) == {missing, attention, text}
    assert by_module[missing].differ == ("diffusers",)
    assert by_module[attention].scales == {"diffusers": 0.5, "comfyui": 2.0}


def test_diffusers_metadata_alpha_is_lost_on_comfyui(tmp):
    path = FIX / "diffusers/sd-lora"
    weights = path / "pytorch_lora_weights.safetensors"
    with safe_open(weights, "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["unet.lora_alpha"], meta["text_encoder.lora_alpha"], meta["unet.r"]) == (4, 8, 4)
    got = scales_of(path)
    measured = diffusers_measured(weights)
    assert {k.split(".")[0]: v for k, v in measured.items()} == {"unet": 1.0, "text_encoder": 2.0}
    assert_scales(got["diffusers"], measured)
    assert_scales(got["intended"], measured)
    # ComfyUI's key maps hold neither the PEFT-style UNet attention names nor text-encoder
    # names without text_model. (transformers 5): every module of this file is left out
    assert set(got["comfyui"].values()) == {None}
    assert consumer_scales(load_adapter(path)).disagreements() == []
    # the text encoder named as transformers 4 did maps, at scale 1: PR 15830 is open
    from tests.ops.pipeline_adapters import rewrite, text_model_level

    old_names = rewrite(weights, tmp / "text-model.safetensors", text_model_level)
    got = scales_of(old_names)
    text = {k: v for k, v in got["comfyui"].items() if k.startswith("text_encoder.")}
    assert len(text) == 8 and set(text.values()) == {1.0}
    assert {v for k, v in got["comfyui"].items() if k not in text} == {None}
    table = consumer_scales(load_adapter(old_names))
    differing = {d.module.split(".")[0]: d.differ for d in table.disagreements()}
    assert differing == {"text_encoder": ("comfyui",)}


def test_diffusers_file_without_metadata_runs_at_scale_one(tmp):
    src = FIX / "diffusers/sd-lora/pytorch_lora_weights.safetensors"
    out = tmp / "nometa.safetensors"
    save_file(load_file(src), out, {"format": "pt"})
    got = scales_of(out)
    measured = diffusers_measured(out)
    assert set(measured.values()) == {1.0}
    for name in ("diffusers", "intended"):
        assert_scales(got[name], measured)
    assert set(got["comfyui"].values()) == {None}  # no module maps in ComfyUI (LT554)


def test_flux_kohya_scale_baked_by_diffusers_converter(tmp):
    """No tiny Flux pipeline here: diffusers' own converter bakes each module's scale into the
    factors, and ``|B' A'| / |up down|`` is the scale it applies."""
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from safetensors.torch import load_file as torch_load
    from safetensors.torch import save_file as torch_save

    state = torch_load(FIX / "kohya/flux-lora.safetensors")
    proj, mlp = "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_img_mlp_0"
    state[f"{proj}.alpha"] = torch.tensor(8.0)  # rank 4: scale 2
    del state[f"{mlp}.alpha"]  # no alpha: scale 1
    path = tmp / "flux.safetensors"
    torch_save(state, path)
    # the fixture's single blocks are too small for the converter's hard-coded Flux widths
    ours = {k: v.double() for k, v in state.items() if k.startswith((proj, mlp))}
    converted = _convert_kohya_flux_lora_to_diffusers(ours)
    got = scales_of(path)
    for stem, name, expected in (
        (proj, "transformer.transformer_blocks.0.attn.to_out.0", 2.0),
        (mlp, "transformer.transformer_blocks.0.ff.net.0.proj", 1.0),
    ):
        up, down = (
            state[f"{stem}.lora_up.weight"].double(),
            state[f"{stem}.lora_down.weight"].double(),
        )
        baked = converted[f"{name}.lora_B.weight"] @ converted[f"{name}.lora_A.weight"]
        measured = float(baked.norm() / (up @ down).norm())
        assert math.isclose(measured, expected, rel_tol=1e-9)
        for consumer in ("diffusers", "comfyui", "intended"):
            assert math.isclose(got[consumer][stem], measured, rel_tol=1e-9), consumer


# -- validate: LT590 --------------------------------------------------------------------------


def lt590(path: Path) -> list:
    from lora_tools.ops.validate import validate

    return [f for f in validate([path]).findings if f.rule.code == "LT590"]


def test_lt590_names_the_modules_the_consumers_and_their_scales():
    found = lt590(FIX / "peft/llama-patterns")
    assert [f.severity for f in found] == ["info"] * 3
    by_module = {f.module: f for f in found}
    v_proj = by_module[f"{P}.1.self_attn.v_proj"]
    assert v_proj.message == (
        f"module '{P}.1.self_attn.v_proj': vLLM, SGLang and TGI apply 2 where loratool's scale "
        "is 1.33333 (PEFT and llama.cpp apply it)"
    )
    assert (v_proj.expected, v_proj.found) == ("1.33333", "vllm 2; sglang 2; tgi 2")
    o_proj = by_module[f"{P}.0.self_attn.o_proj"]
    assert o_proj.message.startswith(f"modules '{P}.0.self_attn.o_proj', '{P}.1.self_attn.o_proj'")
    assert (
        "vLLM, SGLang, TGI and llama.cpp apply 2 where loratool's scale is 0.75" in o_proj.message
    )
    assert "--consumers" in (o_proj.hint or "")


def test_lt590_on_kohya_and_diffusers_files(tmp):
    def partial(t, stems, meta):
        t.pop("lora_unet_down_blocks_1_attentions_0_proj_out.alpha")

    (finding,) = lt590(kohya_variant(tmp, "lt590-partial", partial))
    assert finding.message == (
        "module 'lora_unet_down_blocks_1_attentions_0_proj_out': diffusers applies 0.5 where "
        "loratool's scale is 1 (ComfyUI applies it)"
    )
    assert lt590(FIX / "diffusers/sd-lora") == []  # ComfyUI leaves every module out
    from tests.ops.pipeline_adapters import SD_DIFFUSERS, rewrite, text_model_level

    (finding,) = lt590(rewrite(SD_DIFFUSERS, tmp / "lt590-te.safetensors", text_model_level))
    assert "8 more" not in finding.message and "and 5 more: ComfyUI applies 1" in finding.message
    assert lt590(SD_KOHYA) == [] and lt590(FIX / "peft/llama-lora") == []


def test_lt590_leaves_broken_scales_to_their_own_rules(tmp):
    from lora_tools.ops.validate import validate

    def zero(t, stems, meta):
        t[f"{stems[0]}.alpha"] = np.array(0.0, np.float32)  # LT106: loaders disagree on 0

    path = kohya_variant(tmp, "alpha-zero", zero)
    codes = {f.rule.code for f in validate([path]).findings}
    assert "LT106" in codes and "LT590" not in codes
    codes = {f.rule.code for f in validate([FIX / "broken/wrong-alpha-config"]).findings}
    assert "LT304" in codes and "LT590" not in codes


def test_lt590_is_info_and_never_fails_a_run():
    from click.testing import CliRunner

    from lora_tools.cli import cli

    args = ["validate", str(FIX / "peft/llama-patterns"), "--fail-on", "warning"]
    result = CliRunner().invoke(cli, [*args, "--output-format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [f["rule"] for f in doc["files"][0]["findings"]] == ["LT590"] * 3
