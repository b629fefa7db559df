"""loratool: inspect, validate, rescale, resize, combine, convert, merge and publish LoRA adapters.

The public API is small and loads lazily, so ``import lora_tools`` stays cheap:

    >>> import lora_tools
    >>> adapter = lora_tools.load_adapter("fixtures/peft/llama-lora")   # doctest: +SKIP
    >>> lora_tools.inspect_adapter(adapter)["rank"]["max"]             # doctest: +SKIP
    4
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Adapter": "lora_tools.adapter",
    "LoraModule": "lora_tools.adapter",
    "load_adapter": "lora_tools.formats",
    "save_adapter": "lora_tools.formats",
    "inspect_adapter": "lora_tools.ops.inspect",
    "LoraToolError": "lora_tools.errors",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_tools' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
