"""Merges across layouts with fused weights: a module that is a row range of a base weight.

A toy architecture is registered for these tests: native ``blocks.N.qkv`` stacks diffusers'
``blocks.N.to_q`` / ``to_k`` / ``to_v`` by rows, and native ``blocks.N.mod`` is diffusers'
``blocks.N.norm`` with its two halves swapped (as Flux's final adaLN is). The same LoRA merged
into the native file and into the diffusers folder must give the same bytes, row for row, in
both directions and both engines, including DoRA and lora_B.bias, and with row blocks that cut
through the fused ranges (hidden size 40: no range starts on a multiple of 64).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lora_tools import layouts
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.io.checkpoint import open_checkpoint
from lora_tools.layouts.base import Piece, PieceTable, stacked
from lora_tools.ops.convert import convert_adapter
from lora_tools.ops.merge import merge
from lora_tools.ops.validate import validate
from lora_tools.resolve import resolve

H = 40  # hidden size: fused ranges start at 40 and 80, inside 64-row product calls
BLOCKS = 2


class _Toy(PieceTable):
    architecture = "toy"

    def __init__(self, h: int, blocks: int) -> None:
        pieces: list[Piece] = []
        for n in range(blocks):
            pieces += stacked(f"blocks.{n}.qkv", [(f"blocks.{n}.to_{c}", h) for c in "qkv"])
            pieces += [
                Piece(f"blocks.{n}.mod", f"blocks.{n}.norm", 0, h, h),
                Piece(f"blocks.{n}.mod", f"blocks.{n}.norm", h, 0, h),
                Piece(f"blocks.{n}.out", f"blocks.{n}.to_out"),
            ]
        super().__init__(pieces)


class _ToyArchitecture:
    @staticmethod
    def from_native(shapes):
        if "blocks.0.qkv.weight" not in shapes:
            return None
        h = shapes["blocks.0.qkv.weight"][1]
        return _Toy(h, len({k.split(".")[1] for k in shapes if k.startswith("blocks.")}))

    @staticmethod
    def from_diffusers(config, shapes):
        if config.get("_class_name") != "ToyTransformer":
            return None
        return _Toy(config["hidden"], config["blocks"])


@pytest.fixture(autouse=True)
def toy_layout(monkeypatch):
    monkeypatch.setattr(layouts, "ARCHITECTURES", (_ToyArchitecture, *layouts.ARCHITECTURES))


def _diffusers_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for n in range(BLOCKS):
        for c in "qkv":
            out[f"blocks.{n}.to_{c}.weight"] = rng.standard_normal((H, H), np.float32)
            out[f"blocks.{n}.to_{c}.bias"] = rng.standard_normal(H, np.float32)
        out[f"blocks.{n}.norm.weight"] = rng.standard_normal((2 * H, H), np.float32)
        out[f"blocks.{n}.norm.bias"] = rng.standard_normal(2 * H, np.float32)
        out[f"blocks.{n}.to_out.weight"] = rng.standard_normal((H, H), np.float32)
        out[f"blocks.{n}.to_out.bias"] = rng.standard_normal(H, np.float32)
    return out


def _native_weights(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for n in range(BLOCKS):
        b = f"blocks.{n}"
        out[f"{b}.qkv.weight"] = np.concatenate([d[f"{b}.to_{c}.weight"] for c in "qkv"])
        out[f"{b}.qkv.bias"] = np.concatenate([d[f"{b}.to_{c}.bias"] for c in "qkv"])
        for part in ("weight", "bias"):
            norm = d[f"{b}.norm.{part}"]
            out[f"{b}.mod.{part}"] = np.concatenate([norm[H:], norm[:H]])
            out[f"{b}.out.{part}"] = d[f"{b}.to_out.{part}"]
    return out


def _bases(tmp_path: Path, dtype=np.float32) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(diffusers folder, native single file, diffusers weights) of one toy model."""
    d = {k: v.astype(dtype) for k, v in _diffusers_weights(np.random.default_rng(0)).items()}
    folder = tmp_path / "toy-diffusers"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"transformer": ["toy", "Toy"]}))
    config = {"_class_name": "ToyTransformer", "hidden": H, "blocks": BLOCKS}
    (folder / "transformer/config.json").write_text(json.dumps(config))
    save_file(d, folder / "transformer/diffusion_pytorch_model.safetensors")
    single = tmp_path / "toy-native.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in _native_weights(d).items()}, single)
    return folder, single, d


