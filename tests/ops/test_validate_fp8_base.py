"""``validate --base`` against fp8 bases in every scheme: a LoRA resolves as against the float
model the base was quantized from, scale tensors are never taken for weights, and LT405 names
the scheme and what a merge does with the scale (header-only: no torch, no ml_dtypes).

The bases are the fixtures' float models quantized with :func:`lora_tools.quant.numeric.quantize`
(bit-exact with transformers' Fp8Quantize, compressed-tensors and ComfyUI: tests/quant), laid
out as each scheme's own writer lays them out (shared FORMATS.md section 6): HF block FP8 with
partial edge blocks and each scale in another shard than its weight, compressed-tensors per
tensor and per channel with ``input_scale``, ComfyUI's legacy ``scale_weight`` + ``scaled_fp8``
marker and its current ``_quantization_metadata`` / ``comfy_quant`` forms, plain fp8.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_tools.io.safetensors import SafetensorsFile
from lora_tools.ops.validate import validate
from lora_tools.quant.numeric import quantize
from lora_tools.quant.schemes import Scheme
from tests.cli.test_startup import run_probe

ROOT = Path(__file__).resolve().parents[2]
BASES = ROOT / "fixtures" / "bases"
LLAMA_LORA = ROOT / "fixtures" / "peft" / "llama-all-linear"
FLUX_LORA = ROOT / "fixtures" / "kohya" / "flux-lora.safetensors"
INDEX = "model.safetensors.index.json"
COMFY_PREFIX = "model.diffusion_model."

HF_BLOCK = Scheme("hf-block-fp8", "F8_E4M3", "block", (24, 24), "weight_scale_inv")
COMFY = Scheme("comfyui-fp8", "F8_E4M3", "tensor", None, "weight_scale")


def _ct_scheme(strategy: str) -> Scheme:
    return Scheme("compressed-tensors-fp8", "F8_E4M3", strategy, None, "weight_scale")


def _ct_config(strategy: str) -> dict:
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {**weights, "dynamic": False}}
        },
        "ignore": ["lm_head"],
        "quantization_status": "compressed",
    }


def _is_linear(name: str) -> bool:
    return name.endswith("_proj.weight")


def _llama_folder(dest: Path, source: str, quantized: dict, config: dict | None) -> Path:
    """The float Llama ``source`` (folder, maybe sharded) with its projections replaced by
    ``quantized[shard][name]`` tensors; a tensor whose shard is not its weight's is indexed so."""
    shutil.copytree(BASES / source, dest)
    index_file = dest / INDEX
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    for shard, tensors in quantized.items():
        save_file(tensors, dest / shard, metadata={"format": "pt"})
        if index is not None:
            index["weight_map"].update(dict.fromkeys(tensors, shard))
    if index is not None:
        index_file.write_text(json.dumps(index))
    if config is not None:
        full = json.loads((dest / "config.json").read_text())
        full["quantization_config"] = config
        (dest / "config.json").write_text(json.dumps(full))
    return dest


