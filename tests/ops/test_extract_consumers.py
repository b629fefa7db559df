"""``extract`` for diffusion models, judged by the consumer: what it writes for the tiny SD
pipeline folder (diffusers and kohya names) and for the Flux / SDXL single files (kohya names)
is loaded with diffusers' own loaders and fused, and every fused weight must be the
fine-tune's within the error extract reports for its module (plus float rounding); diffusers
must say nothing about the file, and ``validate --base --fail-on warning`` / ``--profile
diffusers`` / ``--profile comfyui`` must find nothing. What diffusers cannot hold (full
``.diff`` tensors; kohya text-encoder q/k/v without an out_proj) extract says in its notes.

The fine-tunes are built here from the fixtures: a planted rank-2 update (plus noise of 1e-5)
on attention / MLP linears and, for SD, a 3x3 conv, a 1x1 conv and text-encoder linears; a
changed norm and bias for --keep-diffs.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from lora_tools.io.safetensors import SafetensorsFile, save_tensors
from lora_tools.ops._algebra import write_adapter
from lora_tools.ops.extract import ExtractResult, extract
from lora_tools.ops.validate import validate
from tests import consumers as oracle

pytest.importorskip("diffusers")

FIX = Path(__file__).resolve().parents[2] / "fixtures"
SD = FIX / "bases/tiny-sd"
FLUX = FIX / "bases/tiny-flux.safetensors"
SDXL = FIX / "bases/tiny-sdxl.safetensors"
UNET_FILE, TE_FILE = "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"
ATTN = "down_blocks.1.attentions.0."
SD_UNET = (
    ATTN + "transformer_blocks.0.attn1.to_q.weight",
    ATTN + "transformer_blocks.0.attn2.to_k.weight",
    ATTN + "transformer_blocks.0.ff.net.0.proj.weight",
    ATTN + "proj_in.weight",  # a 1x1 conv
    "down_blocks.1.resnets.0.conv1.weight",  # a 3x3 conv
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
)
SD_TE = (
    "text_model.encoder.layers.0.self_attn.q_proj.weight",
    "text_model.encoder.layers.0.self_attn.out_proj.weight",
    "text_model.encoder.layers.0.mlp.fc1.weight",
)
SD_OTHER = (ATTN + "transformer_blocks.0.norm1.weight", "down_blocks.1.resnets.0.conv1.bias")


def planted(name: str, shape: tuple[int, ...], spectrum=(0.3, 0.1)) -> np.ndarray:
    """A rank-2 update with a knee (noise 1e-5), seeded by the tensor's name."""
    g = np.random.default_rng(zlib.crc32(name.encode()))
    rows, cols = shape[0], int(np.prod(shape[1:]))
    u, _ = np.linalg.qr(g.standard_normal((rows, len(spectrum))))
    v, _ = np.linalg.qr(g.standard_normal((cols, len(spectrum))))
    d = (u * np.asarray(spectrum)) @ v.T + 1e-5 * g.standard_normal((rows, cols))
    return d.reshape(shape)


def changed(path: Path, out: Path, lora: tuple[str, ...], other: tuple[str, ...] = ()) -> None:
    """``path`` with a planted update on ``lora`` and a small shift on ``other``, in its dtypes."""
    with SafetensorsFile(path) as f:
        tensors = {k: f.read(k) for k in f}
        metadata = f.metadata
    for key in lora:
        w = tensors[key]
        tensors[key] = (w.astype(np.float64) + planted(key, w.shape)).astype(w.dtype)
    for key in other:
        w = tensors[key]
        tensors[key] = (w.astype(np.float64) + 0.05).astype(w.dtype)
    save_tensors(out, tensors, metadata or None)


@pytest.fixture(scope="module")
def sd_ft(tmp_path_factory) -> Path:
    ft = tmp_path_factory.mktemp("sd") / "ft"
    shutil.copytree(SD, ft)
    changed(SD / UNET_FILE, ft / UNET_FILE, SD_UNET, SD_OTHER)
    changed(SD / TE_FILE, ft / TE_FILE, SD_TE)
    return ft


