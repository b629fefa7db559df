"""Flux LoRAs across the two layouts, with diffusers as the judge.

A tiny ``FluxTransformer2DModel`` is saved as a diffusers pipeline folder and as native (BFL)
single files (root keys, as BFL ships them, and ComfyUI's ``model.diffusion_model.``). LoRAs:

- diffusers-named, written by diffusers' own ``FluxPipeline.save_lora_weights`` from a PEFT
  adapter on every linear layer (to_q / to_k / to_v land in rows of the native ``qkv`` and
  ``linear1``; ``norm_out.linear`` in the swapped halves of ``final_layer.adaLN_modulation.1``);
- kohya-named in BFL names (sd-scripts' Flux naming), made by ``loratool convert --to kohya``
  from the diffusers one (fused: A stacked, B block-diagonal).

The reference is diffusers: ``load_lora_weights`` + ``fuse_lora`` on the pipeline. loratool's
merge into the folder must equal it (bit for bit with the torch engine, which multiplies as
PEFT does), and its merge into a native file must hold the same bytes under the native names.
diffusers loads the converted files with every module injected, and a diffusers -> kohya ->
diffusers round trip gives back the factors bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.torch import save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from lora_tools.formats import load_adapter, save_adapter  # noqa: E402
from lora_tools.layouts.flux import from_diffusers  # noqa: E402
from lora_tools.ops.convert import convert_adapter  # noqa: E402
from lora_tools.ops.merge import merge  # noqa: E402
from tests.formats.layout_oracle import native_state_dict  # noqa: E402
from tests.formats.test_flux_layout import FLUX_CONFIGS, _model  # noqa: E402

pytestmark = pytest.mark.oracle

TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_mlp", "proj_out", "norm1.linear", "norm1_context.linear", "norm.linear",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "x_embedder",
    "context_embedder", "norm_out.linear",
]  # fmt: skip


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """Paths of one tiny Flux dev model in three layouts, its diffusers state and layout."""
    root = tmp_path_factory.mktemp("flux")
    model = _model(diffusers.FluxTransformer2DModel, FLUX_CONFIGS["dev"])
    folder = root / "pipeline"
    model.save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"]})
    )
    config = json.loads((folder / "transformer/config.json").read_text())
    state = model.state_dict()
    layout = from_diffusers(config, {k: tuple(v.shape) for k, v in state.items()})
    native = native_state_dict(layout, state)
    save_file({k: v.contiguous() for k, v in native.items()}, root / "bfl.safetensors")
    comfy = {f"model.diffusion_model.{k}": v.contiguous() for k, v in native.items()}
    save_file(comfy, root / "comfy.safetensors")
    return {"root": root, "folder": folder, "state": state, "layout": layout}


@pytest.fixture(scope="module")
def diffusers_lora(flux):
    """A diffusers-format Flux LoRA (rank 2, alpha 4) on every linear layer."""
    model = _model(diffusers.FluxTransformer2DModel, FLUX_CONFIGS["dev"])
    model.add_adapter(
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)
    )
    out = flux["root"] / "diffusers-lora"
    diffusers.FluxPipeline.save_lora_weights(
        out, transformer_lora_layers=peft.get_peft_model_state_dict(model)
    )
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture
def tiny_kohya_conversion(monkeypatch):
    """diffusers' kohya-Flux converter with the tiny model's linear1 split: it hard-codes the
    released model's ``dims=[3072, 3072, 3072, 12288]`` (q, k, v, mlp rows)."""
    import inspect
    import textwrap

    from diffusers.loaders import lora_conversion_utils, lora_pipeline

    name = "_convert_kohya_flux_lora_to_diffusers"
    source = textwrap.dedent(inspect.getsource(getattr(lora_conversion_utils, name)))
    assert source.count("dims=[3072, 3072, 3072, 12288]") == 1
    namespace = dict(vars(lora_conversion_utils))
    exec(source.replace("dims=[3072, 3072, 3072, 12288]", "dims=[8, 8, 8, 32]"), namespace)
    for module in (lora_conversion_utils, lora_pipeline):
        monkeypatch.setattr(module, name, namespace[name], raising=False)


