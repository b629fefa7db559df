"""Hugging Face language-model architectures as llama.cpp converts them: the GGUF architecture,
whether q / k rows are permuted, what the converted base lacks, and the base config.json facts
(layers, heads, tied embeddings) that the GGUF tensor names and layouts depend on.

``convert --to gguf`` writes with these facts and ``validate --base`` checks a GGUF adapter
against a Hugging Face base with them (llama.cpp conversion/llama.py, qwen.py, gemma.py at the
commit tests/data/gguf/ records).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tools.adapter import Adapter
from lora_tools.constants import MODEL_CONFIG_NAME
from lora_tools.errors import FormatError, UnsupportedBaseError, UsageError


@dataclass(frozen=True)
class Architecture:
    """How llama.cpp converts one Hugging Face architecture (its class in llama.cpp's
    conversion/ package).

    Attributes:
        gguf_arch: the ``gguf.MODEL_ARCH`` member name (``LLAMA``, ``QWEN2``, ``GEMMA``...).
        permute_qk: llama.cpp permutes the base's q / k rows (``LlamaModel.undo_permute``).
        head_dropped: llama.cpp's GGUF of this architecture never holds ``output.weight``
            (Gemma's converter skips ``lm_head``): a LoRA on lm_head cannot load.
        embedding_trimmed: llama.cpp's converter cuts the token embedding to the tokenizer's
            vocabulary (Gemma3), which loratool does not read: embedding LoRAs are refused.
    """

    gguf_arch: str
    permute_qk: bool = False
    head_dropped: bool = False
    embedding_trimmed: bool = False


#: Hugging Face ``architectures[0]`` -> how llama.cpp converts it (llama.cpp conversion/llama.py,
#: qwen.py, gemma.py at the commit tests/data/gguf/ records).
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("LLAMA", permute_qk=True),
    "LLaMAForCausalLM": Architecture("LLAMA", permute_qk=True),
    "MistralForCausalLM": Architecture("LLAMA", permute_qk=True),
    "Qwen2ForCausalLM": Architecture("QWEN2"),
    "Qwen3ForCausalLM": Architecture("QWEN3"),
    "GemmaForCausalLM": Architecture("GEMMA", head_dropped=True),
    "Gemma2ForCausalLM": Architecture("GEMMA2", head_dropped=True),
    "Gemma3ForCausalLM": Architecture("GEMMA3", embedding_trimmed=True),
}
#: What transformers fills in for a config.json that leaves these out (the config classes'
#: defaults, transformers 5; llama.cpp reads the config through AutoConfig). A key-value head
#: count of None (Llama's default, or a null in the file) means the attention heads'.
_LLAMA_DEFAULTS = {
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "tie_word_embeddings": False,
}
_QWEN_DEFAULTS = {**_LLAMA_DEFAULTS, "num_key_value_heads": 32}
_GEMMA2_DEFAULTS = {
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "tie_word_embeddings": True,
}
_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": _LLAMA_DEFAULTS,
    "LLaMAForCausalLM": _LLAMA_DEFAULTS,
    "MistralForCausalLM": {**_LLAMA_DEFAULTS, "num_key_value_heads": 8},
    "Qwen2ForCausalLM": _QWEN_DEFAULTS,
    "Qwen3ForCausalLM": _QWEN_DEFAULTS,
    "GemmaForCausalLM": {
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "tie_word_embeddings": True,
    },
    "Gemma2ForCausalLM": _GEMMA2_DEFAULTS,
    "Gemma3ForCausalLM": _GEMMA2_DEFAULTS,
}


@dataclass(frozen=True)
class BaseConfig:
    """What the conversion needs from the base model's config.json.

    Attributes:
        path: the config.json read.
        name: the base folder's name (llama.cpp's fallback for ``general.name``).
        hf_arch: ``architectures[0]``.
        n_layer: ``num_hidden_layers`` (the tensor map covers blocks below it).
        n_head / n_head_kv: attention heads (the q / k permutation's group counts).
        tied: the output head is the embedding matrix (no ``output.weight`` in the GGUF).
    """

    path: Path
    name: str
    hf_arch: str
    n_layer: int
    n_head: int | None
    n_head_kv: int | None
    tied: bool


def read_base_config(
    adapter: Adapter, base: str | os.PathLike[str] | None, *, operation: str
) -> BaseConfig:
    """The base model's config: ``base`` (a folder holding config.json, or the file), else
    the adapter config's ``base_model_name_or_path`` when that is a local folder.
    ``operation``: the command that needs it, as messages name it.

    Raises:
        UsageError: no base given and none found (kind ``needs-base``).
        FormatError: the config is not a JSON object.
        UnsupportedBaseError: an architecture llama.cpp has no LoRA conversion for here.
    """
    if base is None:
        named = (adapter.config or {}).get("base_model_name_or_path")
        if isinstance(named, str) and named and Path(named).is_dir():
            base = named
        else:
            shown = f" ({named!r} is no local folder)" if isinstance(named, str) and named else ""
            raise UsageError(
                f"{operation} needs the base model's config.json (architecture, layer and head "
                f"counts){shown}",
                path=adapter.config_source or adapter.source,
                hint="give the base model folder (its config.json is enough)",
                kind="needs-base",
            )
    path = Path(base)
    config_path = path / MODEL_CONFIG_NAME if path.is_dir() else path
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(
            f"cannot read the base model's config.json: {exc.strerror}",
            path=config_path,
            hint="give the base model folder (its config.json is enough)",
            kind="needs-base",
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"config.json is not valid JSON: {exc}", path=config_path) from None
    if not isinstance(config, dict):
        raise FormatError("config.json is not a JSON object", path=config_path)
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    archs = config.get("architectures")
    hf_arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if hf_arch not in ARCHITECTURES:
        raise UnsupportedBaseError(
            f"architecture {hf_arch!r}: {operation} supports {', '.join(ARCHITECTURES)}",
            path=config_path,
            hint="llama.cpp's LoRA support differs per architecture; only these are mapped",
            kind="unsupported-arch",
        )
    config = {**_CONFIG_DEFAULTS[hf_arch], **config}
    n_head = _first_int(config, ("n_heads", "num_attention_heads"))
    n_kv = _first_int(config, ("n_kv_heads", "num_key_value_heads"))
    n_layer = _first_int(config, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"))
    if n_layer is None:
        raise FormatError("config.json has no num_hidden_layers", path=config_path)
    return BaseConfig(
        path=config_path,
        name=config_path.parent.name,
        hf_arch=hf_arch,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_kv if n_kv is not None else n_head,
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def _first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


__all__ = ["ARCHITECTURES", "Architecture", "BaseConfig", "read_base_config"]
