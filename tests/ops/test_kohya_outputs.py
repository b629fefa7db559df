"""kohya files rescale / resize / combine write: training metadata that describes them, and
alphas diffusers' kohya loader applies as written (issue 10 item 6, found by the consumer
property in tests/cli/test_output_invariant.py)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.formats import load_adapter, save_adapter
from lora_tools.ops.combine import combine_adapters
from lora_tools.ops.rescale import rescale_adapter
from lora_tools.ops.resize import resize_adapter


def validate(path, *extra):
    return CliRunner().invoke(
        cli, ["validate", str(path), "--fail-on", "warning", *map(str, extra)]
    )


@pytest.mark.parametrize(
    "op",
    [
        lambda a: rescale_adapter(a, alpha=16.0).adapter,
        lambda a: resize_adapter(a, energy=0.9).adapter,
        lambda a: combine_adapters([a, a], method="svd", rank=3).adapter,
    ],
    ids=["rescale", "resize", "combine"],
)
def test_conv_metadata_follows_the_modules(fixtures_dir, tmp_path, op):
    src = load_adapter(fixtures_dir / "kohya/sd-locon.safetensors")
    out = save_adapter(op(src), tmp_path / "o.safetensors", refresh_hashes=True)
    back = load_adapter(out)
    args = json.loads(back.metadata["ss_network_args"])
    convs = [m for m in back.modules.values() if m.kind == "conv" and m.kernel != (1, 1)]
    ranks = {m.rank for m in convs}
    alphas = {m.effective_alpha for m in convs}
    assert args["conv_dim"] == (str(ranks.pop()) if len(ranks) == 1 else "Dynamic")
    assert float(args["conv_alpha"]) in alphas or (
        len(alphas) > 1 and args["conv_alpha"] == "Dynamic"
    )
    result = validate(out, "--base", fixtures_dir / "bases/tiny-sd")
    assert result.exit_code == 0, result.output


def test_resize_keeps_each_kohya_alpha(fixtures_dir):
    src = load_adapter(fixtures_dir / "kohya/sd-lora.safetensors")
    result = resize_adapter(src, energy=0.9)
    assert len({m.rank for m in result.adapter.modules.values()}) > 1  # needs mixed ranks
    for key, m in result.adapter.modules.items():
        assert m.alpha == src.modules[key].alpha


def test_combine_writes_one_alpha_per_kohya_component(fixtures_dir):
    kohya = load_adapter(fixtures_dir / "kohya/sd-lora.safetensors")
    unet = load_adapter(fixtures_dir / "peft/sd-unet-conv")
    out = combine_adapters([kohya, unet]).adapter
    by_component = {}
    for m in out.modules.values():
        by_component.setdefault(m.component, set()).add(m.effective_alpha)
    assert {c: len(a) for c, a in by_component.items()} == {"unet": 1, "text_encoder": 1}
    assert len({m.rank for m in out.modules.values() if m.component == "unet"}) > 1


@pytest.mark.oracle
def test_dynamic_resize_loads_at_full_strength_in_diffusers(fixtures_dir, tmp_path):
    """Per-rank alphas made diffusers scale 17 of 60 modules by 1.5 or 2/3."""
    pytest.importorskip("diffusers")
    import numpy as np

    from tests import consumers

    base = fixtures_dir / "bases/tiny-sd"
    src = load_adapter(fixtures_dir / "kohya/sd-lora.safetensors")
    out = save_adapter(resize_adapter(src, energy=0.9).adapter, tmp_path / "r.safetensors")
    got = consumers.diffusers_consume(base, out)
    assert got.problems(60) == []
    for key, delta in consumers.reference_deltas(load_adapter(out), base).items():
        diff = got.merged[key] - got.base[key]
        assert np.linalg.norm(diff - delta) <= 1e-5 * np.linalg.norm(delta), key
