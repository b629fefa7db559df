"""Text Generation Inference: what ``load_module_map`` and ``LoraWeights.prepare_weights`` load.

Read from huggingface/text-generation-inference at v3.3.7 (commit db931fc, January 2026):
``server/text_generation_server/adapters/lora.py``, ``utils/adapter.py`` and
``models/__init__.py`` (the adapter layer list).

- ``LoraConfig.load`` reads ``adapter_config.json`` with PEFT's ``LoraConfig.from_pretrained``;
  the weights are the folder's ``*.safetensors`` files (``extension=".safetensors"``: a
  ``.bin`` adapter is "No adapter weights found").
- Only ``base_model.model.<name>.lora_A.weight`` / ``lora_B.weight`` are read, for the layers
  of the decoder blocks (``model.layers.N.self_attn.{q,k,v,o,qkv}_proj``,
  ``model.layers.N.mlp.{gate,up,down}_proj``, ``c_fc``, ``c_proj``); everything else (DoRA
  magnitudes, LoRA biases, modules_to_save, embedding or lm_head LoRAs) is only logged as
  "unused adapter weights".
- ``prepare_weights`` returns nothing for a layer type as soon as one decoder layer lacks it: a
  layer type trained on some layers only is dropped on every layer.
- One scale per adapter, ``get_scaling_factor(lora_alpha, r, use_rslora)``: ``rank_pattern`` /
  ``alpha_pattern`` are never read; the factors of one layer type are stacked
  (``torch.stack``), so ranks that differ between layers of one type fail to load.
"""

from __future__ import annotations

from lora_tools.consumers import Consumer

CONSUMER = Consumer(
    name="tgi",
    title="TGI",
    family="LT52",
    current=(3, 3, 7),
    oldest=(3, 3, 7),
    checked=("3.3.7",),
    repository="huggingface/text-generation-inference",
)

#: ``adapter_layers`` of models/__init__.py: the layer types TGI applies LoRA to.
ADAPTER_LAYERS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "c_proj",
    "c_fc",
)
#: The module paths ``build_layer_weight_lookup`` names, by parent of the layer.
PARENTS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "qkv_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
    "c_proj": "mlp",
    "c_fc": "mlp",
}


def layer_of(path: str) -> tuple[int, str] | None:
    """``model.layers.3.self_attn.q_proj`` -> ``(3, "q_proj")``: the (decoder layer, layer type)
    TGI would load the module into, or None where it loads nothing."""
    parts = path.split(".")
    if len(parts) != 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    if parts[4] not in ADAPTER_LAYERS or PARENTS[parts[4]] != parts[3]:
        return None
    return int(parts[2]), parts[4]
