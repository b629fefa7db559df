"""ComfyUI: what ``comfy.lora.load_lora`` reads from a LoRA file and how it applies it.

Read from comfyanonymous/ComfyUI: ``comfy/lora.py`` at 41444b5 (``load_lora``,
``model_lora_keys_unet``, ``model_lora_keys_clip``), ``comfy/weight_adapter/lora.py`` at 0323d87
(``LoRAAdapter.load``, ``calculate_weight``) and ``comfy/weight_adapter/__init__.py`` at 0bca89e
(the adapter types). ComfyUI has no release to name, so the profile takes no version; it does
not run here (no install), so the facts are read, and its key spellings are checked against the
files loratool writes in the tests.

- ComfyUI loads one LoRA file for its diffusion models and text encoders (``LoraLoader``). Each
  module stem ``x`` the model maps (``lora_unet_*``, ``lora_te*_*``, ``diffusion_model.*``,
  ``unet.*``, ``text_encoder.*``, ``transformer.*``, ``text_encoders.*``, ``lycoris_*``,
  ``lora_transformer_*``; ``base_model.model.*`` only for SD3 and HunyuanDiT) is looked up with
  the tensor spellings in :data:`READ_SUFFIXES`; every other tensor is logged as "lora key not
  loaded" and dropped.
- The types: LoRA (kohya, diffusers, PEFT ``lora_A`` / ``lora_B``, Mochi, transformers and
  Qwen spellings; Tucker ``lora_mid``; kohya DoRA ``dora_scale``), LoHa, LoKr, GLoRA, OFT,
  BOFT, full ``diff`` / ``diff_b``, ``w_norm`` / ``b_norm`` and ``set_weight``. PEFT's DoRA
  magnitudes (``lora_magnitude_vector``), LoRA biases (``lora_B.bias``) and embedding LoRAs
  (``lora_embedding_A``) are none of them.
- Scale: ``alpha / rank`` from the module's ``.alpha`` tensor, 1 without one; an alpha kept
  only in metadata (diffusers' ``lora_adapter_metadata``) is not read (PR 15830, open).
"""

from __future__ import annotations

from lora_tools.consumers import Consumer

CONSUMER = Consumer(
    name="comfyui",
    title="ComfyUI",
    family="LT55",
    current=(),
    oldest=(),
    checked=(
        "comfy/lora.py@41444b5",
        "comfy/weight_adapter/lora.py@0323d87",
        "comfy/weight_adapter/__init__.py@0bca89e",
    ),
    repository="comfyanonymous/ComfyUI",
)

#: Every tensor suffix ``load_lora`` (and the weight adapters' ``load``) reads after a module
#: stem.
READ_SUFFIXES = (
    # per module
    ".alpha",
    ".dora_scale",
    ".reshape_weight",
    # LoRA spellings: kohya, diffusers, PEFT / diffusers 2, diffusers 3, Mochi, transformers,
    # Qwen's default adapter
    ".lora_up.weight",
    ".lora_down.weight",
    ".lora_mid.weight",
    "_lora.up.weight",
    "_lora.down.weight",
    ".lora_B.weight",
    ".lora_A.weight",
    ".lora.up.weight",
    ".lora.down.weight",
    ".lora_B",
    ".lora_A",
    ".lora_linear_layer.up.weight",
    ".lora_linear_layer.down.weight",
    ".lora_B.default.weight",
    ".lora_A.default.weight",
    # LoHa, LoKr
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".hada_t1",
    ".hada_t2",
    ".lokr_w1",
    ".lokr_w2",
    ".lokr_w1_a",
    ".lokr_w1_b",
    ".lokr_w2_a",
    ".lokr_w2_b",
    ".lokr_t2",
    # GLoRA, OFT / BOFT
    ".a1.weight",
    ".a2.weight",
    ".b1.weight",
    ".b2.weight",
    ".oft_blocks",
    ".rescale",
    # full weights and norms
    ".w_norm",
    ".b_norm",
    ".diff",
    ".diff_b",
    ".set_weight",
)


def tensor_read(name: str) -> bool:
    """Whether ``load_lora`` reads a tensor named ``name`` (given that its module maps)."""
    return name.endswith(READ_SUFFIXES)