def hf_block_base(dest: Path) -> Path:
    """tiny-llama-sharded in 24x24 block FP8 (32- and 64-wide weights: partial edge blocks),
    each ``weight_scale_inv`` in the shard after its weight's."""
    index = json.loads((BASES / "tiny-llama-sharded" / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    tensors = {s: load_file(BASES / "tiny-llama-sharded" / s) for s in shards}
    for name, shard in index["weight_map"].items():
        if _is_linear(name):
            q, inv = quantize(HF_BLOCK, tensors[shard][name])
            tensors[shard][name] = q
            other = shards[(shards.index(shard) + 1) % len(shards)]
            tensors[other][name + "_scale_inv"] = inv
    config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    return _llama_folder(
        dest, "tiny-llama-sharded", tensors, {**config, "weight_block_size": [24, 24]}
    )


def _single_llama(dest: Path, config: dict | None, convert) -> Path:
    tensors = load_file(BASES / "tiny-llama" / "model.safetensors")
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        out.update(convert(name, value) if _is_linear(name) else {name: value})
    return _llama_folder(dest, "tiny-llama", {"model.safetensors": out}, config)


def ct_base(dest: Path, strategy: str) -> Path:
    """tiny-llama in compressed-tensors FP8: ``weight_scale`` BF16 [1] or [out, 1], static
    ``input_scale`` [1]."""
    scheme = _ct_scheme(strategy)

    def convert(name: str, value: np.ndarray) -> dict[str, np.ndarray]:
        q, scale = quantize(scheme, value.astype(ml_dtypes.bfloat16), compute_dtype="BF16")
        layer = name.removesuffix(".weight")
        one = np.ones(1, ml_dtypes.bfloat16)
        return {name: q, f"{layer}.weight_scale": scale, f"{layer}.input_scale": one}

    config = _ct_config(strategy)
    config["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
    }  # fmt: skip
    return _single_llama(dest, config, convert)


def plain_llama_base(dest: Path, fp8: str) -> Path:
    dtype = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}[fp8]
    return _single_llama(dest, None, lambda name, value: {name: value.astype(dtype)})


def comfy_legacy_llama(dest: Path) -> Path:
    """tiny-llama as ComfyUI's legacy scaled fp8 text encoders are saved (``model.``-rooted
    keys, ``scale_weight`` per layer, a ``scaled_fp8`` marker), one file."""
    tensors = load_file(BASES / "tiny-llama" / "model.safetensors")
    out: dict[str, np.ndarray] = {"scaled_fp8": np.zeros(2, ml_dtypes.float8_e4m3fn)}
    for name, value in tensors.items():
        if _is_linear(name):
            out[name], scale = quantize(COMFY, value)
            out[name.removesuffix(".weight") + ".scale_weight"] = scale
        else:
            out[name] = value
    save_file(out, dest, metadata={"format": "pt"})
    return dest


def _flux_float() -> dict[str, np.ndarray]:
    tensors = load_file(BASES / "tiny-flux.safetensors")
    return {COMFY_PREFIX + name: value for name, value in tensors.items()}


def comfy_flux(dest: Path, form: str) -> Path:
    """tiny-flux (BF16) as ComfyUI saves fp8 diffusion models: under ``model.diffusion_model.``,
    each linear weight F8_E4M3 with a float32 scale; ``legacy``: ``scale_weight`` +
    ``scale_input`` + the ``scaled_fp8`` marker; ``metadata``: ``weight_scale`` + ``input_scale``
    and ``_quantization_metadata``; ``comfy_quant``: the per-layer JSON tensors instead."""
    legacy = form == "legacy"
    out: dict[str, np.ndarray] = {}
    layers: dict[str, dict[str, str]] = {}
    for name, value in _flux_float().items():
        if not name.endswith(".weight"):
            out[name] = value
            continue
        layer = name.removesuffix(".weight")
        out[name], scale = quantize(COMFY, value.astype(np.float32), compute_dtype="BF16")
        out[f"{layer}.{'scale_weight' if legacy else 'weight_scale'}"] = scale
        out[f"{layer}.{'scale_input' if legacy else 'input_scale'}"] = np.asarray(1.0, np.float32)
        layers[layer] = {"format": "float8_e4m3fn"}
        if form == "comfy_quant":
            text = json.dumps(layers[layer]).encode()
            out[f"{layer}.comfy_quant"] = np.frombuffer(text, np.uint8)
    metadata = {"format": "pt"}
    if legacy:
        out[COMFY_PREFIX + "scaled_fp8"] = np.zeros(2, ml_dtypes.float8_e4m3fn)
    elif form == "metadata":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    save_file(out, dest, metadata=metadata)
    return dest


def plain_flux(dest: Path, fp8: str) -> Path:
    dtype = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}[fp8]
    tensors = {
        name: value.astype(np.float32).astype(dtype) if name.endswith(".weight") else value
        for name, value in _flux_float().items()
    }
    save_file(tensors, dest, metadata={"format": "pt"})
    return dest


def flux_float(dest: Path) -> Path:
    save_file(_flux_float(), dest, metadata={"format": "pt"})
    return dest


def kohya_llama_lora(dest: Path, suffix: str = "") -> Path:
    """fixtures' PEFT llama-lora in kohya naming as sd-scripts writes LLM text encoders
    (``lora_unet_model_layers_0_self_attn_q_proj``), each name ending in ``suffix``."""
    tensors = load_file(ROOT / "fixtures" / "peft" / "llama-lora" / "adapter_model.safetensors")
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        path, _, factor = name.removeprefix("base_model.model.").rpartition(".lora_")
        stem = "lora_unet_" + path.replace(".", "_") + suffix
        kind = "lora_down" if factor.startswith("A") else "lora_up"
        out[f"{stem}.{kind}.weight"] = value
        out[f"{stem}.alpha"] = np.asarray(8.0, np.float32)
    save_file(out, dest)
    return dest


