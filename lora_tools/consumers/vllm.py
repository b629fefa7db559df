"""vLLM: what ``LoRAModel.from_local_checkpoint`` and ``PEFTHelper.validate_legal`` accept.

Read from the wheels of vLLM 0.6.6, 0.7.0, 0.7.3, 0.8.0, 0.8.5, 0.10.0, 0.11.0, 0.12.0, 0.15.0,
0.16.0, 0.18.0, 0.20.0, 0.22.0, 0.24.0, 0.26.0, 0.28.0, 0.30.0, 0.31.0, 0.32.0, 0.33.0 and
0.34.0 (vllm-project/vllm): ``vllm/lora/peft_helper.py``, ``vllm/lora/models.py`` (0.33 on:
``lora_model.py``), ``vllm/lora/utils.py``, ``vllm/lora/worker_manager.py``,
``vllm/lora/model_manager.py`` and ``vllm/config/lora.py`` (before 0.11: ``vllm/config.py``).

- The adapter is a folder: ``adapter_config.json`` (``PEFTHelper.from_local_dir``) and
  ``adapter_model.safetensors``, else ``adapter_model.bin`` / ``.pt``; nothing else is looked at.
- ``validate_legal`` refuses ``max(r, *rank_pattern.values()) > max_lora_rank`` (before 0.32:
  ``r`` alone), DoRA, non-empty ``modules_to_save`` (from 0.31 ``["classifier", "score"]`` is
  allowed), ``bias != "none"``; from 0.32 also ``lora_bias``, ``init_lora_weights`` other than
  true / false / gaussian / eva / orthogonal / mica / lora_ga (PiSSA, OLoRA, CorDA, LoftQ change
  the base weights), aLoRA, ``layer_replication``, BD-LoRA and QALoRA.
- ``--max-lora-rank`` is one of a fixed set (default 16): 8..256 up to 0.7, 320 and 512 from
  0.8, 1 from 0.12.
- One scale ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``) for every module before 0.32; from 0.32
  ``get_rank_and_scaling`` applies ``rank_pattern`` / ``alpha_pattern`` per module (PEFT's
  match: ``re.match(rf"(.*\\.)?({key})$", name)``, first key wins).
- ``parse_fine_tuned_lora_name`` accepts ``lora_A.weight`` / ``lora_B.weight`` /
  ``lora_embedding_A`` / ``lora_embedding_B`` (and, for classification heads from 0.31,
  ``score`` / ``classifier`` tensors); ``*.embed_tokens.base_layer.weight`` and
  ``*.lm_head.base_layer.weight`` are skipped from 0.18 (0.16 and before refuse them); any other
  tensor is refused ("is unsupported LoRA weight"). Before 0.12 a ``*.bias`` tensor was read as
  a LoRA bias, refused at activation without ``--enable-lora-bias``.
- Before 0.32 ``init_lora_weights`` is not read: a PiSSA / OLoRA / CorDA / LoftQ adapter loads
  and is served on the unmodified base weights (PEFT subtracts the principal part first).
- From 0.12 an embedding LoRA whose ``lora_embedding_A`` is not ``[r, vocab_size]`` of the base
  is refused (before, extra vocabulary was allowed).
- From 0.20 ``--lora-target-modules`` (``LoRAConfig.target_modules``) restricts the layers that
  get LoRA by name suffix; an adapter module outside them loads and is silently not applied
  (``activate_adapter`` resets that layer), packed layers counting as one: a target ``q_proj``
  wraps all of ``qkv_proj``, a target ``qkv_proj`` covers ``q_proj``, ``k_proj``, ``v_proj``.
"""

from __future__ import annotations

from lora_tools.constants import PEFT_WEIGHTS_NAME
from lora_tools.consumers import Consumer, Version

#: The release wheels whose loading code was read.
_CHECKED = (
    "0.6.6 0.7.0 0.7.3 0.8.0 0.8.5 0.10.0 0.11.0 0.12.0 0.15.0 0.16.0 0.18.0 0.20.0 0.22.0 0.24.0 "
    "0.26.0 0.28.0 0.30.0 0.31.0 0.32.0 0.33.0 0.34.0"
)

CONSUMER = Consumer(
    name="vllm",
    title="vLLM",
    family="LT50",
    current=(0, 34),
    oldest=(0, 6),
    checked=tuple(_CHECKED.split()),
    repository="vllm-project/vllm",
    options=("max_lora_rank", "target_modules"),
)

#: ``LoRAConfig.max_lora_rank``'s default.
DEFAULT_MAX_LORA_RANK = 16
#: Weights files ``from_local_checkpoint`` opens, first found wins.
WEIGHTS_NAMES = (PEFT_WEIGHTS_NAME, "adapter_model.bin", "adapter_model.pt")
#: ``rank_pattern`` / ``alpha_pattern`` applied per module, and the 0.32 feature checks.
PATTERNS_SINCE: Version = (0, 32)
#: ``modules_to_save`` of a classification head allowed.
CLASSIFIER_SINCE: Version = (0, 31)
CLASSIFIER_MODULES = ("classifier", "score")
#: ``init_lora_weights`` values PEFTHelper accepts (strings compared lowercased; bools pass).
SUPPORTED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
#: Embedding LoRAs must match the base vocabulary.
VOCAB_CHECK_SINCE: Version = (0, 12)
#: ``--lora-target-modules`` exists.
TARGET_MODULES_SINCE: Version = (0, 20)
#: Runtime packed layers of Llama-family models and the adapter layers each holds
#: (``packed_modules_mapping`` of vllm/model_executor/models/llama.py, qwen2.py, mistral...).
PACKED_MODULES = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
#: Base embedding weights PEFT saves beside an embedding LoRA, which the loader skips
#: (``is_base_embedding_weights``, from 0.18; 0.16 refuses them as unsupported weights).
SKIPPED_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
SKIPPED_SINCE: Version = (0, 18)


def max_lora_ranks(version: Version) -> tuple[int, ...]:
    """The values ``--max-lora-rank`` accepts at ``version``."""
    if version >= (0, 12):
        return (1, 8, 16, 32, 64, 128, 256, 320, 512)
    if version >= (0, 8):
        return (8, 16, 32, 64, 128, 256, 320, 512)
    return (8, 16, 32, 64, 128, 256)


def tensor_accepted(name: str, version: Version) -> bool:
    """Whether ``parse_fine_tuned_lora_name`` (or the skip list before it) takes ``name``."""
    if name.endswith(SKIPPED_SUFFIXES) and version >= SKIPPED_SINCE:
        return True
    parts = name.split(".")
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return True
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return True
    if version < VOCAB_CHECK_SINCE and parts[-1] == "bias":
        return True
    return (
        version >= CLASSIFIER_SINCE
        and len(parts) >= 2
        and parts[-1] in ("weight", "bias")
        and parts[-2] in CLASSIFIER_MODULES
    )


def served_by(layer: str, targets: tuple[str, ...]) -> bool:
    """Whether an adapter layer named ``layer`` (``q_proj``) gets LoRA when the server's
    ``--lora-target-modules`` are ``targets`` (``is_in_target_modules`` on the packed layer that
    holds it)."""
    wanted = set(targets)
    if layer in wanted:
        return True
    for packed, children in PACKED_MODULES.items():
        if layer in children and (packed in wanted or wanted & set(children)):
            return True
    return False
