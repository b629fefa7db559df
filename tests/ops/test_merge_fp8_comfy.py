"""Merging a kohya LoRA into fp8 single-file Flux checkpoints: plain F8_E4M3 / F8_E5M2 (made
with torch's cast, as those files are) and ComfyUI scaled fp8 in both forms (legacy
``scale_weight`` + ``scaled_fp8`` marker; current ``_quantization_metadata`` + ``weight_scale``),
quantized with :func:`lora_tools.quant.numeric.quantize` (ComfyUI ships no package; the port is
tested bit-exact in tests/quant). Checked against the float64 sum ``dequant(W) + up @ down *
alpha / rank`` and against loratool's float merge into the dequantized base stored as F64."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from lora_tools.io.safetensors import SafetensorsFile, numpy_dtype
from lora_tools.ops.merge import merge
from lora_tools.quant.numeric import _cast_fp8, dequantize, expand_scale, fp8_step, quantize
from lora_tools.quant.schemes import Scheme

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FLUX = ROOT / "fixtures" / "bases" / "tiny-flux.safetensors"
LORA = ROOT / "fixtures" / "kohya" / "flux-lora.safetensors"
GROWN = "double_blocks.0.img_mlp.0.weight"

SCHEMES = {
    "plain-e4m3": Scheme("plain-fp8", "F8_E4M3"),
    "plain-e5m2": Scheme("plain-fp8", "F8_E5M2"),
    "comfy-legacy": Scheme(
        "comfyui-scaled-fp8",
        "F8_E4M3",
        "tensor",
        None,
        "scale_weight",
        "scale_input",
        marker="scaled_fp8",
    ),
    "comfy-current": Scheme(
        "comfyui-fp8", "F8_E4M3", "tensor", None, "weight_scale", "input_scale"
    ),
}
TORCH_FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def tensors_of(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], bytes]], dict]:
    with SafetensorsFile(path) as reader:
        tensors = {
            name: (info.dtype, tuple(info.shape), reader.read_bytes(name))
            for name, info in reader.header.tensors.items()
        }
        return tensors, dict(reader.header.metadata or {})


def array(entry) -> np.ndarray:
    return np.frombuffer(entry[2], numpy_dtype(entry[0])).reshape(entry[1])


def dequantized(tensors, scheme: Scheme, name: str) -> np.ndarray:
    scale = scheme.weight_scale_name(name)
    return dequantize(scheme, array(tensors[name]), array(tensors[scale]) if scale else None)


def kohya_delta(lora: dict[str, torch.Tensor], name: str) -> np.ndarray | None:
    """The float64 update a kohya LoRA makes to Flux weight ``name`` (BFL names)."""
    module = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
    if f"{module}.lora_up.weight" not in lora:
        return None
    up = lora[f"{module}.lora_up.weight"].double().numpy()
    down = lora[f"{module}.lora_down.weight"].double().numpy()
    alpha = float(lora[f"{module}.alpha"])
    return up @ down * (alpha / down.shape[0])


def build(kind: str, path: Path) -> None:
    """tiny-flux in ``kind``: every 2-D weight fp8, biases bf16."""
    scheme = SCHEMES[kind]
    content, metadata = {}, {"format": "pt"}
    layers = {}
    for name, value in load_file(FLUX).items():
        if value.ndim != 2:
            content[name] = value
            continue
        if scheme.name == "plain-fp8":
            content[name] = value.to(TORCH_FP8[scheme.fp8_dtype])  # how these files are made
            continue
        q, scale = quantize(scheme, value.float().numpy(), compute_dtype="BF16")
        layer = name[: -len(".weight")]
        content[name] = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
        content[f"{layer}.{scheme.weight_scale_suffix}"] = torch.tensor(float(scale))
        if layer == "single_blocks.0.linear2":
            content[f"{layer}.{scheme.input_scale_suffix}"] = torch.tensor(0.5)
        layers[layer] = {"format": "float8_e4m3fn"}
    if scheme.marker:
        content[scheme.marker] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if scheme.name == "comfyui-fp8":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    save_file(content, path, metadata=metadata)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    """The fixture's kohya Flux LoRA with one module's update made large (its layer's amax,
    and so its scale, must grow)."""
    tensors = load_file(LORA)
    key = "lora_unet_" + GROWN[: -len(".weight")].replace(".", "_") + ".lora_up.weight"
    tensors[key] = (tensors[key].float() * 30).to(tensors[key].dtype)
    path = tmp_path_factory.mktemp("lora") / "flux-lora.safetensors"
    with SafetensorsFile(LORA) as reader:
        save_file(tensors, path, metadata=dict(reader.header.metadata or {}))
    return path


@pytest.fixture(scope="module", params=list(SCHEMES))
def merged(request, lora, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    scheme = SCHEMES[request.param]
    build(request.param, root / "base.safetensors")
    merge(root / "base.safetensors", [lora], root / "out.safetensors", device="cpu")
    before, meta_before = tensors_of(root / "base.safetensors")
    f64 = {
        name: torch.from_numpy(
            dequantized(before, scheme, name)
            if entry[0].startswith("F8")
            else array(entry).astype(np.float64)
        )
        for name, entry in before.items()
        if not scheme.is_scale(name)
    }
    save_file(f64, root / "f64.safetensors")
    merge(root / "f64.safetensors", [lora], root / "f64-out.safetensors", device="cpu")
    after, meta_after = tensors_of(root / "out.safetensors")
    return types.SimpleNamespace(
        name=request.param,
        scheme=scheme,
        base=root / "base.safetensors",
        lora=lora,
        update=load_file(lora),
        before=before,
        after=after,
        meta_before=meta_before,
        meta_after=meta_after,
        exact=tensors_of(root / "f64-out.safetensors")[0],
    )


def targeted(m) -> list[str]:
    return [n for n in m.before if n.endswith(".weight") and kohya_delta(m.update, n) is not None]


def test_merged_elements_lie_within_one_fp8_step_and_the_update_landed(merged):
    names = targeted(merged)
    assert len(names) == 6 and "img_in.weight" not in names
    for name in names:
        assert merged.before[name][0].startswith("F8")
        base = dequantized(merged.before, merged.scheme, name)
        reference = base + kohya_delta(merged.update, name)
        ours = dequantized(merged.after, merged.scheme, name)
        scale = merged.scheme.weight_scale_name(name)
        step = fp8_step(merged.scheme, reference, array(merged.after[scale]) if scale else None)
        assert np.all(np.abs(ours - reference) <= step), name
        assert np.linalg.norm(ours - reference) < np.linalg.norm(base - reference), name


def test_the_bytes_are_the_quantizer_applied_to_the_exact_sum(merged):
    for name in targeted(merged):
        q, scale = quantize(merged.scheme, array(merged.exact[name]))
        assert merged.after[name][:2] == merged.before[name][:2]
        assert merged.after[name][2] == q.tobytes(), name
        scale_name = merged.scheme.weight_scale_name(name)
        if scale_name is not None:
            assert merged.after[scale_name][:2] == merged.before[scale_name][:2] == ("F32", ())
            assert merged.after[scale_name][2] == np.float32(scale).tobytes()


def test_a_grown_amax_grows_the_scale_where_the_old_one_would_saturate(merged):
    scheme = merged.scheme
    scale_name = scheme.weight_scale_name(GROWN)
    if scale_name is None:
        pytest.skip("plain fp8 has no scale: it saturates at finfo.max, as torch's cast")
    old, new = array(merged.before[scale_name]), array(merged.after[scale_name])
    assert float(new) > 2 * float(old)
    reference = dequantized(merged.before, scheme, GROWN) + kohya_delta(merged.update, GROWN)
    stale = _cast_fp8(reference / expand_scale(scheme, old, reference.shape), scheme)
    stale_error = np.abs(dequantize(scheme, stale, old) - reference).max()
    ours_error = np.abs(dequantized(merged.after, scheme, GROWN) - reference).max()
    assert stale_error > 10 * ours_error


def test_untouched_tensors_the_marker_and_the_metadata_stay_as_they_were(merged):
    changed = set(targeted(merged))
    changed |= {merged.scheme.weight_scale_name(n) for n in changed} - {None}
    assert list(merged.after) == list(merged.before)  # names, in the base's order
    for name, entry in merged.before.items():
        assert merged.after[name][:2] == entry[:2], name
        if name not in changed:
            assert merged.after[name][2] == entry[2], name
    record = json.loads(merged.meta_after.pop("loratool_merge"))
    assert merged.meta_after == merged.meta_before
    assert record["quantization"]["scheme"] == merged.scheme.name


def nearest_bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even bfloat16 by comparing neighbours (independent of loratool)."""
    guess = values.astype(np.float32).astype(ml_dtypes.bfloat16)
    bits = guess.view(np.uint16).astype(np.int32)
    candidates = np.stack(
        [(bits + d).astype(np.uint16).view(ml_dtypes.bfloat16) for d in (-1, 0, 1)]
    )
    distance = np.nan_to_num(np.abs(candidates.astype(np.float64) - values), nan=np.inf)
    best = distance == distance.min(axis=0)
    even = (candidates.view(np.uint16) & 1) == 0
    pick = np.where(best & even, 0, np.where(best, 1, 2)).argmin(axis=0)
    return np.take_along_axis(candidates, pick[None], axis=0)[0]


