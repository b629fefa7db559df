"""Every adapter type loratool merges, merged into fp8 bases: the fp8 output is the scheme's
quantizer applied to loratool's float merge into the same base dequantized and stored as F64
(the exact float64 sum ``dequant(W) + dW``, whose float path the other merge tests check
against PEFT, LyCORIS and ComfyUI), every untouched tensor keeps its bytes.

Bases: the tiny Llama in Hugging Face block FP8 (16x16 blocks) with the PEFT fixtures (DoRA,
rsLoRA, rank / alpha patterns); the tiny SD pipeline folder with its UNet in plain
F8_E4M3 (2-D and 4-D convolution weights) with the kohya / LyCORIS fixtures (LoRA, LoCon, LoHa,
DoRA).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lora_tools.io.safetensors import SafetensorsFile, numpy_dtype
from lora_tools.ops.merge import merge
from lora_tools.quant.numeric import dequantize, quantize
from lora_tools.quant.schemes import Scheme

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
BLOCK = Scheme("hf-block-fp8", "F8_E4M3", "block", (16, 16), "weight_scale_inv")
PLAIN = Scheme("plain-fp8", "F8_E4M3")


def tensors_of(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with SafetensorsFile(path) as reader:
            for name, info in reader.header.tensors.items():
                key = f"{path.relative_to(folder).as_posix()}::{name}"
                out[key] = (info.dtype, tuple(info.shape), reader.read_bytes(name))
    return out


def array(entry) -> np.ndarray:
    return np.frombuffer(entry[2], numpy_dtype(entry[0])).reshape(entry[1])


def as_torch(values: np.ndarray, fp8: bool) -> torch.Tensor:
    if fp8:
        return torch.from_numpy(np.ascontiguousarray(values).view(np.uint8)).view(
            torch.float8_e4m3fn
        )
    return torch.from_numpy(np.ascontiguousarray(values))


def llama_bases(root: Path) -> tuple[Path, Path]:
    """tiny-llama in block FP8, and its dequantized F64 twin."""
    fp8, f64 = root / "fp8", root / "f64"
    for folder in (fp8, f64):
        shutil.copytree(FIXTURES / "bases" / "tiny-llama", folder)
    weights = load_file(FIXTURES / "bases" / "tiny-llama" / "model.safetensors")
    quantized, exact = {}, {}
    for name, value in weights.items():
        if "_proj." not in name:
            quantized[name] = value
            exact[name] = value.double()
            continue
        q, inv = quantize(BLOCK, value.numpy())
        quantized[name] = as_torch(q, True)
        quantized[name[: -len("weight")] + "weight_scale_inv"] = torch.from_numpy(inv)
        exact[name] = torch.from_numpy(dequantize(BLOCK, q, inv))
    save_file(quantized, fp8 / "model.safetensors")
    save_file(exact, f64 / "model.safetensors")
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [16, 16],
    }
    (fp8 / "config.json").write_text(json.dumps(config))
    return fp8, f64


def sd_bases(root: Path) -> tuple[Path, Path]:
    """tiny-sd with its UNet weights in plain F8_E4M3, and the same cast back to F64."""
    fp8, f64 = root / "fp8", root / "f64"
    for folder in (fp8, f64):
        shutil.copytree(FIXTURES / "bases" / "tiny-sd", folder)
    unet = "unet/diffusion_pytorch_model.safetensors"
    weights = load_file(FIXTURES / "bases" / "tiny-sd" / unet)
    quantized, exact = {}, {}
    for name, value in weights.items():
        if value.ndim < 2:
            quantized[name], exact[name] = value, value
            continue
        quantized[name] = value.to(torch.float8_e4m3fn)  # how plain fp8 files are made
        exact[name] = quantized[name].double()
    save_file(quantized, fp8 / unet)
    save_file(exact, f64 / unet)
    return fp8, f64


CASES = {
    "peft/llama-lora": (llama_bases, BLOCK),
    "peft/llama-dora": (llama_bases, BLOCK),
    "peft/llama-rslora": (llama_bases, BLOCK),
    "peft/llama-patterns": (llama_bases, BLOCK),
    "kohya/sd-lora.safetensors": (sd_bases, PLAIN),
    "kohya/sd-locon.safetensors": (sd_bases, PLAIN),
    "kohya/sd-loha.safetensors": (sd_bases, PLAIN),
    "kohya/sd-dora.safetensors": (sd_bases, PLAIN),
}


@pytest.mark.parametrize("adapter", list(CASES))
def test_the_fp8_merge_is_the_quantized_exact_float_merge(adapter, tmp_path):
    build, scheme = CASES[adapter]
    fp8, f64 = build(tmp_path)
    merge(fp8, [FIXTURES / adapter], tmp_path / "out", device="cpu")
    merge(f64, [FIXTURES / adapter], tmp_path / "f64-out", device="cpu")
    before, after = tensors_of(fp8), tensors_of(tmp_path / "out")
    exact_before, exact = tensors_of(f64), tensors_of(tmp_path / "f64-out")
    assert set(after) == set(before)
    changed = {k for k in exact if exact[k][2] != exact_before[k][2]}
    rewritten = changed | {k[: -len("weight")] + "weight_scale_inv" for k in changed}
    merged = 0
    for key, entry in before.items():
        assert after[key][:2] == entry[:2], key
        if key not in rewritten:
            assert after[key][2] == entry[2], key  # untouched: the same bytes
            continue
        if not entry[0].startswith("F8"):
            continue  # a float tensor (a bias) or a scale: the float path's / checked below
        merged += 1
        q, scale = quantize(scheme, array(exact[key]))
        assert after[key][2] == q.tobytes(), key
        if scale is not None:
            scale_key = key[: -len("weight")] + "weight_scale_inv"
            assert after[scale_key][2] == np.asarray(scale, np.float32).tobytes(), scale_key
    assert merged >= 3
