"""Merging into fp8 bases (issue 14), checked against float64 references and the schemes' own code.

The bases are a tiny Llama (transformers, hidden 64) quantized by each scheme's own quantizer
where one exists (transformers' ``Fp8Quantize`` for Hugging Face block FP8, compressed-tensors'
``calculate_qparams`` / ``quantize``; :func:`lora_tools.quant.numeric.quantize`, tested
bit-exact against them in tests/quant, for partial edge blocks which ``Fp8Quantize`` passes
through), with a LoRA made by PEFT. The float64 reference is ``W' = dequant(W) + B @ A * alpha / r``
from the adapter's own tensors; a second oracle is loratool's float merge into the dequantized
base stored as F64, whose output is the exact float64 sum the fp8 merge quantizes.
"""

from __future__ import annotations

import json
import re
import shutil
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from lora_tools.errors import UnsupportedBaseError
from lora_tools.io.safetensors import SafetensorsFile
from lora_tools.ops.merge import merge
from lora_tools.quant.numeric import dequantize, fp8_step, quantize
from lora_tools.quant.schemes import HF_FP8_SCALE_SPELLINGS, Scheme

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402

INDEX = "model.safetensors.index.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
#: the layer whose update is made large: its amax, and so its scale, must grow
GROWN = "model.layers.1.mlp.down_proj.weight"
ALPHA, RANK = 8, 4


# -- reading -------------------------------------------------------------------------------


def tensors_of(folder: Path) -> dict[str, tuple[str, str, tuple[int, ...], bytes]]:
    """name -> (file, dtype, shape, raw bytes) over every .safetensors file of a folder."""
    out = {}
    paths = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))
    for path in paths:
        with SafetensorsFile(path) as reader:
            for name, info in reader.header.tensors.items():
                out[name] = (path.name, info.dtype, tuple(info.shape), reader.read_bytes(name))
    return out


def array(entry: tuple[str, str, tuple[int, ...], bytes]) -> np.ndarray:
    from lora_tools.io.safetensors import numpy_dtype

    return np.frombuffer(entry[3], numpy_dtype(entry[1])).reshape(entry[2])


def dequantized(tensors, scheme: Scheme, name: str) -> np.ndarray:
    scale = scheme.weight_scale_name(name)
    return dequantize(scheme, array(tensors[name]), array(tensors[scale]) if scale else None)


# -- the model, the adapter, the bases -----------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama's float weights and config, and a PEFT LoRA on it (lm_head included,
    o_proj left out; ``GROWN``'s update made large enough to raise that layer's amax)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=96,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(40.0 if "layers.1.mlp.down_proj" in name else 0.5)
    adapter = tmp_path_factory.mktemp("llama") / "adapter"
    peft_model.save_pretrained(adapter, save_embedding_layers=False)
    return types.SimpleNamespace(config=config, weights=weights, adapter=adapter)


def lora_delta(adapter: Path, name: str) -> np.ndarray:
    """The float64 update PEFT's LoRA makes to base weight ``name``."""
    from safetensors.numpy import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model." + name[: -len(".weight")]
    up = tensors[f"{key}.lora_B.weight"].astype(np.float64)
    down = tensors[f"{key}.lora_A.weight"].astype(np.float64)
    return up @ down * (ALPHA / RANK)


def is_target(name: str) -> bool:
    return name.endswith(".weight") and any(f".{t}." in f".{name}" for t in TARGETS)