def _peft(tmp_path: Path, name: str, factors: dict[str, tuple], *, dora=False, bias=False) -> Path:
    """A PEFT adapter with modules ``path -> (B, A)`` (rank 4, alpha 8)."""
    rng = np.random.default_rng(1)
    tensors = {}
    for path, (b, a) in factors.items():
        stem = f"base_model.model.{path}"
        tensors[f"{stem}.lora_A.weight"] = a
        tensors[f"{stem}.lora_B.weight"] = b
        if dora:
            tensors[f"{stem}.lora_magnitude_vector"] = rng.uniform(0.5, 2, b.shape[0]).astype(
                np.float32
            )
        if bias:
            tensors[f"{stem}.lora_B.bias"] = rng.standard_normal(b.shape[0], np.float32)
    folder = tmp_path / name
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": sorted({p.rsplit(".", 1)[1] for p in factors}),
        "use_dora": dora,
        "lora_bias": bias,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _factors(paths: dict[str, int], seed: int) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    return {
        p: (rng.standard_normal((rows, 4), np.float32), rng.standard_normal((4, H), np.float32))
        for p, rows in paths.items()
    }


def _diffusers_side_factors(seed: int = 2) -> dict[str, tuple]:
    paths = {f"blocks.{n}.to_{c}": H for n in range(BLOCKS) for c in "qkv"}
    paths.update({f"blocks.{n}.norm": 2 * H for n in range(BLOCKS)})
    paths.update({f"blocks.{n}.to_out": H for n in range(BLOCKS)})
    return _factors(paths, seed)