def written(result: ExtractResult, out: Path, base: Path, profiles: tuple[str, ...]) -> Path:
    """Write the adapter; validate against the base and under each profile: no finding."""
    write_adapter(result.adapter, out, [])
    report = validate([out], base=base)
    assert not report.failed("warning"), [f.message for f in report.findings]
    for profile in profiles:
        found = validate([out], base=base, profiles=profile).findings
        assert [f.message for f in found] == [], profile
    return out


def assert_within_reported(result: ExtractResult, ft: Path, got: dict, base: dict) -> None:
    """Each module's fused weight (the consumer's ``component/key``) is the fine-tune's
    within its reported error (plus float rounding)."""
    for row in result.modules:
        comp, key = row.tensor.split("/", 1)
        with SafetensorsFile(ft / (UNET_FILE if comp == "unet" else TE_FILE)) as f:
            w_ft = f.read(key).astype(np.float64)
        name = oracle.norm_key(comp, key)
        err = np.linalg.norm(w_ft - got[name]) / np.linalg.norm(w_ft - base[name])
        assert err <= row.relative_error * (1 + 1e-3) + 1e-6, (row.tensor, err, row)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_sd_pipeline_loads_in_diffusers_with_the_fine_tuned_weights(tmp_path, sd_ft, fmt) -> None:
    result = extract(SD, sd_ft, rank=2, format=fmt)
    assert len(result.modules) == len(SD_UNET) + len(SD_TE)
    assert {m.kind for m in result.adapter.modules.values()} == {"linear", "conv"}
    profiles = ("diffusers", "comfyui") if fmt == "kohya" else ("diffusers",)
    out = written(result, tmp_path / "lora.safetensors", SD, profiles)
    consumed = oracle.diffusers_consume(SD, out)
    assert consumed.problems(len(result.modules)) == []
    assert_within_reported(result, sd_ft, consumed.merged, consumed.base)


def test_kohya_text_encoder_q_proj_without_out_proj_is_noted(tmp_path, sd_ft) -> None:
    """diffusers 0.42 drops kohya text-encoder q/k/v modules unless an out_proj module sits
    in the same text encoder (it renames the old attention-processor names only then)."""
    result = extract(SD, sd_ft, rank=2, format="kohya", modules=r"q_proj|fc1|unet/")
    stem = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert stem in result.adapter.modules
    (note,) = [n for n in result.notes if "no self_attn_out_proj" in n]
    assert stem in note and "diffusers" in note and "--format diffusers" in note
    out = tmp_path / "lora.safetensors"
    write_adapter(result.adapter, out, [])
    consumed = oracle.diffusers_consume(SD, out)
    assert any("UNEXPECTED" in m for m in consumed.messages)  # what the note says
    found = [(f.rule.code, f.module) for f in validate([out], profiles="diffusers").findings]
    assert ("LT547", stem) in found
    q = "text_encoder/encoder.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(consumed.merged[q], consumed.base[q])
    # with q_proj alone in the text encoder, diffusers refuses the file
    alone = extract(SD, sd_ft, rank=2, format="kohya", modules=r"q_proj|unet/")
    assert [n for n in alone.notes if "no self_attn_out_proj" in n]
    write_adapter(alone.adapter, tmp_path / "alone.safetensors", [])
    with pytest.raises(ValueError, match="Could not automatically infer"):
        oracle.diffusers_consume(SD, tmp_path / "alone.safetensors")
    (finding,) = [
        f
        for f in validate([tmp_path / "alone.safetensors"], profiles="diffusers").findings
        if f.rule.code == "LT547"
    ]
    assert "refuses the file" in finding.message
    # with out_proj beside it (the full extract above), no note
    assert not [
        n for n in extract(SD, sd_ft, rank=2, format="kohya").notes if "no self_attn_out_proj" in n
    ]


def test_keep_diffs_for_diffusers_lists_what_it_cannot_hold(tmp_path, sd_ft) -> None:
    result = extract(SD, sd_ft, rank=2, keep_diffs=True)
    assert result.format == "diffusers" and not result.adapter.passthrough
    assert {t.tensor for t in result.tensors} == {f"unet/{k}" for k in SD_OTHER}
    assert {t.status for t in result.tensors} == {"listed"}
    assert any("cannot hold full tensors" in n for n in result.notes)
    out = written(result, tmp_path / "lora.safetensors", SD, ("diffusers",))
    assert oracle.diffusers_consume(SD, out).problems(len(result.modules)) == []