def test_dtype_bf16_dequantizes_and_drops_scales_marker_and_quantization_metadata(merged, tmp_path):
    out = tmp_path / "out.safetensors"
    merge(merged.base, [merged.lora], out, dtype="bf16", device="cpu")
    after, metadata = tensors_of(out)
    scheme = merged.scheme
    kept = [n for n in merged.before if not scheme.is_scale(n)]
    assert list(after) == kept
    assert "_quantization_metadata" not in metadata
    for name in kept:
        entry = merged.before[name]
        assert after[name][:2] == ("BF16", entry[1])
        if not entry[0].startswith("F8"):
            continue  # biases: the float path
        exact = (
            array(merged.exact[name])
            if name in targeted(merged)
            else dequantized(merged.before, scheme, name)
        )
        assert after[name][2] == nearest_bf16(exact).tobytes(), name


def test_the_cli_reports_the_scheme_and_its_json_fits_the_schema(merged, tmp_path):
    if merged.name != "comfy-legacy":
        pytest.skip("one CLI run")
    jsonschema = pytest.importorskip("jsonschema")
    from lora_tools.results import json_schema

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "lora_tools", "merge", merged.base, merged.lora]
    result = subprocess.run(
        [*run, "-o", tmp_path / "a.safetensors", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, json_schema("merge"))
    assert doc["quantization"] == {
        "scheme": "comfyui-scaled-fp8",
        "description": "comfyui-scaled-fp8 (F8_E4M3, per-tensor scale)",
        "output": "kept",
        "scales_rewritten": 6,
        "tensors_dropped": 0,
    }
    text = subprocess.run(
        [*run, "-o", tmp_path / "b.safetensors", "--dtype", "bf16"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert text.returncode == 0, text.stderr
    assert (
        "base quantization: comfyui-scaled-fp8 (F8_E4M3, per-tensor scale): dequantized to "
        "BF16, 9 scale tensors dropped" in text.stdout
    )  # 7 scale_weight, 1 scale_input, the marker


def test_a_per_tensor_scale_streamed_in_row_blocks_gives_the_same_bytes(merged, tmp_path):
    """With 64-row blocks ``linear1`` (112 rows) is merged in two: a first pass measures the
    merged weight's amax, the second quantizes each block with the one scale."""
    out = tmp_path / "small.safetensors"
    merge(merged.base, [merged.lora], out, device="cpu", block_bytes=1)
    assert tensors_of(out)[0] == merged.after