def _native_of(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A merged diffusers folder's tensors, laid out as the native file's."""
    return {f"model.diffusion_model.{k}": v for k, v in _native_weights(weights).items()}


ENGINES = ["cpu", "torch-cpu"]


def _merged_both(folder: Path, single: Path, lora: Path, tmp_path: Path, device: str):
    """(folder merge's tensors, single-file merge's tensors), in 1 KB row blocks: 6 rows of 40
    floats, so blocks cut through every fused range."""
    merge(folder, [lora], tmp_path / "into-diffusers", device=device, block_bytes=1024)
    merge(single, [lora], tmp_path / "into-native.safetensors", device=device, block_bytes=1024)
    by_folder = load_file(
        tmp_path / "into-diffusers/transformer/diffusion_pytorch_model.safetensors"
    )
    return by_folder, load_file(tmp_path / "into-native.safetensors")


@pytest.mark.parametrize("device", ENGINES)
@pytest.mark.parametrize("variant", ["plain", "dora", "bias"])
def test_a_diffusers_named_lora_merges_into_fused_native_rows(tmp_path, device, variant):
    if device == "torch-cpu":
        pytest.importorskip("torch")
    folder, single, _ = _bases(tmp_path)
    lora = _peft(
        tmp_path, "lora", _diffusers_side_factors(), dora=variant == "dora", bias=variant == "bias"
    )
    by_folder, by_file = _merged_both(folder, single, lora, tmp_path, device)
    expected = _native_of(by_folder)
    assert by_file.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(by_file[key], value, err_msg=key)
    # the update landed: every targeted native weight changed
    base = load_file(single)
    changed = {k for k in base if not np.array_equal(base[k], by_file[k])}
    weights = {k for k in base if k.endswith(".weight")}
    assert changed == (set(base) if variant == "bias" else weights)


@pytest.mark.parametrize("device", ENGINES)
def test_a_native_fused_lora_splits_over_diffusers_weights(tmp_path, device):
    if device == "torch-cpu":
        pytest.importorskip("torch")
    folder, single, _ = _bases(tmp_path)
    paths = {f"blocks.{n}.qkv": 3 * H for n in range(BLOCKS)}
    paths.update({f"blocks.{n}.mod": 2 * H for n in range(BLOCKS)})
    lora = _peft(tmp_path, "native-lora", _factors(paths, 3))
    by_folder, by_file = _merged_both(folder, single, lora, tmp_path, device)
    expected = _native_of(by_folder)
    for key in by_file:
        np.testing.assert_array_equal(by_file[key], expected[key], err_msg=key)


def test_fused_rows_equal_a_float64_reference(tmp_path):
    """The native merge against numpy float64: W[rows] + scale * B @ A for each piece."""
    _, single, d = _bases(tmp_path)
    factors = _diffusers_side_factors()
    lora = _peft(tmp_path, "lora", factors)
    merge(single, [lora], tmp_path / "out.safetensors", device="cpu")
    got = load_file(tmp_path / "out.safetensors")
    merged = {
        k.removesuffix(".weight"): d[k].astype(np.float64)
        + 2.0
        * factors[k.removesuffix(".weight")][0].astype(np.float64)
        @ factors[k.removesuffix(".weight")][1].astype(np.float64)
        for k in d
        if k.endswith(".weight")
    }
    ref = _native_weights(d | {f"{k}.weight": v for k, v in merged.items()})
    for key, value in ref.items():
        if key.endswith(".bias"):
            continue
        np.testing.assert_allclose(got[f"model.diffusion_model.{key}"], value, rtol=2e-6, atol=2e-6)


def test_kohya_names_of_native_fused_modules_resolve_in_a_diffusers_folder(tmp_path):
    folder, _, _ = _bases(tmp_path)
    rng = np.random.default_rng(4)
    tensors = {}
    for n in range(BLOCKS):
        stem = f"lora_unet_blocks_{n}_qkv"
        tensors[f"{stem}.lora_down.weight"] = rng.standard_normal((4, H), np.float32)
        tensors[f"{stem}.lora_up.weight"] = rng.standard_normal((3 * H, 4), np.float32)
        tensors[f"{stem}.alpha"] = np.array(4.0, np.float32)
    save_file(tensors, tmp_path / "kohya.safetensors")
    adapter = load_adapter(tmp_path / "kohya.safetensors")
    with open_checkpoint(folder) as ckpt:
        res = resolve(adapter, ckpt)
    assert res.unmatched == [] and not res.ambiguous and not res.shape_errors
    match = res.matches["lora_unet_blocks_0_qkv"]
    assert [
        (p.target.key, p.rows.start, p.rows.update_start, p.rows.count) for p in match.parts
    ] == [
        ("blocks.0.to_q.weight", 0, 0, H),
        ("blocks.0.to_k.weight", 0, H, H),
        ("blocks.0.to_v.weight", 0, 2 * H, H),
    ]


def test_a_fused_module_whose_rows_do_not_fit_is_a_shape_error(tmp_path):
    _, single, _ = _bases(tmp_path)
    lora = _peft(tmp_path, "bad", _factors({"blocks.0.to_q": H + 1}, 5))
    with open_checkpoint(single) as ckpt:
        res = resolve(load_adapter(lora), ckpt)
    assert list(res.shape_errors) == ["base_model.model.blocks.0.to_q"]
    message = res.shape_errors["base_model.model.blocks.0.to_q"]
    assert "has 41 output rows; the layout places 40 rows of it in" in message


def test_a_diffusers_model_folder_and_a_folder_of_a_native_file_have_their_layouts(tmp_path):
    """``transformer/`` of a pipeline (config.json with a diffusers ``_class_name``) is in
    diffusers layout, a folder holding a native single file in the native one: a LoRA named in
    the other layout merges into each as into the pipeline / the single file."""
    folder, single, _ = _bases(tmp_path)
    native_folder = tmp_path / "native-folder"
    native_folder.mkdir()
    (native_folder / single.name).write_bytes(single.read_bytes())
    diffusers_lora = _peft(tmp_path, "lora", _diffusers_side_factors())
    native_paths = {f"blocks.{n}.qkv": 3 * H for n in range(BLOCKS)}
    native_lora = _peft(tmp_path, "native-lora", _factors(native_paths, 3))
    for lora in (diffusers_lora, native_lora):
        name = lora.name
        merge(folder, [lora], tmp_path / f"{name}-pipeline", device="cpu")
        merge(folder / "transformer", [lora], tmp_path / f"{name}-model", device="cpu")
        merge(single, [lora], tmp_path / f"{name}.safetensors", device="cpu")
        merge(native_folder, [lora], tmp_path / f"{name}-native", device="cpu")
        weights = "diffusion_pytorch_model.safetensors"
        want = load_file(tmp_path / f"{name}-pipeline/transformer/{weights}")
        got = load_file(tmp_path / f"{name}-model/{weights}")
        assert got.keys() == want.keys()
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        want = load_file(tmp_path / f"{name}.safetensors")
        got = load_file(tmp_path / f"{name}-native/{single.name}")
        assert got.keys() == want.keys()
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("to", ["peft", "diffusers"])
def test_convert_carries_a_config_whose_targets_select_every_module_written(tmp_path, to):
    """A carried config whose target_modules name the native fused modules (split by
    convert) or name nothing (diffusers' save_lora_weights may write only r and lora_alpha)
    gets the exact module paths: PEFT would otherwise build other layers and load nothing."""
    folder, _, _ = _bases(tmp_path)
    native = _peft(tmp_path, "native", _factors({"blocks.0.qkv": 3 * H}, 3))
    assert json.loads((native / "adapter_config.json").read_text())["target_modules"] == ["qkv"]
    diffusers_lora = tmp_path / "diffusers.safetensors"
    b, a = _factors({"blocks.0.to_q": H}, 4)["blocks.0.to_q"]
    metadata = {
        "lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})
    }
    save_file(
        {
            "transformer.blocks.0.to_q.lora_A.weight": a,
            "transformer.blocks.0.to_q.lora_B.weight": b,
        },
        diffusers_lora,
        metadata,
    )
    for n, source in enumerate((native, diffusers_lora)):
        res = convert_adapter(load_adapter(source), to, base=folder)
        out = tmp_path / f"{to}-{n}"
        save_adapter(res.adapter, out)
        paths = sorted(m.path for m in res.adapter.modules.values())
        if to == "peft":
            targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
        else:
            with safe_open(out / "pytorch_lora_weights.safetensors", "np") as f:
                meta = f.metadata()
            targets = json.loads(meta["lora_adapter_metadata"])["transformer.target_modules"]
        assert sorted(targets) == paths, source
        report = validate([out], base=folder)
        findings = [f.message for fr in report.files for f in fr.findings if f.severity != "info"]
        assert findings == []
        if to == "diffusers":  # alpha in lora_adapter_metadata only: ComfyUI runs it at 1
            assert {f.rule.code for f in report.findings} == {"LT590"}


def test_a_fused_module_of_one_trained_part_splits_back_into_that_part_alone(tmp_path):
    """A LoRA on ``to_q`` alone fused into ``qkv`` (the rows of k and v zero) converts back to
    the one ``to_q`` module with its own factors, not to zero ``to_k`` / ``to_v`` modules that
    validate reports as untrained; a fused module with no trained part keeps its parts."""
    folder, single, _ = _bases(tmp_path)
    factors = _factors({"blocks.0.to_q": H}, 6)
    lora = _peft(tmp_path, "q-only", factors)
    fused = convert_adapter(load_adapter(lora), "kohya", base=single).adapter
    assert [m.path for m in fused.modules.values()] == ["blocks.0.qkv"]
    save_adapter(fused, tmp_path / "fused.safetensors")
    back = convert_adapter(load_adapter(tmp_path / "fused.safetensors"), "peft", base=folder)
    save_adapter(back.adapter, tmp_path / "back")
    got = load_file(tmp_path / "back/adapter_model.safetensors")
    b, a = factors["blocks.0.to_q"]
    assert sorted(got) == [
        "base_model.model.blocks.0.to_q.lora_A.weight",
        "base_model.model.blocks.0.to_q.lora_B.weight",
    ]
    np.testing.assert_array_equal(got["base_model.model.blocks.0.to_q.lora_A.weight"], a)
    np.testing.assert_array_equal(got["base_model.model.blocks.0.to_q.lora_B.weight"], b)
    assert [f for fr in validate([tmp_path / "back"], base=folder).files for f in fr.findings] == []

    untrained = _peft(
        tmp_path, "untrained", {"blocks.0.qkv": (np.zeros((3 * H, 4), np.float32), a)}
    )
    split = convert_adapter(load_adapter(untrained), "peft", base=folder).adapter
    assert sorted(m.path for m in split.modules.values()) == [f"blocks.0.to_{c}" for c in "kqv"]


def test_component_transformer_selects_a_transformer_against_a_single_file(tmp_path):
    """A single-file base names its denoiser ``unet``; ``--component transformer`` (the name
    the diffusers file itself uses) still selects it."""
    _, single, _ = _bases(tmp_path)
    b, a = _factors({"blocks.0.to_q": H}, 7)["blocks.0.to_q"]
    lora = tmp_path / "diffusers.safetensors"
    save_file(
        {
            "transformer.blocks.0.to_q.lora_A.weight": a,
            "transformer.blocks.0.to_q.lora_B.weight": b,
        },
        lora,
    )
    for component in ("transformer", "unet"):
        res = convert_adapter(load_adapter(lora), "peft", base=single, component=component)
        assert [m.path for m in res.adapter.modules.values()] == ["blocks.0.to_q"]