def test_keep_diffs_in_kohya_says_diffusers_refuses_what_comfyui_applies(tmp_path, sd_ft) -> None:
    result = extract(SD, sd_ft, rank=2, format="kohya", keep_diffs=True)
    assert {t.status for t in result.tensors} == {"stored"}
    (note,) = [n for n in result.notes if ".diff" in n]
    assert "ComfyUI" in note and "refuses" in note
    out = tmp_path / "lora.safetensors"
    write_adapter(result.adapter, out, [])
    codes = {f.rule.code for f in validate([out], base=SD, profiles="diffusers").findings}
    assert "LT542" in codes
    with pytest.raises(ValueError, match="have not been correctly renamed"):
        oracle.diffusers_consume(SD, out)


# -- Flux (BFL single file, kohya names) ------------------------------------------------------

#: BFL key -> (diffusers FluxTransformer2DModel key, first row, rows) of its fused pieces
FLUX_PIECES = {
    "double_blocks.0.img_attn.qkv.weight": [
        (f"transformer_blocks.0.attn.to_{c}.weight", 16 * i, 16) for i, c in enumerate("qkv")
    ],
    "double_blocks.0.txt_attn.qkv.weight": [
        (f"transformer_blocks.0.attn.add_{c}_proj.weight", 16 * i, 16) for i, c in enumerate("qkv")
    ],
    "double_blocks.0.img_attn.proj.weight": [("transformer_blocks.0.attn.to_out.0.weight", 0, 16)],
    "double_blocks.0.img_mlp.0.weight": [("transformer_blocks.0.ff.net.0.proj.weight", 0, 64)],
    "single_blocks.0.linear2.weight": [("single_transformer_blocks.0.proj_out.weight", 0, 16)],
}


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    # the shapes of fixtures/bases/tiny-flux.safetensors: width 16 (2 heads of 8), MLP 64
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    )


def flux_consume(path: Path, base: dict[str, np.ndarray]):
    """Load the kohya file into the tiny FluxTransformer2DModel whose pieces hold the BFL
    base's rows, fuse it, and return the fused BFL tensors (pieces stacked back) and the
    messages (every diffusers record from info up: the Flux converter drops at info level)."""
    import logging

    import torch
    from diffusers import FluxPipeline

    model = tiny_flux()
    state = model.state_dict()
    for key, pieces in FLUX_PIECES.items():
        for name, start, rows in pieces:
            state[name] = torch.from_numpy(base[key][start : start + rows]).float()
    model.load_state_dict(state)
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        with oracle.captured() as messages:
            sd = FluxPipeline.lora_state_dict(str(path))
            FluxPipeline.load_lora_into_transformer(sd, network_alphas=None, transformer=model)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    model.fuse_lora()
    fused = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()}
    out = {
        key: np.concatenate([fused[name].double().numpy() for name, _, _ in pieces])
        for key, pieces in FLUX_PIECES.items()
    }
    lora_layers = {k.split(".lora_A.")[0] for k in model.state_dict() if ".lora_A." in k}
    # a ResourceWarning is the garbage collector closing some earlier file, not the load's
    said = [m for m in messages if not m.startswith("ResourceWarning")]
    return out, said + [r for r in records if "filter out" in r], len(lora_layers)


@pytest.fixture(scope="module")
def flux_ft(tmp_path_factory) -> Path:
    """tiny-flux with a planted update on the five weights of FLUX_PIECES (not linear1:
    diffusers' Flux converter splits it with Flux.1's widths, 3072 and 12288, hard-coded) and
    one changed bias."""
    out = tmp_path_factory.mktemp("flux") / "ft.safetensors"
    changed(FLUX, out, tuple(FLUX_PIECES), ("double_blocks.0.img_attn.proj.bias",))
    return out


