"""An adapter whose alpha the files do not say: reported as unknown, never computed with.

PEFT keeps r and lora_alpha in adapter_config.json alone, so PEFT's keys without that config
have an unknown scale (a real adapter with alpha 8, r 4 merged at half strength before). kohya
files without alpha tensors and diffusers files without ``lora_adapter_metadata`` are different:
their formats define a missing alpha as alpha = r, so their scale is known (1).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from lora_tools.errors import UnknownScaleError, UsageError
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.ops.combine import combine_adapters
from lora_tools.ops.convert import convert_adapter
from lora_tools.ops.inspect import inspect_adapter
from lora_tools.ops.merge import merge
from lora_tools.ops.rescale import rescale_adapter
from lora_tools.ops.resize import resize_adapter

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA = FIXTURES / "peft" / "llama-lora"  # r 4, lora_alpha 8: scale 2


def _lone(tmp_path: Path, name: str) -> Path:
    """llama-lora's weights file alone, without its adapter_config.json."""
    (tmp_path / "lone").mkdir(exist_ok=True)
    target = tmp_path / "lone" / name
    shutil.copyfile(LLAMA / "adapter_model.safetensors", target)
    return target


def unknown_inputs(tmp_path: Path) -> list[Path]:
    """Every way PEFT keys arrive without their config."""
    return [
        FIXTURES / "broken" / "no-config",  # a folder without adapter_config.json
        _lone(tmp_path, "adapter_model.safetensors"),  # the weights file copied elsewhere
        _lone(tmp_path, "llama-lora.safetensors"),  # ... and renamed
    ]


def test_peft_keys_without_config_have_an_unknown_scale(tmp_path: Path) -> None:
    for path in unknown_inputs(tmp_path):
        adapter = load_adapter(path)
        assert adapter.alpha_unknown == "no adapter_config.json", path
        for m in adapter.modules.values():
            assert m.alpha is None and m.alpha_unknown == "no adapter_config.json"
            with pytest.raises(UnknownScaleError, match="alpha unknown"):
                _ = m.scale
            with pytest.raises(UnknownScaleError):
                _ = m.effective_alpha


def test_known_scales_stay_known(tmp_path: Path) -> None:
    # the weights file named inside its folder finds the config beside it
    adapter = load_adapter(LLAMA / "adapter_model.safetensors")
    assert adapter.alpha_unknown is None
    assert {m.scale for m in adapter.modules.values()} == {2.0}
    # kohya without alpha tensors: alpha = r by the format
    kohya = load_adapter(FIXTURES / "kohya" / "sd-lora-noalpha.safetensors")
    assert kohya.alpha_unknown is None
    assert {m.scale for m in kohya.modules.values()} == {1.0}
    assert inspect_adapter(kohya).alpha == {"histogram": {"none": 60}, "unknown": None}
    # diffusers without lora_adapter_metadata: diffusers loads it with alpha = r
    src = FIXTURES / "diffusers" / "sd-lora" / "pytorch_lora_weights.safetensors"
    bare = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(load_file(src), bare, {"format": "pt"})
    diffusers = load_adapter(bare)
    assert diffusers.format == "diffusers" and diffusers.alpha_unknown is None
    assert {m.scale for m in diffusers.modules.values()} == {1.0}


def test_inspect_says_unknown(tmp_path: Path) -> None:
    for path in unknown_inputs(tmp_path):
        report = inspect_adapter(path, stats=True)
        assert report.alpha == {"histogram": {"unknown": 8}, "unknown": "no adapter_config.json"}
        assert report.scale == {"histogram": {"unknown": 8}}
        rows = report.stats["modules"]
        assert all(r["scale"] is None and r["frobenius"] is None for r in rows)
        assert all(r["spectral"] is None and r["finite"] for r in rows)
        assert all(r["effective_rank"] > 0 for r in rows)  # does not need the scale
        doc = report.to_json()
        assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert inspect_adapter(LLAMA).alpha == {"histogram": {"8": 8}, "unknown": None}


def test_every_operation_that_needs_the_scale_refuses(tmp_path: Path) -> None:
    known = load_adapter(LLAMA)
    for path in unknown_inputs(tmp_path):
        adapter = load_adapter(path)
        calls = {
            "rescale": lambda a=adapter: rescale_adapter(a, factor=2.0),
            "rescale --alpha": lambda a=adapter: rescale_adapter(a, alpha=16.0),
            "rescale --normalize": lambda a=adapter: rescale_adapter(a, normalize=True),
            "resize": lambda a=adapter: resize_adapter(a, rank=2),
            "combine": lambda a=adapter: combine_adapters([a, known]),
            "convert --to peft": lambda a=adapter: convert_adapter(a, "peft"),
            "convert --to kohya": lambda a=adapter: convert_adapter(a, "kohya"),
            "convert --to diffusers": lambda a=adapter: convert_adapter(
                a, "diffusers", component="text_encoder"
            ),
        }
        for name, call in calls.items():
            with pytest.raises(UnknownScaleError) as exc:
                call()
            message = str(exc.value)
            assert "alpha unknown: no adapter_config.json" in message, (name, message)
            assert name.split(" --")[0] in message and "adapter_config.json" in exc.value.hint
            assert "\n" not in message
        out = tmp_path / "merged"
        with pytest.raises(UnknownScaleError, match="merge needs every module's scale"):
            merge(FIXTURES / "bases" / "tiny-llama", [path], out, device="cpu")
        assert not out.exists()


def test_peft_output_is_never_a_lone_file(tmp_path: Path) -> None:
    """A PEFT adapter written as one .safetensors file would lose r / lora_alpha (loratool wrote
    llama-lora's scale-2 modules that way, and read them back at scale 1)."""
    adapter = load_adapter(LLAMA)
    for out_adapter in (adapter, rescale_adapter(adapter, factor=2.0).adapter):
        with pytest.raises(UsageError, match="lone .safetensors"):
            save_adapter(out_adapter, tmp_path / "x.safetensors")
        assert not (tmp_path / "x.safetensors").exists()
    # a folder keeps the config, and the scale reads back
    written = save_adapter(adapter, tmp_path / "folder")
    assert {m.scale for m in load_adapter(written.parent).modules.values()} == {2.0}


def test_config_without_lora_alpha_gets_peft_default(tmp_path: Path) -> None:
    """PEFT builds LoraConfig with lora_alpha = 8 when the config has none (not alpha = r)."""
    peft = pytest.importorskip("peft")
    folder = tmp_path / "adapter"
    shutil.copytree(LLAMA, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_alpha"]
    config["r"] = 4
    (folder / "adapter_config.json").write_text(json.dumps(config))
    expected = peft.LoraConfig.from_pretrained(folder).lora_alpha
    assert expected == 8
    adapter = load_adapter(folder)
    assert {m.effective_alpha for m in adapter.modules.values()} == {float(expected)}
    assert {m.scale for m in adapter.modules.values()} == {expected / 4}