def _fused_by_diffusers(lora: Path) -> dict[str, np.ndarray]:
    """diffusers' merge: load_lora_weights + fuse_lora on a pipeline holding the model."""
    model = _model(diffusers.FluxTransformer2DModel, FLUX_CONFIGS["dev"])
    pipe = diffusers.FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model,
    )
    pipe.load_lora_weights(lora)
    name = next(iter(model.peft_config))
    injected = peft.get_peft_model_state_dict(model, adapter_name=name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    state = _state(model)
    state["__injected__"] = np.array(len(injected))
    return state


def _native_named(flux, state: dict[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    tensors = {k: torch.from_numpy(v) for k, v in state.items() if not k.startswith("__")}
    return {prefix + k: v.numpy() for k, v in native_state_dict(flux["layout"], tensors).items()}


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def _kohya(flux, lora: Path, tmp_path: Path) -> Path:
    """The diffusers LoRA converted to kohya (BFL names, fused) with the native base."""
    res = convert_adapter(load_adapter(lora), "kohya", base=flux["root"] / "bfl.safetensors")
    out = tmp_path / "kohya.safetensors"
    save_adapter(res.adapter, out)
    return out


def test_a_diffusers_lora_merges_into_the_pipeline_as_diffusers_fuses_it(
    flux, diffusers_lora, tmp_path
):
    reference = _fused_by_diffusers(diffusers_lora)
    merge(flux["folder"], [diffusers_lora], tmp_path / "out", device="torch-cpu")
    got = load_file(tmp_path / "out/transformer/diffusion_pytorch_model.safetensors")
    reference.pop("__injected__")
    _assert_same(got, reference)


@pytest.mark.parametrize("base, prefix", [("bfl", ""), ("comfy", "model.diffusion_model.")])
def test_a_diffusers_lora_merges_into_native_single_files(
    flux, diffusers_lora, tmp_path, base, prefix
):
    reference = _fused_by_diffusers(diffusers_lora)
    out = tmp_path / "out.safetensors"
    merge(flux["root"] / f"{base}.safetensors", [diffusers_lora], out, device="torch-cpu")
    _assert_same(load_file(out), _native_named(flux, reference, prefix))


#: Modules diffusers 0.42's kohya-Flux loader leaves out of the pipeline (img_in, txt_in and
#: the final layer: the fused weights stay the base's), measured on this test's file.
DIFFUSERS_KOHYA_DROPS = {
    "x_embedder.weight",
    "context_embedder.weight",
    "proj_out.weight",
    "norm_out.linear.weight",
}


def test_a_kohya_bfl_lora_loads_in_diffusers_and_merges_into_both_layouts(
    flux, diffusers_lora, tmp_path, tiny_kohya_conversion
):
    kohya = _kohya(flux, diffusers_lora, tmp_path)
    names = load_file(kohya)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in names
    assert names["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (6, 8)
    assert names["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (8, 8)
    by_diffusers = _fused_by_diffusers(kohya)  # diffusers' own kohya-Flux conversion
    original = _fused_by_diffusers(diffusers_lora)
    merge(flux["folder"], [kohya], tmp_path / "folder", device="torch-cpu")
    merge(flux["root"] / "bfl.safetensors", [kohya], tmp_path / "bfl.safetensors")
    folder = load_file(tmp_path / "folder/transformer/diffusion_pytorch_model.safetensors")
    base = {k: v.numpy() for k, v in flux["state"].items()}
    skipped = set()
    for key, value in folder.items():
        # the fused kohya file makes the update the diffusers file makes
        np.testing.assert_allclose(value, original[key], rtol=1e-5, atol=1e-5, err_msg=key)
        if np.array_equal(by_diffusers[key], base[key]) and not np.array_equal(value, base[key]):
            skipped.add(key)
            continue
        np.testing.assert_allclose(value, by_diffusers[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert skipped <= DIFFUSERS_KOHYA_DROPS
    # the native file holds the folder's bytes under BFL names (numpy engine there)
    bfl = load_file(tmp_path / "bfl.safetensors")
    for key, value in _native_named(flux, folder).items():
        np.testing.assert_allclose(bfl[key], value, rtol=1e-6, atol=1e-6, err_msg=key)


def test_kohya_to_diffusers_splits_back_to_the_original_factors(
    flux, diffusers_lora, tmp_path, tiny_kohya_conversion
):
    kohya = _kohya(flux, diffusers_lora, tmp_path)
    res = convert_adapter(load_adapter(kohya), "diffusers", base=flux["folder"])
    assert any("split" in note for note in res.notes)
    out = tmp_path / "back"
    save_adapter(res.adapter, out)
    back = load_file(out / "pytorch_lora_weights.safetensors")
    original = load_file(diffusers_lora)
    _assert_same(back, original)
    # diffusers injects every module of the converted file
    assert int(
        _fused_by_diffusers(out / "pytorch_lora_weights.safetensors")["__injected__"]
    ) == len(original)


def test_convert_without_a_base_refuses_bfl_names_for_diffusers(flux, diffusers_lora, tmp_path):
    from lora_tools.errors import UnsupportedAdapterError

    kohya = _kohya(flux, diffusers_lora, tmp_path)
    with pytest.raises(UnsupportedAdapterError, match="--base"):
        convert_adapter(load_adapter(kohya), "diffusers", component="transformer")


def _xlabs_and_comfy(flux, tmp_path: Path) -> tuple[Path, Path, dict]:
    """An XLabs file (scale 1; single-block qkv on the q / k / v rows of linear1) and a ComfyUI
    file (BFL names, alpha, a .diff_b on a projection), with their factors by native module."""
    rng = np.random.default_rng(11)
    h = flux["layout"].hidden
    factors: dict[str, tuple] = {}
    xlabs: dict[str, np.ndarray] = {}
    for n in range(2):
        for name, module, rows in (
            ("qkv_lora1", "img_attn.qkv", 3 * h),
            ("proj_lora1", "img_attn.proj", h),
            ("qkv_lora2", "txt_attn.qkv", 3 * h),
            ("proj_lora2", "txt_attn.proj", h),
        ):
            up = rng.standard_normal((rows, 2), np.float32)
            down = rng.standard_normal((2, h), np.float32)
            xlabs[f"double_blocks.{n}.processor.{name}.up.weight"] = up
            xlabs[f"double_blocks.{n}.processor.{name}.down.weight"] = down
            factors[f"double_blocks.{n}.{module}"] = (up, down, 1.0, (0, rows))
    up = rng.standard_normal((3 * h, 2), np.float32)
    down = rng.standard_normal((2, h), np.float32)
    xlabs["single_blocks.0.processor.qkv_lora.up.weight"] = up
    xlabs["single_blocks.0.processor.qkv_lora.down.weight"] = down
    factors["single_blocks.0.linear1"] = (up, down, 1.0, (0, 3 * h))
    save_file({k: torch.from_numpy(v) for k, v in xlabs.items()}, tmp_path / "xlabs.safetensors")
    stem = "diffusion_model.double_blocks.1.img_attn.proj"
    comfy = {
        f"{stem}.lora_down.weight": rng.standard_normal((2, h), np.float32),
        f"{stem}.lora_up.weight": rng.standard_normal((h, 2), np.float32),
        f"{stem}.alpha": np.array(1.0, np.float32),
        f"{stem}.diff_b": rng.standard_normal(h, np.float32),
    }
    save_file({k: torch.from_numpy(v) for k, v in comfy.items()}, tmp_path / "comfy.safetensors")
    return (
        tmp_path / "xlabs.safetensors",
        tmp_path / "comfy.safetensors",
        {
            "factors": factors,
            "comfy": comfy,
        },
    )


def test_xlabs_and_comfyui_files_merge_into_both_layouts(flux, tmp_path):
    xlabs, comfy, made = _xlabs_and_comfy(flux, tmp_path)
    native = load_file(flux["root"] / "bfl.safetensors")
    expected = {k: v.astype(np.float64) for k, v in native.items()}
    for module, (up, down, scale, (r0, r1)) in made["factors"].items():
        expected[f"{module}.weight"][r0:r1] += scale * up.astype(np.float64) @ down
    stem = "diffusion_model.double_blocks.1.img_attn.proj"
    c = made["comfy"]
    weight = 0.5
    expected["double_blocks.1.img_attn.proj.weight"] += (
        weight
        * 0.5
        * c[f"{stem}.lora_up.weight"].astype(np.float64)
        @ c[f"{stem}.lora_down.weight"]
    )
    expected["double_blocks.1.img_attn.proj.bias"] += weight * c[f"{stem}.diff_b"]
    merge(
        flux["root"] / "bfl.safetensors",
        [xlabs, comfy],
        tmp_path / "bfl.safetensors",
        weights=[1.0, weight],
        device="cpu",
    )
    got = load_file(tmp_path / "bfl.safetensors")
    changed = {k for k in native if not np.array_equal(native[k], got[k])}
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
    # the mlp rows of linear1 are untouched (XLabs' qkv_lora covers q, k, v only)
    h = flux["layout"].hidden
    np.testing.assert_array_equal(
        got["single_blocks.0.linear1.weight"][3 * h :],
        native["single_blocks.0.linear1.weight"][3 * h :],
    )
    assert "double_blocks.1.img_attn.proj.bias" in changed
    merge(flux["folder"], [xlabs, comfy], tmp_path / "folder", weights=[1.0, weight], device="cpu")
    folder = load_file(tmp_path / "folder/transformer/diffusion_pytorch_model.safetensors")
    _assert_same(got, _native_named(flux, folder))
