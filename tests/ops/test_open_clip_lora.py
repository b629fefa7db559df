"""Text-encoder LoRAs in SDXL and SD2 single files, whose OpenCLIP encoder fuses q / k / v.

sd-scripts names text-encoder modules as transformers does (``lora_te2_text_model_encoder_
layers_0_self_attn_q_proj``); an SDXL single file keeps its second encoder in OpenCLIP's names
(``conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight``, q / k / v
stacked). A tiny CLIPTextModelWithProjection (as SDXL's) and CLIPTextModel (as SD2's) are
written in that layout; a kohya LoRA on every linear layer merged into the file must equal the
float64 merge on the transformers model, laid out the same way, and leave the rest unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")

from lora_tools.formats import load_adapter  # noqa: E402
from lora_tools.io.checkpoint import open_checkpoint  # noqa: E402
from lora_tools.layouts.open_clip import from_native  # noqa: E402
from lora_tools.ops.merge import merge  # noqa: E402
from lora_tools.resolve import resolve  # noqa: E402
from tests.formats.test_open_clip_layout import SD2, SDXL, _model, _native  # noqa: E402

pytestmark = pytest.mark.oracle

CASES = [("CLIPTextModelWithProjection", SDXL, "lora_te2"), ("CLIPTextModel", SD2, "lora_te")]


def _kohya_lora(model, prefix: str, path) -> dict[str, np.ndarray]:
    """A kohya LoRA (rank 2, alpha 1) on every linear layer of the encoder layers."""
    rng = np.random.default_rng(7)
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in name:
            continue
        full = name if name.startswith("text_model.") else f"text_model.{name}"
        stem = f"{prefix}_{full.replace('.', '_')}"  # sd-scripts spells text_model. always
        out[f"{stem}.lora_down.weight"] = rng.standard_normal((2, module.in_features), np.float32)
        out[f"{stem}.lora_up.weight"] = rng.standard_normal((module.out_features, 2), np.float32)
        out[f"{stem}.alpha"] = np.array(1.0, np.float32)
    save_file(out, path)
    return out


@pytest.mark.parametrize(("cls_name", "file_prefix", "kohya_prefix"), CASES)
def test_kohya_text_encoder_lora_merges_into_open_clip_rows(
    tmp_path, cls_name, file_prefix, kohya_prefix
):
    model = _model(cls_name)
    state = model.state_dict()
    layout = from_native_layout(state)
    shapes = {k: tuple(v.shape) for k, v in _native(state, layout).items()}
    found = from_native(shapes)
    assert found is not None and (found.width, found.layers) == (layout.width, layout.layers)
    native = {file_prefix + k: v.numpy() for k, v in _native(state, layout).items()}
    base = tmp_path / "base.safetensors"
    save_file(native, base)
    lora = _kohya_lora(model, kohya_prefix, tmp_path / "lora.safetensors")

    adapter = load_adapter(tmp_path / "lora.safetensors")
    with open_checkpoint(base) as ckpt:
        res = resolve(adapter, ckpt)
    assert res.unmatched == [] and not res.ambiguous and not res.shape_errors
    fused = [m for m in res.matches.values() if m.parts]
    assert len(fused) == 3 * 3  # q, k, v of three layers land in rows of in_proj_weight

    merge(base, [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors", device="cpu")
    got = load_file(tmp_path / "out.safetensors")

    merged = {k: v.double() for k, v in state.items()}
    for key in lora:
        if key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            module = stem.removeprefix(kohya_prefix + "_").removeprefix("text_model_")
            weight = next(
                k
                for k in state
                if k.removeprefix("text_model.").replace(".", "_") == f"{module}_weight"
            )
            up = torch.from_numpy(lora[f"{stem}.lora_up.weight"]).double()
            down = torch.from_numpy(lora[key]).double()
            merged[weight] = merged[weight] + 0.5 * up @ down
    expected = {
        file_prefix + k: v.numpy()
        for k, v in _native({k: v.float() for k, v in merged.items()}, layout).items()
    }
    assert got.keys() == expected.keys()
    changed = set()
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
        if not np.array_equal(got[key], native[key]):
            changed.add(key.removeprefix(file_prefix))
    parts = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    assert changed == {
        f"transformer.resblocks.{n}.{p}" for n in range(layout.layers) for p in parts
    }


def from_native_layout(state):
    """The layout a transformers encoder's own shapes give (its layer count and width)."""
    import re

    from lora_tools.layouts.open_clip import OpenClipLayout

    layers = 1 + max(int(m.group(1)) for k in state if (m := re.search(r"layers\.(\d+)\.", k)))
    width = next(v for k, v in state.items() if k.endswith("token_embedding.weight")).shape[1]
    prefix = "text_model." if any(k.startswith("text_model.") for k in state) else ""
    return OpenClipLayout(width=width, layers=layers, prefix=prefix)
