"""loratool: inspect, validate, rescale, resize, combine, convert, merge and publish LoRA adapters.

The public API (:mod:`lora_tools.api`) has one function per command and loads lazily, so
``import lora_tools`` stays cheap (no numpy, torch or click):

    >>> from lora_tools import load_adapter, inspect, rescale
    >>> adapter = load_adapter("fixtures/peft/llama-lora")   # or a Hub id: "user/name@rev"
    >>> inspect(adapter).rank["max"]
    4
    >>> rescale(adapter, alpha=16).adapter                   # doctest: +ELLIPSIS
    Adapter(format='peft', modules=8, rank=4, source='fixtures/peft/llama-lora/...')
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = (
    "load_adapter",
    "inspect",
    "validate",
    "rescale",
    "resize",
    "combine",
    "convert",
    "push",
    "extract",
)
_LAZY = {
    **dict.fromkeys(_API, "lora_tools.api"),
    "save_adapter": "lora_tools.formats",
    "merge": "lora_tools.ops.merge",
    "Adapter": "lora_tools.adapter",
    "LoraModule": "lora_tools.adapter",
    "inspect_adapter": "lora_tools.ops.inspect",
    "LoraToolError": "lora_tools.errors",
}
__all__ = ["__version__", *_LAZY]


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_tools' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
