"""The support matrix of README.md ("Checkpoint layouts"): every architecture x naming x
(merge into the diffusers pipeline folder, merge into the native single file, convert).

For each architecture a tiny diffusers model (random weights, fixed seed) is saved as a pipeline
folder and as a native single file built through its layout's pieces (each layout's own test
checks those pieces against diffusers' single-file converter). Two LoRAs on every linear layer:

- **diffusers** naming, written by the pipeline class's own ``save_lora_weights`` (rank 2,
  alpha 4, so the scale is not 1);
- **kohya** naming in the architecture's native names (sd-scripts / musubi-tuner style),
  made by ``loratool convert --to kohya --base <native file>``: fused weights get one module
  (A stacked, B block-diagonal).

The reference is PEFT's merge on the diffusers model, checked to equal diffusers' own
``load_lora_weights`` + ``fuse_lora`` on the pipeline bit for bit.
Each cell checks loratool's merge against it: into the folder bit for bit (torch engine, which
multiplies as PEFT does), into the native file with the same bytes under the native names; and
``convert`` back from kohya to diffusers gives the diffusers file's factors bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.torch import save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from lora_tools.formats import load_adapter, save_adapter  # noqa: E402
from lora_tools.layouts import diffusers_layout  # noqa: E402
from lora_tools.ops.convert import convert_adapter  # noqa: E402
from lora_tools.ops.merge import merge  # noqa: E402
from tests.formats import test_flux_layout as flux_case  # noqa: E402
from tests.formats import test_hunyuan_video_layout as hunyuan_case  # noqa: E402
from tests.formats import test_qwen_image_layout as qwen_case  # noqa: E402
from tests.formats import test_sd3_layout as sd3_case  # noqa: E402
from tests.formats import test_unet_layout as unet_case  # noqa: E402
from tests.formats import test_wan_layout as wan_case  # noqa: E402
from tests.formats.layout_oracle import native_state_dict  # noqa: E402

pytestmark = pytest.mark.oracle


@dataclass(frozen=True)
class Architecture:
    name: str
    model_class: str
    pipeline_class: str
    config: dict
    native_prefix: str = "model.diffusion_model."
    component: str = "transformer"
    #: kohya-style trainers name this architecture's modules natively (sd-scripts SDXL: SGM
    #: input_blocks; Flux / Wan / HunyuanVideo: BFL / native); SD1.x: diffusers names.
    kohya_native: bool = True


ARCHITECTURES = {
    "sd": Architecture(
        "sd",
        "UNet2DConditionModel",
        "StableDiffusionPipeline",
        unet_case.SD1,
        component="unet",
        kohya_native=False,
    ),
    "sdxl": Architecture(
        "sdxl",
        "UNet2DConditionModel",
        "StableDiffusionXLPipeline",
        unet_case.SDXL,
        component="unet",
    ),
    "flux": Architecture(
        "flux", "FluxTransformer2DModel", "FluxPipeline", flux_case.FLUX_CONFIGS["dev"]
    ),
    "chroma": Architecture(
        "chroma", "ChromaTransformer2DModel", "ChromaPipeline", flux_case.CHROMA_CONFIG
    ),
    "wan": Architecture("wan", "WanTransformer3DModel", "WanPipeline", wan_case.TINY),
    "hunyuan-video": Architecture(
        "hunyuan-video",
        "HunyuanVideoTransformer3DModel",
        "HunyuanVideoPipeline",
        hunyuan_case.TINY,
    ),
    "sd3": Architecture(
        "sd3", "SD3Transformer2DModel", "StableDiffusion3Pipeline", sd3_case.SD35_MEDIUM
    ),
    "qwen-image": Architecture(
        "qwen-image", "QwenImageTransformer2DModel", "QwenImagePipeline", qwen_case.TINY
    ),
}


def _model(arch: Architecture, seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(diffusers, arch.model_class)(**arch.config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter))
    return model


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@dataclass
class Case:
    arch: Architecture
    folder: Path
    native: Path
    layout: object
    parameters: dict
    diffusers_lora: Path
    reference: dict


def _peft_merged(arch: Architecture, lora_config) -> tuple[dict, dict]:
    """(merged diffusers state dict, LoRA state dict) of a PEFT LoRA on the model."""
    model = _model(arch)
    model.add_adapter(lora_config)
    lora = peft.get_peft_model_state_dict(model)
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.merge()
    merged = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        merged[key.replace(".base_layer.", ".")] = value.detach().clone()
    return merged, lora


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def case(request, tmp_path_factory) -> Case:
    arch = ARCHITECTURES[request.param]
    root = tmp_path_factory.mktemp(arch.name)
    model = _model(arch)
    folder = root / "pipeline"
    model.save_pretrained(folder / arch.component)
    index = {"_class_name": arch.pipeline_class, arch.component: ["diffusers", arch.model_class]}
    (folder / "model_index.json").write_text(json.dumps(index))
    config = json.loads((folder / arch.component / "config.json").read_text())
    state = model.state_dict()
    layout = diffusers_layout(config, {k: tuple(v.shape) for k, v in state.items()})
    assert layout is not None and layout.architecture == arch.name
    parameters = {d: n for n, d in getattr(layout, "parameters", ())}
    native = {
        arch.native_prefix + k: v for k, v in native_state_dict(layout, state, parameters).items()
    }
    save_file({k: v.contiguous() for k, v in native.items()}, root / "native.safetensors")

    lora_config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=_linear_names(model), init_lora_weights=False
    )
    reference, lora = _peft_merged(arch, lora_config)
    out = root / "diffusers-lora"
    pipeline = getattr(diffusers, arch.pipeline_class)
    metadata = {"r": 2, "lora_alpha": 4, "target_modules": _linear_names(model)}
    pipeline.save_lora_weights(
        out,
        **{
            f"{arch.component}_lora_layers": lora,
            f"{arch.component}_lora_adapter_metadata": metadata,
        },
    )
    return Case(
        arch,
        folder,
        root / "native.safetensors",
        layout,
        parameters,
        out / "pytorch_lora_weights.safetensors",
        {k: v.numpy() for k, v in reference.items()},
    )


def _native_named(case: Case, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    native = native_state_dict(case.layout, tensors, case.parameters)
    return {case.arch.native_prefix + k: v.numpy() for k, v in native.items()}


def _same(got: dict, want: dict, exact: bool = True) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if exact:
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(got[key], value, rtol=2e-6, atol=2e-6, err_msg=key)


def _folder_weights(path: Path, component: str) -> dict[str, np.ndarray]:
    return load_file(path / component / "diffusion_pytorch_model.safetensors")


def _converted(case: Case, to: str, tmp_path: Path) -> Path:
    """The diffusers LoRA converted to ``to`` names with the native file as the base, and
    validated (loratool's gate passes on what loratool writes)."""
    res = convert_adapter(load_adapter(case.diffusers_lora), to, base=case.native)
    out = tmp_path / f"{to}.safetensors"
    save_adapter(res.adapter, out)
    _validates(out, case.native)
    return out


def _kohya(case: Case, tmp_path: Path) -> Path:
    return _converted(case, "kohya", tmp_path)


def test_diffusers_naming_into_the_pipeline(case, tmp_path):
    merge(case.folder, [case.diffusers_lora], tmp_path / "out", device="torch-cpu")
    _same(_folder_weights(tmp_path / "out", case.arch.component), case.reference)
    # the reference is a real merge: every linear weight changed
    base = _folder_weights(case.folder, case.arch.component)
    model = _model(case.arch)
    for name in _linear_names(model):
        key = f"{name}.weight"
        assert not np.array_equal(base[key], case.reference[key]), key


def test_diffusers_naming_into_the_native_file(case, tmp_path):
    out = tmp_path / "out.safetensors"
    merge(case.native, [case.diffusers_lora], out, device="torch-cpu")
    _same(load_file(out), _native_named(case, case.reference))


def test_kohya_naming_into_the_pipeline(case, tmp_path):
    kohya = _kohya(case, tmp_path)
    names = {k.split(".")[0] for k in load_file(kohya)}
    assert all(k.startswith("lora_unet_") for k in names)
    flat = {k.removesuffix(".weight").replace(".", "_") for k in load_file(case.native)}
    native = {
        (case.arch.native_prefix + k.removeprefix("lora_unet_")).replace(".", "_") for k in names
    }
    # kohya names in the layout its trainers use: native, or (SD1.x) diffusers
    assert (native <= flat) == case.arch.kohya_native
    merge(case.folder, [kohya], tmp_path / "out", device="torch-cpu")
    _same(_folder_weights(tmp_path / "out", case.arch.component), case.reference, exact=False)


def test_kohya_naming_into_the_native_file(case, tmp_path):
    kohya = _kohya(case, tmp_path)
    out = tmp_path / "out.safetensors"
    merge(case.native, [kohya], out, device="torch-cpu")
    _same(load_file(out), _native_named(case, case.reference), exact=False)


def test_convert_kohya_to_diffusers_gives_back_the_factors(case, tmp_path):
    kohya = _kohya(case, tmp_path)
    res = convert_adapter(load_adapter(kohya), "diffusers", base=case.folder)
    save_adapter(res.adapter, tmp_path / "back")
    _same(
        load_file(tmp_path / "back/pytorch_lora_weights.safetensors"),
        load_file(case.diffusers_lora),
    )


def _validates(path: Path, base: Path) -> None:
    """loratool's own gate passes on what loratool wrote, against the base too."""
    from click.testing import CliRunner

    from lora_tools.cli import cli

    result = CliRunner().invoke(
        cli, ["validate", str(path), "--base", str(base), "--fail-on", "warning"]
    )
    assert result.exit_code == 0, result.output


def test_comfyui_naming_into_both_layouts(case, tmp_path):
    comfy = _converted(case, "comfyui", tmp_path)
    names = {
        k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
        for k in load_file(comfy)
    }
    native = {k.removesuffix(".weight") for k in load_file(case.native)}
    # ComfyUI names: the checkpoint's own (native) module paths under diffusion_model.
    assert {n.replace("diffusion_model.", case.arch.native_prefix, 1) for n in names} <= native
    assert load_adapter(comfy).format == "comfyui"
    merge(case.folder, [comfy], tmp_path / "out", device="torch-cpu")
    _same(_folder_weights(tmp_path / "out", case.arch.component), case.reference, exact=False)
    out = tmp_path / "out.safetensors"
    merge(case.native, [comfy], out, device="torch-cpu")
    _same(load_file(out), _native_named(case, case.reference), exact=False)


def test_the_reference_is_what_diffusers_fuse_lora_gives(case):
    """The merges above are compared with PEFT's merge on the diffusers model; diffusers' own
    pipeline (``load_lora_weights`` of the file + ``fuse_lora``) gives the same bytes."""
    import inspect

    pipeline = getattr(diffusers, case.arch.pipeline_class)
    params = [p for p in inspect.signature(pipeline.__init__).parameters if p != "self"]
    model = _model(case.arch)
    pipe = pipeline(**{p: model if p == case.arch.component else None for p in params})
    pipe.load_lora_weights(case.diffusers_lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    _same(fused, case.reference)
