"""convert: names change, every module's update stays the same (float64 and in the real
PEFT / diffusers loaders)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_tools.errors import ResolveError, UnsupportedAdapterError, UsageError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.ops.convert import convert_adapter


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def write(adapter, to, out, **kw):
    """Convert, write, and read back."""
    result = convert_adapter(adapter, to, **kw)
    path = save_adapter(result.adapter, out, refresh_hashes=True)
    return load_adapter(path if to == "kohya" else out), result


def by_layer(adapter):
    """Dense float64 update per module, keyed by the flattened path (format independent)."""
    out = {}
    for m in adapter.modules.values():
        name = (m.path or m.key.split("_", 2)[-1]).replace(".", "_")
        out[name.removeprefix("unet_").removeprefix("te_")] = m.delta()
    return out


def assert_same_updates(a, b, tol=0.0):
    da, db = by_layer(a), by_layer(b)
    assert set(da) == set(db)
    for k in da:
        assert rel(db[k], da[k]) <= tol, k


def test_peft_kohya_peft_round_trip(fixtures_dir, tmp_path):
    src = load_adapter(fixtures_dir / "peft/sd-unet-conv")  # linear + 3x3 conv UNet modules
    src = convert_adapter(src, "peft").adapter  # same adapter, alpha 8 on every module
    kohya, _ = write(src, "kohya", tmp_path / "k.safetensors")
    assert all(k.startswith("lora_unet_") for k in kohya.modules)
    back, res = write(kohya, "peft", tmp_path / "p", base=fixtures_dir / "bases/tiny-sd")
    assert res.resolved == len(src.modules)
    assert set(back.modules) == set(src.modules)
    for key, m in src.modules.items():
        n = back.modules[key]
        assert (n.rank, n.scale, n.kind) == (m.rank, m.scale, m.kind)
        np.testing.assert_array_equal(n.up.numpy(), m.up.numpy())  # factors are copied
    assert_same_updates(src, back)


def test_peft_diffusers_peft_round_trip(fixtures_dir, tmp_path):
    src = load_adapter(fixtures_dir / "peft/llama-patterns")
    diff, _ = write(src, "diffusers", tmp_path / "d", component="transformer")
    assert all(k.startswith("transformer.model.layers.") for k in diff.modules)
    back, _ = write(diff, "peft", tmp_path / "p")
    for key, m in src.modules.items():
        n = back.modules[key]
        assert (n.rank, n.scale) == (m.rank, m.scale)
    assert_same_updates(src, back)
    kohya, _ = write(src, "kohya", tmp_path / "k.safetensors")
    assert kohya.metadata["ss_network_dim"] == "Dynamic"
    assert_same_updates(src, kohya)


def test_rslora_to_kohya_is_expressed_as_alpha(fixtures_dir, tmp_path):
    src = load_adapter(fixtures_dir / "peft/llama-rslora")
    kohya, _ = write(src, "kohya", tmp_path / "k.safetensors")
    for m in kohya.modules.values():
        assert not m.rslora and m.alpha == pytest.approx(8 / 2 * 4)  # scale 8 / sqrt(4) = 4
    assert_same_updates(src, kohya, tol=1e-7)


def test_kohya_to_diffusers_and_back(fixtures_dir, tmp_path):
    src = load_adapter(fixtures_dir / "kohya/sd-locon.safetensors")  # 3x3 convs, fp16
    diff, res = write(src, "diffusers", tmp_path / "d", base=fixtures_dir / "bases/tiny-sd")
    assert res.resolved == len(src.modules)
    assert {m.component for m in diff.modules.values()} == {"unet", "text_encoder"}
    meta = json.loads(diff.metadata["lora_adapter_metadata"])
    assert meta["unet.alpha_pattern"]  # conv modules have their own alpha
    assert_same_updates(src, diff)
    kohya, _ = write(diff, "kohya", tmp_path / "k.safetensors")
    assert set(kohya.modules) == set(src.modules)  # the original kohya names come back
    assert_same_updates(src, kohya)


def test_diffusers_to_peft_per_component(fixtures_dir, tmp_path):
    src = load_adapter(fixtures_dir / "diffusers/sd-lora")
    with pytest.raises(UsageError, match="components"):
        convert_adapter(src, "peft")
    unet, res = write(src, "peft", tmp_path / "u", component="unet")
    assert len(res.dropped) == 8 and len(unet.modules) == 32
    config = json.loads((tmp_path / "u/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    for m in src.modules.values():
        if m.component == "unet":
            n = unet.modules["base_model.model." + m.path]
            assert n.scale == m.scale and rel(n.delta(), m.delta()) == 0


def test_peft_to_diffusers_infers_the_component(fixtures_dir, tmp_path):
    src = load_adapter(fixtures_dir / "peft/sd-unet-conv")  # base_model_name_or_path .../unet
    diff, _ = write(src, "diffusers", tmp_path / "d")
    assert {m.component for m in diff.modules.values()} == {"unet"}
    llama = load_adapter(fixtures_dir / "peft/llama-lora")
    with pytest.raises(UsageError, match="component"):
        convert_adapter(llama, "diffusers")


def test_errors(fixtures_dir):
    kohya = load_adapter(fixtures_dir / "kohya/sd-lora.safetensors")
    with pytest.raises(UsageError, match="--base"):
        convert_adapter(kohya, "peft")
    with pytest.raises(ResolveError):
        convert_adapter(kohya, "diffusers", base=fixtures_dir / "bases/tiny-llama")
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        convert_adapter(load_adapter(fixtures_dir / "peft/llama-dora"), "kohya")
    with pytest.raises(UnsupportedAdapterError, match="LoHa"):
        convert_adapter(load_adapter(fixtures_dir / "kohya/sd-loha.safetensors"), "peft")
    with pytest.raises(UnsupportedAdapterError, match="full tensors"):
        convert_adapter(load_adapter(fixtures_dir / "peft/llama-modules-to-save"), "kohya")
    with pytest.raises(UsageError):
        convert_adapter(kohya, "onnx")


# -- the real consumers ----------------------------------------------------------------------


def _llama(fixtures_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        fixtures_dir / "bases/tiny-llama", dtype=torch.float32
    )


def _peft_merged(model, adapter_dir):
    """Load with PeftModel.from_pretrained, check no key is missing or unexpected, merge."""
    import peft
    from safetensors.torch import load_file

    pm = peft.PeftModel.from_pretrained(model, adapter_dir)
    saved = set(load_file(adapter_dir / "adapter_model.safetensors"))
    created = {k.replace(".default.", ".") for k in pm.state_dict() if ".lora_" in k}
    assert created == saved  # every LoRA parameter PEFT created was in the file, and no more
    return pm.merge_and_unload().state_dict()


@pytest.mark.oracle
def test_converted_peft_loads_in_peft_llama(fixtures_dir, tmp_path):
    """PEFT -> diffusers -> PEFT on the tiny Llama: same merged weights as the original."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    src_dir = fixtures_dir / "peft/llama-patterns"
    diff, _ = write(load_adapter(src_dir), "diffusers", tmp_path / "d", component="transformer")
    write(diff, "peft", tmp_path / "p")
    expected = _peft_merged(_llama(fixtures_dir), src_dir)
    for k, v in _peft_merged(_llama(fixtures_dir), tmp_path / "p").items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


