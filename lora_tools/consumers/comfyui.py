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
- Diffusers names map only as ``model_lora_keys_unet`` / ``model_lora_keys_clip`` build them:
  an SD / SDXL UNet's attention projections as ``unet.<path>.processor.to_q`` (the old
  attention-processor spelling; ``.to_out.0`` without the ``.0``), so PEFT-style
  ``unet.<path>.to_q`` modules match nothing; text-encoder modules only as
  ``text_encoder(_2).text_model.encoder.layers.N.<mlp.fc1|mlp.fc2|self_attn.q/k/v/out_proj>``
  (the CLIP layers of ``LORA_CLIP_MAP``).
- Scale: ``alpha / rank`` from the module's ``.alpha`` tensor, 1 without one; an alpha kept
  only in metadata (diffusers' ``lora_adapter_metadata``) is not read (PR 15830, open).
"""

from __future__ import annotations

import re

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


#: ``LORA_CLIP_MAP``'s layers: the text-encoder modules the diffusers names map to.
_CLIP_DIFFUSERS = re.compile(
    r"text_encoder(?:_2)?\.text_model\.encoder\.layers\.\d+\."
    r"(?:mlp\.fc1|mlp\.fc2|self_attn\.(?:q|k|v|out)_proj)"
)
#: A UNet attention projection spelled without ``.processor.``.
_UNET_ATTENTION = re.compile(r"\.to_(?:q|k|v|out\.0)$")


#: The up-factor spellings of ``LoRAAdapter.load``, longest first: what follows the module stem
#: ComfyUI looks up.
_UP_SPELLINGS = (
    ".lora_linear_layer.up.weight",
    ".lora_B.default.weight",
    "_lora.up.weight",
    ".lora_up.weight",
    ".lora.up.weight",
    ".lora_B.weight",
    ".lora_B",
)


def module_stem(up_key: str) -> str:
    """The module stem ``load_lora`` looks ``up_key`` up under (``...attn1.processor.to_q`` for
    ``...attn1.processor.to_q_lora.up.weight``)."""
    for spelling in _UP_SPELLINGS:
        if up_key.endswith(spelling):
            return up_key[: -len(spelling)]
    return up_key


def diffusers_name_unmapped(up_key: str) -> bool:
    """Whether the module of a diffusers-named up factor (``unet.down_blocks...attn1.to_q.
    lora_B.weight``) is one that ComfyUI's key maps never contain, so that its tensors are
    "lora key not loaded"."""
    stem = module_stem(up_key)
    if stem.startswith("unet."):
        return bool(_UNET_ATTENTION.search(stem)) and ".processor." not in stem
    if stem.startswith(("text_encoder.", "text_encoder_2.")):
        return _CLIP_DIFFUSERS.fullmatch(stem) is None
    return False
