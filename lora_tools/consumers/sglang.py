"""SGLang: what ``LoRAManager`` (``validate_new_adapter``, ``init_lora_shapes``) and
``LoRAAdapter`` accept and apply.

Read from the wheel of SGLang 0.5.23 (sgl-project/sglang): ``python/sglang/srt/lora/
lora_config.py``, ``lora.py``, ``lora_manager.py``, ``mem_pool.py`` and ``utils.py``.

- The adapter is a folder with ``adapter_config.json`` (``LoRAConfig.get_lora_config``; its
  ``r``, ``lora_alpha`` and ``target_modules`` are required, ``peft_type`` must be ``lora``) and
  weights the model loader finds there (``*.safetensors``, else ``*.bin``).
- Refused: ``use_dora``; an ``added_tokens.json`` with tokens past the base vocabulary;
  ``target_modules`` given as a string other than ``all`` / ``all-linear``; ``r`` above
  ``--max-lora-rank``; a target module (normalized: ``q_proj`` / ``k_proj`` / ``v_proj`` ->
  ``qkv_proj``, ``gate_proj`` / ``up_proj`` -> ``gate_up_proj``, embeddings -> ``embed_tokens``
  / ``lm_head``) outside ``--lora-target-modules``. Without those options SGLang sizes its pool
  from the adapters given at start-up.
- One scale ``lora_alpha / r`` for every module (``LoRAAdapter.scaling``): ``rank_pattern``,
  ``alpha_pattern`` and ``use_rslora`` are never read.
- Only ``lora_A`` / ``lora_B`` of the target modules reach the memory pool: LoRA biases,
  ``modules_to_save`` tensors and DoRA magnitudes are dropped without a word.
"""

from __future__ import annotations

from lora_tools.consumers import Consumer

CONSUMER = Consumer(
    name="sglang",
    title="SGLang",
    family="LT51",
    current=(0, 5, 23),
    oldest=(0, 5, 23),
    checked=("0.5.23",),
    repository="sgl-project/sglang",
    options=("max_lora_rank", "target_modules"),
)

#: ``get_normalized_target_modules``: adapter layer names -> the layer SGLang serves.
NORMALIZED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "embed_tokens": "embed_tokens",
    "vocab_emb": "embed_tokens",
    "embeddings": "embed_tokens",
    "word_embeddings": "embed_tokens",
    "lm_head": "lm_head",
    "output": "lm_head",
    "unembed_tokens": "lm_head",
    "q_a_proj": "fused_qkv_a_proj_with_mqa",
    "kv_a_proj_with_mqa": "fused_qkv_a_proj_with_mqa",
}
#: ``target_modules`` strings SGLang understands.
TARGET_STRINGS = ("all", "all-linear")


def normalize(names: list[str] | tuple[str, ...]) -> set[str]:
    """``get_normalized_target_modules`` of a list: the last dotted part, mapped."""
    out = set()
    for name in names:
        base = name.split(".")[-1]
        out.add(NORMALIZED.get(base, base))
    return out
