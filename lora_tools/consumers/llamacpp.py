"""llama.cpp: what ``convert_lora_to_gguf.py`` converts and what ``llama_adapter_lora_init``
and ``llama_adapter_lora_weight::get_scale`` apply.

Read from ggml-org/llama.cpp at commits 0b03ada (``convert_lora_to_gguf.py``) and 0650ea8
(``src/llama-adapter.cpp``, ``src/llama-adapter.h``), late 2026. llama.cpp has no releases to
name but build numbers, so the profile takes no version.

- The converter reads ``adapter_config.json`` and ``adapter_model.safetensors``, else
  ``adapter_model.bin``.
- It keeps ``lora_A.weight`` / ``lora_B.weight`` / ``lora_embedding_A`` / ``lora_embedding_B``,
  skips ``*.base_layer.weight`` and keeps layer norms (``_layernorm`` / ``.norm``); any other
  tensor stops it ("Unexpected name ...: Not a lora_A or lora_B tensor"): DoRA magnitudes, LoRA
  biases, modules_to_save weights.
- A LoRA on ``lm_head`` of a base with tied embeddings is refused ("lm_head is present in
  adapter, but is ignored in base model").
- The file stores one ``adapter.lora.alpha`` (the config's ``lora_alpha``); llama.cpp scales
  each tensor pair by ``alpha / rank`` with the rank read from that pair (``b->ne[0]``), and by
  1 when alpha is 0. So ``rank_pattern`` is honoured, ``alpha_pattern`` and ``use_rslora`` are
  not.
"""

from __future__ import annotations

from lora_tools.constants import PEFT_WEIGHTS_NAME
from lora_tools.consumers import Consumer

CONSUMER = Consumer(
    name="llamacpp",
    title="llama.cpp",
    family="LT53",
    current=(),
    oldest=(),
    checked=("convert_lora_to_gguf.py@0b03ada", "src/llama-adapter.cpp@0650ea8"),
    repository="ggml-org/llama.cpp",
)

WEIGHTS_NAMES = (PEFT_WEIGHTS_NAME, "adapter_model.bin")


def tensor_converted(name: str) -> bool:
    """Whether ``convert_lora_to_gguf.py`` takes (or skips) ``name`` instead of stopping."""
    if any(part in name for part in (".lora_A.weight", ".lora_B.weight")):
        return True
    if ".lora_embedding_A" in name or ".lora_embedding_B" in name:
        return True
    return ".base_layer.weight" in name or "_layernorm" in name or ".norm" in name


def served_scale(alpha: float, rank: int) -> float:
    """``get_scale`` with adapter_scale 1: ``alpha / rank``, or 1 when alpha is 0."""
    return alpha / rank if alpha else 1.0
