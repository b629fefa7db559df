"""Write the ``lycoris_``-prefixed test files with lycoris-lora itself (not run by the tests).

    pip install lycoris-lora einops toml     # any CPU torch; 4.1.3 made the committed files
    python tests/data/lycoris/make_lycoris_prefix_files.py

``lycoris.create_lycoris`` (the wrapper SimpleTuner trains with; lycoris/wrapper.py
``LycorisNetwork.LORA_PREFIX = "lycoris"``) on the UNet of fixtures/bases/tiny-sd and on a tiny
diffusers FluxTransformer2DModel (random init, seed 0), algo ``lora`` at rank 2, alpha 1,
attention layers only (diffusers names them Attention and FluxAttention), random factors, saved with ``save_weights`` in fp16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from lycoris import LycorisNetwork, create_lycoris

HERE = Path(__file__).resolve().parent
BASE = HERE.parents[2] / "fixtures" / "bases" / "tiny-sd"
FLUX = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 16,
    "axes_dims_rope": [2, 2, 4],
}


def save(model: torch.nn.Module, name: str) -> None:
    LycorisNetwork.apply_preset(
        {"target_module": ["Attention", "FluxAttention"], "module_algo_map": {}}
    )
    net = create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1, algo="lora")
    net.apply_to()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    net.save_weights(str(HERE / f"{name}.safetensors"), torch.float16, None)


def main() -> None:
    torch.manual_seed(0)
    save(UNet2DConditionModel.from_pretrained(BASE / "unet"), "lycoris-prefix-unet")
    torch.manual_seed(0)
    save(FluxTransformer2DModel(**FLUX), "lycoris-prefix-flux")


if __name__ == "__main__":
    main()