#: (case id, adapter, float base builder, fp8 base builder, LT405 words): every scheme.
LLAMA_CASES = [
    ("hf-block", lambda t: hf_block_base(t), "hf-block-fp8 (F8_E4M3, 24x24 blocks)",
     "'weight_scale_inv'"),
    ("ct-tensor", lambda t: ct_base(t, "tensor"),
     "compressed-tensors-fp8 (F8_E4M3, per-tensor scale)", "'weight_scale'"),
    ("ct-channel", lambda t: ct_base(t, "channel"),
     "compressed-tensors-fp8 (F8_E4M3, per-channel scale)", "'weight_scale'"),
    ("plain-e4m3", lambda t: plain_llama_base(t, "F8_E4M3"), "plain-fp8 (F8_E4M3)", "±448"),
    ("plain-e5m2", lambda t: plain_llama_base(t, "F8_E5M2"), "plain-fp8 (F8_E5M2)", "±57344"),
]  # fmt: skip
FLUX_CASES = [
    ("comfy-legacy", lambda t: comfy_flux(t, "legacy"),
     "comfyui-scaled-fp8 (F8_E4M3, per-tensor scale)", "'scale_weight'"),
    ("comfy-metadata", lambda t: comfy_flux(t, "metadata"),
     "comfyui-fp8 (F8_E4M3, per-tensor scale)", "'weight_scale'"),
    ("comfy-quant-tensors", lambda t: comfy_flux(t, "comfy_quant"),
     "comfyui-fp8 (F8_E4M3, per-tensor scale)", "'weight_scale'"),
    ("plain-flux", lambda t: plain_flux(t, "F8_E4M3"), "plain-fp8 (F8_E4M3)", "±448"),
]  # fmt: skip


def _findings(adapter: Path, base: Path) -> list:
    (file,) = validate([adapter], base=base).files
    return file.findings


def _key(finding) -> tuple:
    return finding.rule.code, finding.module, finding.message


def _assert_resolves_as_float(adapter, fp8_base, float_base, scheme, scale):
    """Every finding but LT405 is the float base's; LT405 names the scheme and the scale."""
    on_fp8, on_float = _findings(adapter, fp8_base), _findings(adapter, float_base)
    assert not [f for f in on_float if f.rule.code.startswith("LT4") and f.rule.code != "LT405"]
    assert sorted(_key(f) for f in on_fp8 if f.rule.code != "LT405") == sorted(
        _key(f) for f in on_float if f.rule.code != "LT405"
    )
    (note,) = [f for f in on_fp8 if f.rule.code == "LT405"]
    assert note.rule.severity == "info"
    assert note.expected == scheme and scheme in note.message and scale in note.message
    if scheme.startswith("plain"):
        assert "no scale" in note.message
    else:
        assert "requantize" in note.message and "recomputed scale" in note.message


@pytest.mark.parametrize(
    ("case", "build", "scheme", "scale"), LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES]
)
def test_a_peft_lora_resolves_on_an_fp8_llama_as_on_the_float_one(
    case, build, scheme, scale, tmp_path
):
    base = build(tmp_path / "base")
    _assert_resolves_as_float(LLAMA_LORA, base, BASES / "tiny-llama", scheme, scale)


@pytest.mark.parametrize(
    ("case", "build", "scheme", "scale"), FLUX_CASES, ids=[c[0] for c in FLUX_CASES]
)
def test_a_kohya_lora_resolves_on_a_comfyui_fp8_flux_as_on_the_float_one(
    case, build, scheme, scale, tmp_path
):
    base = build(tmp_path / "flux-fp8.safetensors")
    float_base = flux_float(tmp_path / "flux.safetensors")
    _assert_resolves_as_float(FLUX_LORA, base, float_base, scheme, scale)


def test_block_scales_in_other_shards_are_where_the_index_says(tmp_path):
    """The built base really has what the case claims: scales in another shard, edge blocks."""
    base = hf_block_base(tmp_path / "base")
    weight_map = json.loads((base / INDEX).read_text())["weight_map"]
    name = "model.layers.0.mlp.gate_proj.weight"  # [64, 32]: 3 x 2 blocks of 24, both partial
    assert weight_map[name + "_scale_inv"] != weight_map[name]
    with SafetensorsFile(base / weight_map[name + "_scale_inv"]) as shard:
        scale = shard.info(name + "_scale_inv")
    assert (scale.dtype, tuple(scale.shape)) == ("F32", (3, 2))


