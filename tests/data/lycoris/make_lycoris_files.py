"""Write the LyCORIS test files with lycoris-lora itself (not run by the tests).

    pip install lycoris-lora einops toml     # any CPU torch; 4.1.3 made the committed files
    python tests/data/lycoris/make_lycoris_files.py

Each ``<algo>.safetensors`` is what ``lycoris.kohya.LycorisNetworkKohya.save_weights`` writes for
the UNet of fixtures/bases/tiny-sd (Transformer2DModel and ResnetBlock2D layers, rank 2, fp16,
random weights), including its ``sshs_model_hash``. ``state_dict_order.json`` records each file's
``state_dict()`` key order, the order LyCORIS hashes the tensors in, which the file itself does
not keep.
"""

from __future__ import annotations

import json
from pathlib import Path

import lycoris.kohya as lycoris_kohya
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

HERE = Path(__file__).resolve().parent
BASE = HERE.parents[2] / "fixtures" / "bases" / "tiny-sd"
PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]
unet_target_name = []
text_encoder_target_module = []
text_encoder_target_name = []
"""
FILES = {
    "loha": {"algo": "loha"},
    "loha-tucker": {"algo": "loha", "use_tucker": True},
    "lokr": {"algo": "lokr", "factor": 2},
    "lokr-tucker": {"algo": "lokr", "factor": 2, "use_tucker": True},
    "locon-dora": {"algo": "locon", "dora_wd": True},
    "full": {"algo": "full"},
    "diag-oft": {"algo": "diag-oft"},
}


def write_network(
    path: Path,
    args: dict,
    *,
    seed: int,
    preset: Path,
    noise: float = 0.01,
    dtype: torch.dtype = torch.float16,
):
    """lycoris-lora's kohya network with ``args`` on tiny-sd (the modules ``preset`` names),
    every parameter moved by ``noise`` times a normal draw after ``seed``, saved to ``path``;
    returns the network (its ``loras`` are the trained modules)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(BASE / "unet")
    text_encoder = CLIPTextModel.from_pretrained(BASE / "text_encoder")
    net = lycoris_kohya.create_network(
        1.0, 2, 1.0, None, text_encoder, unet, preset=str(preset), conv_dim=2, conv_alpha=1,
        **args,
    )  # fmt: skip
    net.apply_to(text_encoder, unet, True, True)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * noise)
    net.save_weights(str(path), dtype, {})
    return net


def main() -> None:
    preset = HERE / "preset.toml"
    preset.write_text(PRESET)
    orders = {}
    try:
        for name, args in FILES.items():
            path = HERE / f"{name}.safetensors"
            net = write_network(path, args, seed=len(orders), preset=preset)
            orders[name] = list(net.state_dict())
    finally:
        preset.unlink()
    (HERE / "state_dict_order.json").write_text(json.dumps(orders) + "\n")


if __name__ == "__main__":
    main()
