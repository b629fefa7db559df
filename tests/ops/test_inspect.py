"""inspect's report against the facts fixtures/make_fixtures.py recorded from the real PEFT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_tools.formats import load_adapter
from lora_tools.io.safetensors import ArrayTensor
from lora_tools.ops.inspect import inspect_adapter, robust_outliers


@pytest.fixture(scope="module")
def manifest(fixtures_dir):
    return json.loads((fixtures_dir / "manifest.json").read_text())


PEFT = [
    "llama-lora", "llama-all-linear", "llama-patterns", "llama-rslora", "llama-dora",
    "llama-embedding", "llama-bias", "llama-modules-to-save", "gpt2-lora", "gpt2-bias",
    "llama-lora-bf16", "sd-unet-conv",
]  # fmt: skip


@pytest.mark.parametrize("name", PEFT)
def test_peft_modules_ranks_alphas_scales_match_peft(fixtures_dir, manifest, name):
    facts = manifest["peft"][name]
    adapter = load_adapter(fixtures_dir / "peft" / name)
    per_module = {m.path: m for m in adapter.modules.values()}
    assert set(per_module) == set(facts["per_module"])
    for path, expected in facts["per_module"].items():
        m = per_module[path]
        assert (m.rank, m.effective_alpha) == (expected["r"], expected["alpha"])
        assert m.scale == pytest.approx(expected["scale"], rel=1e-12)
    report = inspect_adapter(adapter)
    assert report.counts["modules"] == facts["modules"]
    assert set(report.dtypes) <= set(facts["dtypes"])
    ranks = {str(v["r"]) for v in facts["per_module"].values()}
    assert set(report.rank["histogram"]) == ranks


def test_patterns_report(fixtures_dir):
    r = inspect_adapter(fixtures_dir / "peft/llama-patterns")
    assert r.format == "peft" and r.variants == ["LoRA"]
    assert r.rank == {"histogram": {"2": 2, "4": 5, "6": 1}, "min": 2, "max": 6}
    assert r.alpha["histogram"] == {"3": 2, "8": 6}
    assert r.targets == {"k_proj": 2, "o_proj": 2, "q_proj": 2, "v_proj": 2}
    assert r.blocks == {"layers": [0, 1]}
    assert r.base_model == {
        "name": "fixtures/bases/tiny-llama",
        "source": "adapter_config.json base_model_name_or_path",
    }
    lora_params = sum(
        int(np.prod(t.shape))
        for m in load_adapter(fixtures_dir / "peft/llama-patterns").modules.values()
        for t in (m.down, m.up)
    )
    assert r.parameters == {"lora": lora_params, "passthrough": 0}
    files = [
        fixtures_dir / "peft/llama-patterns/adapter_model.safetensors",
        fixtures_dir / "peft/llama-patterns/adapter_config.json",
    ]
    assert r.file_size_bytes == sum(f.stat().st_size for f in files)
    assert r.stats is None


@pytest.mark.parametrize(
    ("name", "variants", "components", "alphas", "scales"),
    [
        (
            "kohya/sd-lora.safetensors",
            ["LoRA"],
            {"unet": 48, "text_encoder": 12},
            {"2": 60},
            {"0.5": 60},
        ),
        (
            "kohya/sd-lora-noalpha.safetensors",
            ["LoRA"],
            {"unet": 48, "text_encoder": 12},
            {"none": 60},
            {"1": 60},
        ),
        (
            "kohya/sd-locon.safetensors",
            ["LoRA", "LoCon"],
            {"unet": 79, "text_encoder": 12},
            None,
            {"0.5": 73, "2": 18},
        ),
        ("kohya/sd-loha.safetensors", ["LoHa"], {}, {}, {}),
        ("kohya/sd-dora.safetensors", ["kohya DoRA"], {}, {}, {}),
        ("peft/llama-rslora", ["LoRA", "rsLoRA"], {"model": 8}, {"8": 8}, {"4": 8}),
        ("peft/llama-dora", ["LoRA", "DoRA"], {"model": 4}, {"8": 4}, {"2": 4}),
        ("diffusers/sd-lora", ["LoRA"], {"unet": 32, "text_encoder": 8}, {"4": 32, "8": 8}, None),
    ],
)
def test_variants_components_and_scales(fixtures_dir, name, variants, components, alphas, scales):
    r = inspect_adapter(fixtures_dir / name)
    assert r.variants == variants
    assert r.by_component == components
    if alphas is not None:
        assert r.alpha["histogram"] == alphas
    if scales is not None:
        assert sorted(r.scale["histogram"].values()) == sorted(scales.values())
        assert set(r.scale["histogram"]) == set(scales)


def test_locon_scale_two_is_exactly_the_3x3_convs(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "kohya/sd-locon.safetensors")
    assert {m.key for m in adapter.modules.values() if m.scale == 2.0} == {
        m.key for m in adapter.modules.values() if m.kernel == (3, 3)
    }


def test_diffusers_metadata_gives_per_component_alpha(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "diffusers/sd-lora")
    scales = {m.component: m.scale for m in adapter.modules.values()}
    assert scales == {"unet": 1.0, "text_encoder": 2.0}  # diffusers' own fused result agrees


def test_unsupported_types_are_named(fixtures_dir):
    r = inspect_adapter(fixtures_dir / "kohya/sd-loha.safetensors")
    assert r.unsupported == {"LoHa": 3}
    assert r.metadata["ss_network_module"] == "lycoris.kohya"


def test_stats_match_dense_svd(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "peft/llama-patterns")
    r = inspect_adapter(adapter, stats=True)
    rows = {row["module"]: row for row in r.stats["modules"]}
    for key, m in adapter.modules.items():
        dense = m.delta()
        s = np.linalg.svd(dense.reshape(dense.shape[0], -1), compute_uv=False)
        assert rows[key]["frobenius"] == pytest.approx(np.linalg.norm(dense), rel=1e-10)
        assert rows[key]["spectral"] == pytest.approx(s[0], rel=1e-10)
        p = s[s > 1e-12 * s[0]] / s.sum()
        assert rows[key]["effective_rank"] == pytest.approx(
            np.exp(-(p * np.log(p)).sum()), abs=1e-3
        )


def test_stats_flag_outliers_and_non_finite(fixtures_dir):
    adapter = load_adapter(fixtures_dir / "peft/llama-all-linear")
    victim, nan_module = list(adapter.modules.values())[:2]
    victim.up = ArrayTensor(victim.up.numpy() * 1000)
    bad = nan_module.up.numpy().copy()
    bad[0, 0] = np.nan
    nan_module.up = ArrayTensor(bad)
    stats = inspect_adapter(adapter, stats=True).stats
    assert stats["outliers"] == [victim.key]
    assert stats["non_finite"] == [nan_module.key]


def test_zero_update_reported(fixtures_dir):
    stats = inspect_adapter(fixtures_dir / "broken/zero-b", stats=True).stats
    assert len(stats["zero"]) == 8 and stats["outliers"] == []


def test_robust_outliers():
    assert robust_outliers([1.0, 1.1, 0.9, 1.05, 50.0]) == [False] * 4 + [True]
    assert robust_outliers([1.0, 1.0, 1.0]) == [False] * 3  # too few to judge
    assert robust_outliers([2.0] * 6 + [0.0]) == [False] * 7  # zero is its own finding