def test_comfyui_legacy_scales_are_never_taken_for_modules(tmp_path):
    """A kohya name that flattens to ``<layer>.scale`` once named a ``<layer>.scale_weight``
    scale (read as OpenCLIP's ``<path>_weight``) and failed as LT403 against it; it names no
    weight, on the fp8 base as on the float one."""
    base = comfy_legacy_llama(tmp_path / "llama-fp8.safetensors")
    float_base = tmp_path / "llama.safetensors"
    shutil.copy(BASES / "tiny-llama" / "model.safetensors", float_base)
    lora = kohya_llama_lora(tmp_path / "lora.safetensors")
    _assert_resolves_as_float(
        lora, base, float_base, "comfyui-scaled-fp8 (F8_E4M3, per-tensor scale)", "'scale_weight'"
    )
    scale_named = kohya_llama_lora(tmp_path / "scale-named.safetensors", suffix="_scale")
    for against in (base, float_base):
        findings = _findings(scale_named, against)
        codes = {f.rule.code for f in findings if f.rule.code.startswith("LT4")}
        assert codes == {"LT401", "LT404"}, [f.message for f in findings]
        assert not [f for f in findings if "scale_weight" in f.message]


def test_no_finding_names_a_scale_tensor_as_a_weight_or_module(tmp_path):
    """Against every fp8 base, LT401-LT404 findings (here: a LoRA for another model) name no
    scale tensor; the scales are not counted among the base's weights either."""
    wrong = ROOT / "fixtures" / "broken" / "wrong-base"
    bases = [build(tmp_path / case) for case, build, *_ in LLAMA_CASES]
    bases.append(comfy_legacy_llama(tmp_path / "legacy.safetensors"))
    scale_words = ("weight_scale", "scale_weight", "input_scale", "scale_input", "scaled_fp8")
    expected = sorted(
        _key(f) for f in _findings(wrong, BASES / "tiny-llama") if f.rule.code != "LT405"
    )
    for base in bases:
        findings = _findings(wrong, base)
        assert {"LT401", "LT404"} <= {f.rule.code for f in findings}
        for finding in findings:
            assert not any(word in (finding.message + str(finding.found)) for word in scale_words)
        got = [_key(f) for f in findings if f.rule.code != "LT405"]
        assert sorted(k[:2] for k in got) == sorted(k[:2] for k in expected)


def test_an_fp8_base_with_scales_but_no_scheme_is_noted_as_refused_by_merge(tmp_path):
    """fp8 weights with ``weight_scale`` tensors and no config saying whose: merge refuses
    the base rather than guess how to read the scale; LT405 says so."""

    def convert(name, value):
        q, scale = quantize(_ct_scheme("tensor"), value)
        return {name: q, name.removesuffix(".weight") + ".weight_scale": scale}

    base = _single_llama(tmp_path / "base", None, convert)
    (note,) = [f for f in _findings(LLAMA_LORA, base) if f.rule.code == "LT405"]
    assert "unsupported: fp8 weights with scales but no config" in note.message
    assert "loratool merge refuses this base" in note.message


def test_validate_base_against_fp8_bases_stays_header_only(tmp_path):
    """--ignore LT2 against an fp8 base imports numpy only: the scheme comes from headers."""
    hf = hf_block_base(tmp_path / "hf")
    ct = ct_base(tmp_path / "ct", "channel")
    comfy = comfy_flux(tmp_path / "comfy.safetensors", "legacy")
    commands = [
        ["validate", "--ignore", "LT2", str(LLAMA_LORA), "--base", str(hf), "--json"],
        ["validate", "--ignore", "LT2", str(LLAMA_LORA), "--base", str(ct), "--json"],
        ["validate", "--ignore", "LT2", str(FLUX_LORA), "--base", str(comfy), "--json"],
    ]
    for entry in run_probe(commands):
        assert entry["code"] in (0, None), entry
        assert entry["heavy"] == ["numpy"], f"{entry['args']} imported {entry['heavy']}"
        doc = json.loads(entry["output"])
        rules = [f["rule"] for file in doc["files"] for f in file["findings"]]
        assert rules.count("LT405") == 1, rules


MERGED_CASES = [
    ("hf-block", hf_block_base, LLAMA_LORA, "base"),
    ("ct-channel", lambda t: ct_base(t, "channel"), LLAMA_LORA, "base"),
    ("comfy-legacy", lambda t: comfy_flux(t, "legacy"), FLUX_LORA, "base.safetensors"),
    ("comfy-metadata", lambda t: comfy_flux(t, "metadata"), FLUX_LORA, "base.safetensors"),
]