@pytest.mark.oracle
def test_llama_peft_kohya_peft_with_base_loads_in_peft(fixtures_dir, tmp_path):
    """PEFT -> kohya -> PEFT (--base recovers the paths) on the tiny Llama, patterns included."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    src_dir = fixtures_dir / "peft/llama-patterns"
    kohya, _ = write(load_adapter(src_dir), "kohya", tmp_path / "k.safetensors")
    assert next(iter(kohya.modules)).startswith("lora_unet_model_layers_")
    _, res = write(kohya, "peft", tmp_path / "p", base=fixtures_dir / "bases/tiny-llama")
    assert res.resolved == 8
    expected = _peft_merged(_llama(fixtures_dir), src_dir)
    for k, v in _peft_merged(_llama(fixtures_dir), tmp_path / "p").items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


@pytest.mark.oracle
def test_converted_peft_loads_in_peft_unet(fixtures_dir, tmp_path):
    """kohya (from PEFT) -> PEFT with --base on the tiny SD UNet: same merged weights."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    src_dir = fixtures_dir / "peft/sd-unet-conv"
    kohya, _ = write(load_adapter(src_dir), "kohya", tmp_path / "k.safetensors")
    write(kohya, "peft", tmp_path / "p", base=fixtures_dir / "bases/tiny-sd")

    def unet():
        return UNet2DConditionModel.from_pretrained(fixtures_dir / "bases/tiny-sd/unet")

    expected = _peft_merged(unet(), src_dir)
    for k, v in _peft_merged(unet(), tmp_path / "p").items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


def _fused_sd(fixtures_dir, lora):
    """The tiny SD pipeline's UNet + text encoder weights after load_lora_weights + fuse_lora."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        fixtures_dir / "bases/tiny-sd", safety_checker=None
    )
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    out = {}
    for prefix, module in (("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder)):
        for k, v in module.state_dict().items():
            if ".lora_" not in k:
                out[prefix + k.replace(".base_layer.", ".")] = v.clone()
    return out


@pytest.fixture(scope="module")
def sd_base(fixtures_dir):
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        fixtures_dir / "bases/tiny-sd", safety_checker=None
    )
    return {
        **{"unet." + k: v for k, v in pipe.unet.state_dict().items()},
        **{"text_encoder." + k: v for k, v in pipe.text_encoder.state_dict().items()},
    }


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["sd-lora", "sd-locon"])
def test_kohya_to_diffusers_fuses_like_the_original(fixtures_dir, tmp_path, sd_base, name):
    torch = pytest.importorskip("torch")
    src = fixtures_dir / f"kohya/{name}.safetensors"
    write(load_adapter(src), "diffusers", tmp_path / "d", base=fixtures_dir / "bases/tiny-sd")
    theirs = _fused_sd(fixtures_dir, src)
    ours = _fused_sd(fixtures_dir, tmp_path / "d/pytorch_lora_weights.safetensors")
    assert ours.keys() == theirs.keys()
    changed = [k for k in sd_base if not torch.equal(sd_base[k], theirs[k])]
    assert len(changed) == len(load_adapter(src).modules)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)


@pytest.mark.oracle
def test_peft_unet_to_diffusers_and_kohya_fuse_to_the_peft_update(fixtures_dir, tmp_path, sd_base):
    """PEFT -> diffusers and PEFT -> kohya both load in diffusers and add exactly dW."""
    pytest.importorskip("torch")
    src = load_adapter(fixtures_dir / "peft/sd-unet-conv")
    write(src, "diffusers", tmp_path / "d")
    write(src, "kohya", tmp_path / "k.safetensors")
    for lora in (tmp_path / "d/pytorch_lora_weights.safetensors", tmp_path / "k.safetensors"):
        fused = _fused_sd(fixtures_dir, lora)
        for m in src.modules.values():
            key = f"unet.{m.path}.weight"
            got = (fused[key].double() - sd_base[key].double()).numpy()
            assert rel(got, m.delta()) < 1e-5, (lora.name, key)
