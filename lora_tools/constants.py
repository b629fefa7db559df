"""File names, metadata keys and other shared facts, spelled once.

This module imports nothing from loratool: every layer (io, adapter, formats, ops, cli) may
import it. A name that two modules need lives here, not in either of them.
"""

from __future__ import annotations

# -- adapter files ------------------------------------------------------------------------------

#: PEFT's adapter config, beside the weights.
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: PEFT's weights file (``save_pretrained``).
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
#: diffusers' LoRA weights file (``save_lora_weights``).
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: mlx-lm's adapter weights (``mlx_lm.lora``; its checkpoints are ``<step>_adapters.safetensors``).
MLX_WEIGHTS_NAME = "adapters.safetensors"
#: Weights file names looked for, in order, inside an adapter folder (and the only weights names
#: of an adapter folder loratool writes).
ADAPTER_WEIGHT_NAMES = (PEFT_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME, MLX_WEIGHTS_NAME)
#: Weights files that the adapter_config.json beside them belongs to (PEFT's and mlx-lm's).
CONFIG_WEIGHT_NAMES = (PEFT_WEIGHTS_NAME, MLX_WEIGHTS_NAME)

# -- base checkpoints ---------------------------------------------------------------------------

#: Base weight file names preferred when a folder holds several checkpoints.
BASE_WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
#: Shard indexes of sharded checkpoints (transformers, diffusers).
INDEX_NAMES = tuple(f"{name}.index.json" for name in BASE_WEIGHT_NAMES)
#: A model's config (transformers, and each diffusers component).
MODEL_CONFIG_NAME = "config.json"
#: A diffusers pipeline's component list.
PIPELINE_INDEX_NAME = "model_index.json"

# -- what loratool writes -----------------------------------------------------------------------

#: The provenance record ``loratool merge`` writes into every merged folder. Its ``files`` list
#: names every other file it wrote there.
MERGE_RECORD_NAME = "loratool_merge.json"
#: The same record inside a single merged ``.safetensors`` file's ``__metadata__``.
MERGE_RECORD_KEY = "loratool_merge"
#: The safetensors metadata key of every adapter loratool writes (a JSON list of operations,
#: oldest first).
HISTORY_KEY = "loratool_history"
#: The safetensors metadata key listing the modules loratool added with all-zero factors on
#: purpose (a JSON list of module keys; ``convert --for sglang`` adds the q_proj / gate_proj
#: parts SGLang stacks its neighbours from). Their update is exactly zero by design, so the
#: zero-factor rule (LT203) leaves them out.
ZERO_MODULES_KEY = "loratool_zero_modules"
#: The model card of a folder (the Hub shows it as the repository's front page).
CARD_NAME = "README.md"

# -- options ------------------------------------------------------------------------------------

#: --dtype spellings (case-insensitive) -> the short name the library takes (``merge(dtype=)``
#: and the CLI accept every one of them).
DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}
