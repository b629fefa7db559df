"""The Python API (``from lora_tools import ...``): names, inputs, the overwrite rule, reprs."""

from __future__ import annotations

from pathlib import Path

from lora_tools.formats import load_adapter as load_local

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"


# -- reprs ---------------------------------------------------------------------------------------


def test_adapter_repr_is_short_and_says_what_it_holds() -> None:
    sizes = {}
    for path in (FIX / "kohya/sd-locon.safetensors", FIX / "kohya/sd-lora.safetensors"):
        adapter = load_local(path)
        text = repr(adapter)
        sizes[path.name] = len(text)
        assert len(text) < 300, text
        lo, hi = min(adapter.ranks), max(adapter.ranks)
        rank = f"{lo}..{hi}" if lo != hi else f"{lo}"
        assert text == (
            f"Adapter(format='kohya', modules={len(adapter.modules)}, "
            f"rank={rank}, source={str(path)!r})"
        )
    assert sizes["sd-locon.safetensors"] < 300  # the biggest fixture: 91 modules


def test_module_repr_names_shapes_and_alpha_never_values() -> None:
    adapter = load_local(FIX / "peft/llama-dora")
    key, module = next(iter(adapter.modules.items()))
    text = repr(module)
    assert text == (
        f"LoraModule({key!r}, kind='linear', rank=4, down={tuple(module.down.shape)}, "
        f"up={tuple(module.up.shape)}, alpha={module.alpha!r}, dora)"
    )
    assert "array" not in text and "[" not in text


def test_module_repr_says_an_unknown_alpha() -> None:
    adapter = load_local(FIX / "broken/no-config")
    module = next(iter(adapter.modules.values()))
    assert "alpha=unknown" in repr(module)