def test_flux_kohya_loads_in_diffusers_with_the_fine_tuned_weights(tmp_path, flux_ft) -> None:
    result = extract(FLUX, flux_ft, rank=2)
    assert result.format == "kohya" and len(result.modules) == len(FLUX_PIECES)
    out = written(result, tmp_path / "lora.safetensors", FLUX, ("diffusers", "comfyui"))
    base = oracle_read(FLUX)
    fused, messages, layers = flux_consume(out, base)
    assert messages == [] and layers == 9  # qkv: three layers each
    ft = oracle_read(flux_ft)
    for row in result.modules:
        dw = ft[row.tensor] - base[row.tensor]
        err = np.linalg.norm(ft[row.tensor] - fused[row.tensor]) / np.linalg.norm(dw)
        # bf16 base and factors: the fused float32 weight is the bf16 base plus the update
        assert err <= row.relative_error * (1 + 1e-3) + 1e-6, (row.tensor, err, row)


def test_flux_keep_diffs_says_diffusers_drops_the_bias(tmp_path, flux_ft) -> None:
    result = extract(FLUX, flux_ft, rank=2, keep_diffs=True)
    module = result.adapter.modules["lora_unet_double_blocks_0_img_attn_proj"]
    assert module.keys["bias_diff"] == "lora_unet_double_blocks_0_img_attn_proj.diff_b"
    (note,) = [n for n in result.notes if ".diff" in n]
    assert "Flux" in note and "drops" in note
    out = tmp_path / "lora.safetensors"
    write_adapter(result.adapter, out, [])
    _, messages, _ = flux_consume(out, oracle_read(FLUX))
    assert any("diff_b" in m for m in messages)  # what the note says: dropped, at info level


def oracle_read(path: Path) -> dict[str, np.ndarray]:
    with SafetensorsFile(path) as f:
        return {k: f.read(k).astype(np.float64) for k in f}


# -- SDXL (SGM single file, kohya names) ------------------------------------------------------

TE2 = "conditioner.embedders.1.model.transformer.resblocks.0."


def test_sdxl_openclip_text_encoder_gets_the_names_consumers_map(tmp_path) -> None:
    """SDXL's second text encoder is OpenCLIP in the single file; kohya names it in
    transformers' layout (lora_te2_text_model_encoder_layers_0_self_attn_out_proj), which is
    what diffusers loads into CLIPTextModelWithProjection (and ComfyUI maps)."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    ft = tmp_path / "ft.safetensors"
    changed(SDXL, ft, (TE2 + "attn.out_proj.weight",))
    result = extract(SDXL, ft, rank=2)
    (row,) = result.modules
    assert row.module == "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"
    out = written(result, tmp_path / "lora.safetensors", SDXL, ("diffusers", "comfyui"))
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=16,
    )
    te2 = CLIPTextModelWithProjection(config)
    base, want = oracle_read(SDXL), oracle_read(ft)
    name = "text_model.encoder.layers.0.self_attn.out_proj.weight"
    with torch.no_grad():
        te2.get_parameter(name).copy_(torch.from_numpy(base[row.tensor]))
    with oracle.captured() as messages:
        sd, alphas = StableDiffusionXLPipeline.lora_state_dict(str(out))
        StableDiffusionXLPipeline.load_lora_into_text_encoder(
            sd, alphas, te2, prefix="text_encoder_2"
        )
    assert messages == []
    te2.fuse_lora() if hasattr(te2, "fuse_lora") else _fuse(te2)
    fused = {k.replace(".base_layer.", "."): v for k, v in te2.state_dict().items()}
    got = fused[name].double().numpy()
    err = np.linalg.norm(want[row.tensor] - got) / np.linalg.norm(
        want[row.tensor] - base[row.tensor]
    )
    assert err <= row.relative_error * (1 + 1e-3) + 1e-6


def _fuse(model) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()


def test_sdxl_keep_diffs_note_names_what_kohya_cannot_hold(tmp_path) -> None:
    ft = tmp_path / "ft.safetensors"
    changed(SDXL, ft, (TE2 + "attn.out_proj.weight", TE2 + "attn.in_proj_weight"))
    result = extract(SDXL, ft, rank=2, keep_diffs=True)
    assert [r.module for r in result.modules] == [
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"
    ]
    (note,) = [n for n in result.notes if "not stored" in n]
    assert "in_proj_weight" in note and "--format peft" in note
