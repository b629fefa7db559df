"""PEFT: what ``PeftModel.from_pretrained`` (``PeftConfig.from_peft_type``, ``load_peft_weights``)
of a given version accepts.

Read from the wheels of PEFT 0.6.2, 0.7.1, 0.8.2, 0.9.0, 0.10.0, 0.11.1, 0.12.0, 0.13.2, 0.14.0,
0.15.2, 0.16.0, 0.17.1, 0.18.0, 0.19.0, 0.20.0 and 0.21.0 (huggingface/peft):
``src/peft/config.py`` (``PeftConfigMixin``, ``PeftConfig``, ``from_peft_type``) and
``src/peft/tuners/lora/config.py`` (``LoraConfig``'s fields); ``src/peft/utils/
save_and_load.py`` for the weights names.

- The adapter is a folder: ``adapter_config.json`` and ``adapter_model.safetensors`` (else
  ``adapter_model.bin``).
- ``from_peft_type`` builds ``LoraConfig(**config)``. Up to 0.13 a key the version does not
  know is a ``TypeError`` ("got an unexpected keyword argument"): the adapter does not load.
  From 0.14 such keys are dropped with a warning ("Unexpected keyword arguments ... these are
  ignored"), so a feature newer than the installed PEFT is silently not applied.
- Fields are only ever added (none was removed from 0.6.2 to 0.21.0); :data:`FIELDS_SINCE` is
  the minor version each first appears in.
"""

from __future__ import annotations

from lora_tools.constants import PEFT_WEIGHTS_NAME
from lora_tools.consumers import Consumer, Version

CONSUMER = Consumer(
    name="peft",
    title="PEFT",
    family="LT56",
    current=(0, 21),
    oldest=(0, 6),
    checked=tuple(
        [
            "0.6.2",
            "0.7.1",
            "0.8.2",
            "0.9.0",
            "0.10.0",
            "0.11.1",
            "0.12.0",
            "0.13.2",
            "0.14.0",
            "0.15.2",
            "0.16.0",
            "0.17.1",
            "0.18.0",
            "0.19.0",
            "0.20.0",
            "0.21.0",
        ]
    ),
    repository="huggingface/peft",
)

WEIGHTS_NAMES = (PEFT_WEIGHTS_NAME, "adapter_model.bin")
#: Unknown keys are dropped with a warning instead of failing the load.
TOLERANT_SINCE: Version = (0, 14)
#: Keys that describe the file, not the adapter: dropping them changes nothing.
METADATA_KEYS = frozenset({"peft_version", "auto_mapping", "revision", "base_model_name_or_path"})

_ADDED = {
    (0, 6): "alpha_pattern auto_mapping base_model_name_or_path bias fan_in_fan_out "
    "inference_mode init_lora_weights layers_pattern layers_to_transform lora_alpha lora_dropout "
    "modules_to_save peft_type r rank_pattern revision target_modules task_type",
    (0, 7): "loftq_config megatron_config megatron_core",
    (0, 8): "use_rslora",
    (0, 9): "use_dora",
    (0, 10): "layer_replication",
    (0, 12): "runtime_config",
    (0, 14): "eva_config exclude_modules lora_bias",
    (0, 15): "corda_config trainable_token_indices",
    (0, 16): "qalora_group_size use_qalora",
    (0, 17): "target_parameters",
    (0, 18): "alora_invocation_tokens arrow_config ensure_weight_tying peft_version",
    (0, 19): "lora_ga_config use_bdlora",
    (0, 20): "monteclora_config velora_config",
    (0, 21): "kasa_config",
}
#: Every ``LoraConfig`` field (with those of ``PeftConfig``) -> the minor version it appeared in.
FIELDS_SINCE: dict[str, Version] = {
    name: version for version, names in _ADDED.items() for name in names.split()
}


#: Fields whose default is not falsy: a saved default changes nothing when it is dropped.
TRUTHY_DEFAULTS = {"qalora_group_size": 16, "megatron_core": "megatron.core"}


def matters(key: str, value: object) -> bool:
    """Whether dropping ``key: value`` changes the adapter PEFT builds."""
    if key in METADATA_KEYS or not value:
        return False
    return TRUTHY_DEFAULTS.get(key, object()) != value


def unknown_keys(config: dict, version: Version) -> list[str]:
    """The config's keys that ``LoraConfig`` at ``version`` has no field for."""
    minor = version[:2]
    return [key for key in config if key not in FIELDS_SINCE or FIELDS_SINCE[key] > minor]