def hf_quantize(value: torch.Tensor, block: list[int], scale_fmt: str):
    """transformers' own Fp8Quantize where blocks tile the weight, else loratool's port
    (the same bytes: tests/quant/test_numeric.py), for partial edge blocks."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    rows, cols = value.shape
    if rows % block[0] == 0 and cols % block[1] == 0:
        qc = types.SimpleNamespace(weight_block_size=block, scale_fmt=scale_fmt)
        out = Fp8Quantize(types.SimpleNamespace(quantization_config=qc))._quantize_one("w", value)
        return out["w"], out["w_scale_inv"].float()
    scheme = Scheme("hf-block-fp8", "F8_E4M3", "block", tuple(block), "weight_scale_inv")
    scheme = Scheme(**{**scheme.__dict__, "scale_fmt": scale_fmt})
    q, inv = quantize(scheme, value.float().numpy())
    return torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn), torch.from_numpy(inv)


def write_folder(folder: Path, shards: dict[str, dict[str, torch.Tensor]], config: dict) -> None:
    folder.mkdir(parents=True)
    weight_map, total = {}, 0
    for shard, content in shards.items():
        save_file(content, folder / shard, metadata={"format": "pt"})
        for name, t in content.items():
            weight_map[name] = shard
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def block_base(
    llama,
    folder: Path,
    block: list[int],
    scale_fmt: str = "float",
    spelling: str = "weight_scale_inv",
    scale_dtype: torch.dtype = torch.float32,
    act_scales: bool = False,
) -> Scheme:
    """The Llama in Hugging Face block FP8, in four shards: layer 1's attention scales sit in
    the shard before their weights, layer 0's MLP scales in the shard after, and the last shard
    holds only a norm and a scale of a merged layer. ``spelling`` names the scales
    (``<layer>.weight_scale_inv``, DeepSeek-V4's ``<layer>.scale``, Mistral's
    ``<layer>.qscale_weight``) and ``scale_dtype`` stores them (F8_E8M0 for DeepSeek-V4's
    ue8m0 grids); ``act_scales`` adds a static activation scale to each attention projection
    (Mistral's ``qscale_act``)."""
    shards: dict[str, dict[str, torch.Tensor]] = {
        f"model-0000{i}-of-00004.safetensors": {} for i in (1, 2, 3, 4)
    }
    names = list(shards)
    act_suffix = HF_FP8_SCALE_SPELLINGS[spelling]
    for name, value in llama.weights.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        home = names[0] if layer == "0" else names[1] if layer == "1" else names[2]
        if "_proj." not in name:
            shards[home][name] = value.to(torch.bfloat16)
            continue
        q, inv = hf_quantize(value, block, scale_fmt)
        shards[home][name] = q
        scale_home = home
        if layer == "1" and "self_attn" in name:
            scale_home = names[0]
        elif layer == "0" and ".mlp." in name:
            scale_home = names[1]
        if name == "model.layers.1.mlp.up_proj.weight":
            scale_home = names[3]
        shards[scale_home][name[: -len("weight")] + spelling] = inv.to(scale_dtype)
        if act_scales and "self_attn" in name:
            shards[home][name[: -len("weight")] + act_suffix] = torch.tensor(0.0123)
    shards[names[3]]["model.norm.weight"] = shards[names[2]].pop("model.norm.weight")
    config = llama.config.to_dict()
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    qc["weight_block_size"] = block
    if scale_fmt != "float":
        qc["scale_fmt"] = scale_fmt
    config["quantization_config"] = qc
    if scale_dtype == torch.float8_e8m0fnu:
        # as DeepSeek-V4's: without it transformers guesses the dtype from the first shard's
        # tensors, and its guess does not know F8_E8M0
        config["dtype"] = "bfloat16"
    write_folder(folder, shards, config)
    return Scheme(
        "hf-block-fp8",
        "F8_E4M3",
        "block",
        tuple(block),
        spelling,
        act_suffix,
        scale_fmt,
    )


def ct_base(llama, folder: Path, strategy: str) -> Scheme:
    """The Llama in compressed-tensors FP8 made by compressed-tensors itself: scales in bf16
    (the weights' dtype), static input scales on the attention projections."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True)
    content = {}
    for name, value in llama.weights.items():
        t = value.to(torch.bfloat16)
        if "_proj." not in name:
            content[name] = t
            continue
        if strategy == "channel":
            lo, hi = t.amin(dim=1, keepdim=True), t.amax(dim=1, keepdim=True)
        else:
            lo, hi = t.amin().reshape(1), t.amax().reshape(1)
        scale, zero = calculate_qparams(lo, hi, args)
        content[name] = ct_quantize(t, scale, zero, args, dtype=torch.float8_e4m3fn)
        layer = name[: -len(".weight")]
        content[f"{layer}.weight_scale"] = scale.to(torch.bfloat16).contiguous()
        if "self_attn" in name:
            content[f"{layer}.input_scale"] = torch.tensor([0.0123], dtype=torch.bfloat16)
    config = llama.config.to_dict()
    group = {
        "targets": ["Linear"],
        "weights": {
            "num_bits": 8,
            "type": "float",
            "strategy": strategy,
            "symmetric": True,
            "dynamic": False,
        },
        "input_activations": {
            "num_bits": 8,
            "type": "float",
            "strategy": "tensor",
            "symmetric": True,
            "dynamic": False,
        },
    }
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
        "quantization_status": "compressed",
    }
    write_folder(folder, {"model.safetensors": content}, config)
    return Scheme(
        "compressed-tensors-fp8", "F8_E4M3", strategy, None, "weight_scale", "input_scale"
    )


def f64_base(base: Path, scheme: Scheme, folder: Path) -> Path:
    """The base dequantized exactly, stored as F64 in one file, without scales or config
    quantization: loratool's float merge of it is the float64 sum the fp8 merge quantizes."""
    tensors = tensors_of(base)
    content = {}
    for name, entry in tensors.items():
        if scheme.is_scale(name):
            continue
        if entry[1].startswith("F8"):
            content[name] = torch.from_numpy(dequantized(tensors, scheme, name))
        else:
            content[name] = torch.from_numpy(array(entry).astype(np.float64))
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config")
    write_folder(folder, {"model.safetensors": content}, config)
    return folder


BASES = {
    "block-32": lambda llama, f: block_base(llama, f, [32, 32]),
    "block-48-partial-edges": lambda llama, f: block_base(llama, f, [48, 48]),
    "block-32-ue8m0": lambda llama, f: block_base(llama, f, [32, 32], "ue8m0"),
    # DeepSeek-V4-Flash: `<layer>.scale`, ue8m0 grids stored as F8_E8M0
    "block-32-scale-e8m0": lambda llama, f: block_base(
        llama, f, [32, 32], "ue8m0", "scale", torch.float8_e8m0fnu
    ),
    # Mistral's own format: `<layer>.qscale_weight`, `<layer>.qscale_act` beside it
    "block-32-qscale-weight": lambda llama, f: block_base(
        llama, f, [32, 32], spelling="qscale_weight", act_scales=True
    ),
    "ct-tensor": lambda llama, f: ct_base(llama, f, "tensor"),
    "ct-channel": lambda llama, f: ct_base(llama, f, "channel"),
}


@pytest.fixture(scope="module", params=list(BASES))
def merged(request, llama, tmp_path_factory):
    """A base of each scheme, the fp8 merge of the LoRA into it, and the float64 oracle."""
    root = tmp_path_factory.mktemp(request.param)
    scheme = BASES[request.param](llama, root / "base")
    merge(root / "base", [llama.adapter], root / "out", device="cpu")
    oracle = f64_base(root / "base", scheme, root / "f64")
    merge(oracle, [llama.adapter], root / "f64-out", device="cpu")
    return types.SimpleNamespace(
        name=request.param,
        scheme=scheme,
        base=root / "base",
        out=root / "out",
        root=root,
        before=tensors_of(root / "base"),
        after=tensors_of(root / "out"),
        exact=tensors_of(root / "f64-out"),
        adapter=llama.adapter,
    )


def merged_fp8(m) -> list[str]:
    return [n for n, e in m.before.items() if e[1].startswith("F8") and is_target(n)]


# -- keep the scheme -----------------------------------------------------------------------


def test_every_merged_element_lies_within_one_fp8_step_of_the_float64_sum(merged):
    names = merged_fp8(merged)
    assert len(names) == 12
    for name in names:
        reference = dequantized(merged.before, merged.scheme, name) + lora_delta(
            merged.adapter, name
        )
        ours = dequantized(merged.after, merged.scheme, name)
        scale = merged.scheme.weight_scale_name(name)
        step = fp8_step(merged.scheme, reference, array(merged.after[scale]))
        assert np.all(np.abs(ours - reference) <= step), name
        # the update landed: the output is closer to W' than the base is
        base = dequantized(merged.before, merged.scheme, name)
        assert np.linalg.norm(ours - reference) < np.linalg.norm(base - reference) / 4, name


def test_the_bytes_are_the_schemes_quantizer_applied_to_the_exact_sum(merged):
    compute = "BF16" if merged.scheme.name == "compressed-tensors-fp8" else "F32"
    for name in merged_fp8(merged):
        q, scale = quantize(merged.scheme, array(merged.exact[name]), compute_dtype=compute)
        assert merged.after[name][1:3] == merged.before[name][1:3]
        assert merged.after[name][3] == q.tobytes(), name
        scale_name = merged.scheme.weight_scale_name(name)
        stored = merged.before[scale_name]
        assert merged.after[scale_name][:3] == stored[:3]  # same file, dtype, shape
        expected = np.asarray(scale).astype(array(stored).dtype).reshape(stored[2])
        assert merged.after[scale_name][3] == expected.tobytes(), scale_name


def test_a_grown_amax_grows_the_scale_where_keeping_the_old_one_would_saturate(merged):
    scheme = merged.scheme
    scale_name = scheme.weight_scale_name(GROWN)
    old, new = array(merged.before[scale_name]), array(merged.after[scale_name])
    reference = dequantized(merged.before, scheme, GROWN) + lora_delta(merged.adapter, GROWN)
    assert new.astype(np.float64).max() > 2 * old.astype(np.float64).max()
    # requantized with the base's scale the update saturates: errors far beyond a step
    from lora_tools.quant.numeric import _cast_fp8, expand_scale

    stale = _cast_fp8(reference / expand_scale(scheme, old, reference.shape), scheme)
    stale_error = np.abs(dequantize(scheme, stale, old) - reference).max()
    ours_error = np.abs(dequantized(merged.after, scheme, GROWN) - reference).max()
    assert stale_error > 10 * ours_error


def test_untouched_tensors_scales_config_and_index_stay_byte_identical(merged):
    changed = set(merged_fp8(merged))
    changed |= {merged.scheme.weight_scale_name(n) for n in changed}
    changed.add("lm_head.weight")  # a float layer the LoRA targets (bf16 in every scheme)
    assert set(merged.after) == set(merged.before)
    for name, entry in merged.before.items():
        assert merged.after[name][:3] == entry[:3], name  # file, dtype, shape
        if name not in changed:
            assert merged.after[name][3] == entry[3], name
    # o_proj is not merged: its scale (and each activation scale) keeps its bytes
    assert (
        merged.scheme.weight_scale_name("model.layers.0.self_attn.o_proj.weight") in merged.before
    )
    for side in ("config.json", INDEX):
        if (merged.base / side).exists():
            assert (merged.out / side).read_bytes() == (merged.base / side).read_bytes()
    record = json.loads((merged.out / "loratool_merge.json").read_text())
    assert record["quantization"]["scheme"] == merged.scheme.name
    assert record["quantization"]["output"] == "kept"
    assert record["quantization"]["scales_rewritten"] == 12


def test_a_layer_the_scheme_left_in_bf16_merges_as_a_float_layer(merged):
    name = "lm_head.weight"
    assert merged.after[name][1] == "BF16"
    reference = array(merged.before[name]).astype(np.float64) + lora_delta(merged.adapter, name)
    ours = array(merged.after[name]).astype(np.float64)
    np.testing.assert_allclose(ours, reference, rtol=2**-8, atol=1e-6)
    assert not np.array_equal(ours, array(merged.before[name]).astype(np.float64))


# -- --dtype: dequantize -------------------------------------------------------------------


def nearest(values: np.ndarray, dtype) -> np.ndarray:
    """float64 values rounded to nearest even of ``dtype``, chosen among neighbours by
    distance (independent of loratool's round-to-odd)."""
    values = np.asarray(values, np.float64)
    if dtype is not ml_dtypes.bfloat16:
        return values.astype(dtype)
    guess = values.astype(np.float32).astype(dtype)
    bits = guess.view(np.uint16).astype(np.int32)
    candidates = np.stack([(bits + d).astype(np.uint16).view(dtype) for d in (-1, 0, 1)])
    distance = np.nan_to_num(np.abs(candidates.astype(np.float64) - values), nan=np.inf)
    best = distance.min(axis=0)
    even = (candidates.view(np.uint16) & 1) == 0
    pick = np.where((distance == best) & even, 0, np.where(distance == best, 1, 2)).argmin(axis=0)
    return np.take_along_axis(candidates, pick[None], axis=0)[0]


DTYPES = {
    "bf16": ("BF16", ml_dtypes.bfloat16),
    "fp16": ("F16", np.float16),
    "fp32": ("F32", np.float32),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dtype_dequantizes_every_weight_drops_the_scales_and_the_quantization_config(
    merged, dtype, tmp_path
):
    if merged.name not in ("block-48-partial-edges", "ct-channel") and dtype != "bf16":
        pytest.skip("one scheme of each kind for fp16 / fp32")
    out = tmp_path / "out"
    summary = merge(merged.base, [merged.adapter], out, dtype=dtype, device="cpu")
    name_dtype, np_dtype = DTYPES[dtype]
    after = tensors_of(out)
    scheme = merged.scheme
    assert not any(scheme.is_scale(n) for n in after)
    assert set(after) == {n for n in merged.before if not scheme.is_scale(n)}
    for name, entry in merged.before.items():
        if scheme.is_scale(name):
            continue
        assert after[name][1:3] == (name_dtype, entry[2]) and after[name][0] == entry[0], name
        if entry[1].startswith("F8"):
            exact = (
                array(merged.exact[name])
                if is_target(name)
                else dequantized(merged.before, scheme, name)
            )
            expected = nearest(exact, np_dtype)
        elif name in merged.exact and is_target(name):
            continue  # lm_head: the float path (its own tests)
        else:
            expected = array(entry).astype(np_dtype)
        assert after[name][3] == np.ascontiguousarray(expected).tobytes(), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert {k: v for k, v in config.items()} == {
        k: v
        for k, v in json.loads((merged.base / "config.json").read_text()).items()
        if k != "quantization_config"
    }
    if (merged.base / INDEX).exists():
        index = json.loads((out / INDEX).read_text())
        assert set(index["weight_map"]) == set(after)
        assert index["metadata"]["total_size"] == sum(len(e[3]) for e in after.values())
    assert summary.quantization["output"] == name_dtype
    assert summary.quantization["tensors_dropped"] == len(merged.before) - len(after)


# -- consumers and engines -----------------------------------------------------------------


def test_transformers_loads_the_block_fp8_output_and_dequantizes_it_as_loratool(merged):
    """transformers (dequantizing on a CPU) loads the output as it loads the base: the same
    keys read and left over (Mistral's ``qscale_act``, which it does not read), each merged
    weight the stored fp8 times its grid, whichever spelling the base gives its scales."""
    if merged.name not in ("block-32", "block-32-scale-e8m0", "block-32-qscale-weight"):
        pytest.skip("transformers' Fp8Dequantize refuses grids that do not divide")
    _, base_info = transformers.AutoModelForCausalLM.from_pretrained(
        merged.base, output_loading_info=True
    )
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        merged.out, output_loading_info=True
    )
    assert info == base_info and not info["missing_keys"], info
    act = merged.scheme.input_scale_suffix
    assert set(info["unexpected_keys"]) == {n for n in merged.before if n.endswith("." + act)}
    params = dict(model.named_parameters())
    for name in merged_fp8(merged):
        q = array(merged.after[name]).astype(np.float32)
        inv = array(merged.after[merged.scheme.weight_scale_name(name)]).astype(np.float32)
        ours = torch.from_numpy(q * np.repeat(np.repeat(inv, 32, 0), 32, 1)).to(params[name].dtype)
        assert torch.equal(params[name].detach(), ours), name
    ids = torch.arange(8)[None]
    assert torch.isfinite(model(ids).logits).all()


def test_a_respelled_base_gets_the_bytes_of_transformers_own_quantizer(merged):
    """For ``<layer>.scale`` (F8_E8M0, ue8m0) and ``<layer>.qscale_weight`` bases, each merged
    weight and its scale are transformers' ``Fp8Quantize`` of the exact float64 sum, byte for
    byte, under the base's own names and dtypes."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    if merged.scheme.name != "hf-block-fp8" or merged.name == "block-32" or "48" in merged.name:
        pytest.skip("the respelled bases (the others: the test above and tests/quant)")
    scheme = merged.scheme
    qc = types.SimpleNamespace(
        weight_block_size=list(scheme.block_size), scale_fmt=scheme.scale_fmt
    )
    quantizer = Fp8Quantize(types.SimpleNamespace(quantization_config=qc))
    for name in merged_fp8(merged):
        exact = torch.from_numpy(array(merged.exact[name]))
        out = quantizer._quantize_one(name, exact)
        scale_name = scheme.weight_scale_name(name)
        stored = merged.before[scale_name]
        theirs = out[name[: -len("weight")] + "weight_scale_inv"].to(
            getattr(torch, array(stored).dtype.name)
        )
        assert merged.after[name][3] == out[name].view(torch.uint8).numpy().tobytes(), name
        assert merged.after[scale_name][:3] == stored[:3]
        assert merged.after[scale_name][3] == theirs.view(torch.uint8).numpy().tobytes(), name


def test_a_per_tensor_qscale_weight_base_merges_and_loads_in_transformers_as_before(
    llama, tmp_path
):
    """Mistral Small 4's layout: one F32 ``qscale_weight`` per projection (no
    weight_block_size), a ``qscale_act`` beside it. The merged weights lie within one fp8 step
    of the float64 sum, keep their names, dtypes and shapes, and transformers loads the output
    as it loads the base (``qscale_act`` left over in both)."""
    scheme = Scheme("hf-block-fp8", "F8_E4M3", "tensor", None, "qscale_weight", "qscale_act")
    content = {}
    for name, value in llama.weights.items():
        if "_proj." not in name:
            content[name] = value.to(torch.bfloat16)
            continue
        q, inv = quantize(scheme, value.float().numpy())
        layer = name[: -len("weight")]
        content[name] = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
        content[layer + "qscale_weight"] = torch.from_numpy(np.asarray(inv)).reshape(())
        content[layer + "qscale_act"] = torch.tensor(0.0123)
    config = llama.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": None,
    }
    write_folder(tmp_path / "base", {"model.safetensors": content}, config)
    summary = merge(tmp_path / "base", [llama.adapter], tmp_path / "out", device="cpu")
    assert summary.quantization["scales_rewritten"] == 12
    before, after = tensors_of(tmp_path / "base"), tensors_of(tmp_path / "out")
    assert {n: e[:3] for n, e in after.items()} == {n: e[:3] for n, e in before.items()}
    for name in (n for n in before if n.endswith("qscale_act")):
        assert after[name] == before[name]
    for name in (n for n, e in before.items() if e[1].startswith("F8") and is_target(n)):
        reference = dequantized(before, scheme, name) + lora_delta(llama.adapter, name)
        step = fp8_step(scheme, reference, array(after[scheme.weight_scale_name(name)]))
        assert np.all(np.abs(dequantized(after, scheme, name) - reference) <= step), name
    loaded = {}
    for side in ("base", "out"):
        _, loaded[side] = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / side, output_loading_info=True
        )
    assert loaded["out"] == loaded["base"] and not loaded["out"]["missing_keys"]
    assert len(loaded["out"]["unexpected_keys"]) == 14  # the qscale_act tensors


def test_the_torch_engine_writes_the_same_bytes_as_the_numpy_engine(merged, tmp_path):
    if merged.name not in ("block-48-partial-edges", "ct-tensor"):
        pytest.skip("one per kind of scale")
    merge(merged.base, [merged.adapter], tmp_path / "torch", device="torch-cpu")
    torch_side = tensors_of(tmp_path / "torch")
    assert torch_side == merged.after


# -- refusals ------------------------------------------------------------------------------


def test_a_merged_fp8_weight_without_its_scale_is_refused(llama, tmp_path):
    block_base(llama, tmp_path / "base", [32, 32])
    shard = tmp_path / "base" / "model-00004-of-00004.safetensors"
    from safetensors.torch import load_file

    content = load_file(shard)
    del content["model.layers.1.mlp.up_proj.weight_scale_inv"]
    save_file(content, shard)
    index = json.loads((tmp_path / "base" / INDEX).read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight_scale_inv"]
    (tmp_path / "base" / INDEX).write_text(json.dumps(index))
    with pytest.raises(UnsupportedBaseError, match="weight_scale_inv' is not in the checkpoint"):
        merge(tmp_path / "base", [llama.adapter], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spelling", ["scale", "qscale_weight"])
def test_scales_spelled_two_ways_are_refused_naming_one_of_each(llama, tmp_path, spelling):
    """transformers reads ``<layer>.weight_scale_inv``, ``.scale`` and ``.qscale_weight`` alike;
    a base that mixes them is not one any tool writes: refused, naming a tensor of each."""
    block_base(llama, tmp_path / "base", [32, 32])
    shard = tmp_path / "base" / "model-00004-of-00004.safetensors"
    from safetensors.torch import load_file

    content = load_file(shard)
    layer = "model.layers.1.mlp.up_proj"
    old, new = f"{layer}.weight_scale_inv", f"{layer}.{spelling}"
    content[new] = content.pop(old)
    save_file(content, shard)
    index = json.loads((tmp_path / "base" / INDEX).read_text())
    index["weight_map"][new] = index["weight_map"].pop(old)
    (tmp_path / "base" / INDEX).write_text(json.dumps(index))
    with pytest.raises(UnsupportedBaseError) as caught:
        merge(tmp_path / "base", [llama.adapter], tmp_path / "out", device="cpu")
    message = str(caught.value)
    assert "scales spelled two ways" in message and repr(new) in message, message
    assert "weight_scale_inv'" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_a_scale_grid_that_does_not_fit_its_weight_is_refused_naming_both(llama, tmp_path):
    """A config whose block size disagrees with the stored grids (here 32x32 grids read as
    64x64 blocks) would broadcast each scale over the wrong elements: refused, naming the
    weight, the scale and the shape expected."""
    block_base(llama, tmp_path / "base", [32, 32])
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedBaseError,
        match=r"weight_scale_inv' is \[\d+, \d+\], expected \[\.\.\., \d+, \d+\]",
    ):
        merge(tmp_path / "base", [llama.adapter], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_the_f64_oracle_is_the_float_merge(merged):
    """The oracle itself: the F64 merge is dequant(W) + the adapter's update, to float32
    product precision (so the byte checks above compare against the exact sum)."""
    for name in merged_fp8(merged):
        reference = dequantized(merged.before, merged.scheme, name) + lora_delta(
            merged.adapter, name
        )
        np.testing.assert_allclose(array(merged.exact[name]), reference, rtol=1e-5, atol=1e-6)


def test_row_blocks_of_whole_scale_blocks_write_the_same_bytes(merged, tmp_path):
    """Blocks of 64 rows (the smallest: PRODUCT_ROWS, and a multiple of a 32-row scale block)
    split the 160-row MLP weights; per-tensor scales keep the tensor whole."""
    if merged.name not in ("block-32", "ct-channel", "ct-tensor"):
        pytest.skip("one per kind of row split")
    merge(merged.base, [merged.adapter], tmp_path / "small", device="cpu", block_bytes=1)
    assert tensors_of(tmp_path / "small") == merged.after


TINY_LLAMA = Path(__file__).resolve().parents[2] / "fixtures" / "bases" / "tiny-llama"
TINY_LORA = Path(__file__).resolve().parents[2] / "fixtures" / "peft" / "llama-lora"


def _quantized_like(folder: Path, extra: dict[str, torch.Tensor], quant_config: dict | None):
    from safetensors.torch import load_file

    shutil.copytree(TINY_LLAMA, folder)
    weights = folder / "model.safetensors"
    save_file({**load_file(weights), **extra}, weights)
    if quant_config is not None:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = quant_config
        (folder / "config.json").write_text(json.dumps(config))


REFUSED = {
    "GPTQ": (
        {"model.layers.0.self_attn.q_proj.qweight": torch.zeros(4, 32, dtype=torch.int32)},
        {"quant_method": "gptq", "bits": 4},
    ),
    "AWQ": ({}, {"quant_method": "awq", "bits": 4}),
    "bitsandbytes NF4": (
        {"model.layers.0.mlp.up_proj.weight.absmax": torch.zeros(4)},
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    ),
    "compressed-tensors pack-quantized (int4)": (
        {"model.layers.0.mlp.up_proj.weight_packed": torch.zeros(4, 4, dtype=torch.int32)},
        None,
    ),
}


@pytest.mark.parametrize("named", list(REFUSED))
def test_bases_in_schemes_loratool_cannot_requantize_are_refused_naming_them(named, tmp_path):
    extra, quant_config = REFUSED[named]
    _quantized_like(tmp_path / "base", extra, quant_config)
    with pytest.raises(UnsupportedBaseError, match=re.escape(f"quantized as {named}")) as caught:
        merge(tmp_path / "base", [TINY_LORA], tmp_path / "out", device="cpu")
    assert caught.value.kind == "unsupported-base"
    assert not (tmp_path / "out").exists()


def test_a_gguf_base_is_refused_naming_gguf(tmp_path):
    base = tmp_path / "model.safetensors"
    base.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    with pytest.raises(UnsupportedBaseError, match="GGUF file"):
        merge(base, [TINY_LORA], tmp_path / "out.safetensors", device="cpu")