@pytest.mark.parametrize(
    ("case", "build", "adapter", "name"),
    MERGED_CASES,
    ids=[c[0] for c in MERGED_CASES],
)
def test_a_merged_fp8_base_is_read_as_the_base_it_came_from(case, build, adapter, name, tmp_path):
    """What LT405 says of the merge holds: the output keeps the scheme (validate against it
    finds what it finds against the base: the same LT405 note); with ``--dtype bf16`` it is a
    float base (no note, the scales gone)."""
    from lora_tools.ops.merge import merge

    base = build(tmp_path / name)
    kept = tmp_path / "kept" / name
    floated = tmp_path / "floated" / name
    for out, dtype in ((kept, "keep"), (floated, "bf16")):
        out.parent.mkdir()
        merge(base, adapter, out, dtype=dtype, device="cpu")
    before = sorted(_key(f) for f in _findings(adapter, base))
    assert sorted(_key(f) for f in _findings(adapter, kept)) == before
    notes = [f.message for f in _findings(adapter, floated) if f.rule.code == "LT405"]
    assert all(m.endswith("merges compute in float32 and round to BF16") for m in notes), notes
    assert not [f for f in _findings(adapter, floated) if f.rule.code in ("LT401", "LT403")]
    names = [n for f in sorted(floated.parent.rglob("*.safetensors")) for n in _names(f)]
    assert names and not [n for n in names if "scale" in n.rsplit(".", 1)[-1]]


def _names(path: Path) -> list[str]:
    with SafetensorsFile(path) as f:
        return list(f.header.tensors)


def _gptq(name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    """A projection as AutoGPTQ / GPTQModel save it (4-bit, one group): no ``.weight``."""
    layer, (rows, cols) = name.removesuffix(".weight"), value.shape
    return {
        f"{layer}.qweight": np.zeros((cols // 8, rows), np.int32),
        f"{layer}.qzeros": np.zeros((1, rows // 8), np.int32),
        f"{layer}.scales": np.ones((1, rows), np.float16),
        f"{layer}.g_idx": np.zeros(cols, np.int32),
    }


def _nf4(name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    """A projection as bitsandbytes saves NF4: packed U8 ``weight`` [out * in / 2, 1]."""
    return {
        name: np.zeros((value.size // 2, 1), np.uint8),
        f"{name}.absmax": np.ones(value.size // 64, np.float32),
        f"{name}.quant_map": np.linspace(-1, 1, 16, dtype=np.float32),
        f"{name}.quant_state.bitsandbytes__nf4": np.zeros(8, np.uint8),
    }


UNREAD = [
    ("gptq", _gptq, {"quant_method": "gptq", "bits": 4, "group_size": 128}, "GPTQ",
     {"LT401", "LT404"}),
    ("nf4", _nf4, {"quant_method": "bitsandbytes", "load_in_4bit": True,
                   "bnb_4bit_quant_type": "nf4"}, "bitsandbytes NF4", {"LT403"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "convert", "config", "scheme", "codes"), UNREAD, ids=["gptq", "nf4"]
)
def test_a_base_in_a_scheme_loratool_does_not_read_is_named_not_blamed_on_the_adapter(
    case, convert, config, scheme, codes, tmp_path
):
    """Against a GPTQ or NF4 base the modules resolve to no float weight; the findings say the
    base is quantized as what, instead of "loaders skip it silently" / "made for another
    model" (PEFT loads a LoRA onto such a base)."""
    base = _single_llama(tmp_path / "base", config, convert)
    findings = [f for f in _findings(LLAMA_LORA, base) if f.rule.code.startswith("LT4")]
    assert {f.rule.code for f in findings} == codes
    for finding in findings:
        assert finding.message.endswith(
            f"the base is quantized as {scheme}, whose weights loratool does not read"
        ), finding.message
        assert "skip it silently" not in finding.message and "no effect" not in finding.message
        assert finding.hint == "check the adapter against the unquantized base model"


def test_an_integer_weight_in_no_known_scheme_is_noted_as_refused_by_merge(tmp_path):
    base = _single_llama(tmp_path / "base", None, lambda n, v: {n: np.zeros(v.shape, np.int8)})
    (note,) = [f for f in _findings(LLAMA_LORA, base) if f.rule.code == "LT405"]
    assert note.message.endswith("base weights are I8; loratool merge refuses this base")
    assert note.expected == "I8"  # detect_scheme found no quantization scheme
