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
    assert r.parameters == {
        "lora": lora_params,
        "passthrough": 0,
        "deltas": 0,
        "deltas_as_lora": 0,
        "other_passthrough": 0,
    }
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
        # other types count in the components; the histograms are the LoRA modules'
        ("kohya/sd-loha.safetensors", ["LoHa"], {"unet": 3}, {}, {}),
        ("kohya/sd-dora.safetensors", ["kohya DoRA"], {"unet": 32, "text_encoder": 8}, {}, {}),
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
    # LoHa and OFT are computed: counted by type, not unsupported
    r = inspect_adapter(fixtures_dir / "kohya/sd-loha.safetensors")
    assert (r.unsupported, r.by_type, r.counts["delta_modules"]) == ({}, {"LoHa": 3}, 3)
    assert r.metadata["ss_network_module"] == "lycoris.kohya"
    oft = inspect_adapter(fixtures_dir.parent / "tests/data/lycoris/diag-oft.safetensors")
    assert (oft.unsupported, oft.by_type) == ({}, {"OFT": 77})
    assert len(oft.delta_modules) == 77 and not oft.foreign_modules


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


def _lora_file(tmp_path, stems, metadata=None, in_features=4, style="kohya"):
    """A file with one rank-2 LoRA module per stem, in kohya or diffusers (lora_A / B) names."""
    from safetensors.numpy import save_file

    tensors = {}
    for stem in stems:
        down = np.zeros((2, in_features), np.float32)
        up = np.zeros((4, 2), np.float32)
        if style == "kohya":
            tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
        else:
            tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = down, up
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("fixture", "architecture", "base_model"),
    [
        (
            "kohya/sd-lora.safetensors",
            {"name": "sd1", "source": "metadata modelspec.architecture",
             "recorded": "stable-diffusion-v1/lora"},
            {"name": "tiny-sd", "source": "metadata ss_sd_model_name"},
        ),
        (
            "kohya/sdxl-lora.safetensors",
            {"name": "sdxl", "source": "metadata modelspec.architecture",
             "recorded": "stable-diffusion-xl-v1-base/lora"},
            {"name": "tiny-sdxl.safetensors", "source": "metadata ss_sd_model_name"},
        ),
        (
            "kohya/flux-lora.safetensors",
            {"name": "flux", "source": "metadata modelspec.architecture",
             "recorded": "flux-1-dev/lora"},
            {"name": "tiny-flux.safetensors", "source": "metadata ss_sd_model_name"},
        ),
        (
            "diffusers/sd-lora",
            {"name": "sd", "source": "module names", "recorded": None},
            {"name": "fixtures/bases/tiny-sd/text_encoder",
             "source": "metadata lora_adapter_metadata text_encoder.base_model_name_or_path"},
        ),
        (
            "peft/gpt2-lora",
            {"name": "llm", "source": "module names", "recorded": None},
            {"name": "fixtures/bases/tiny-gpt2",
             "source": "adapter_config.json base_model_name_or_path"},
        ),
        (
            "diffusers-old/sd-attn-procs.safetensors",
            {"name": "sd", "source": "module names", "recorded": None},
            None,
        ),
    ],
)  # fmt: skip
def test_architecture_and_base_model_are_reported_apart(fixtures_dir, fixture, architecture,
                                                         base_model):  # fmt: skip
    report = inspect_adapter(fixtures_dir / fixture)
    assert report.architecture == architecture
    assert report.base_model == base_model
    doc = report.to_json()
    assert (doc["architecture"], doc["base_model"]) == (architecture, base_model)


@pytest.mark.parametrize(
    ("metadata", "name", "source"),
    [
        ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2",
         "metadata modelspec.architecture"),
        ({"modelspec.architecture": "stable-diffusion-3-large/lora"}, "sd3",
         "metadata modelspec.architecture"),
        ({"modelspec.architecture": "chroma/lora"}, "chroma", "metadata modelspec.architecture"),
        ({"modelspec.architecture": "some-new-model/lora"}, "some-new-model",
         "metadata modelspec.architecture"),
        ({"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}, "sdxl",
         "metadata ss_base_model_version"),
        ({"ss_base_model_version": "sd_v2_v"}, "sd2", "metadata ss_base_model_version"),
        ({"ss_base_model_version": "hunyuan_video"}, "hunyuan-video",
         "metadata ss_base_model_version"),
        ({"ss_v2": "True"}, "sd2", "metadata ss_v2"),
        # modelspec wins over the older kohya field, and both over the names (an SD1 UNet)
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
          "ss_base_model_version": "sd_v1"}, "sdxl", "metadata modelspec.architecture"),
    ],
)  # fmt: skip
def test_architecture_from_metadata_is_never_the_base_model(tmp_path, metadata, name, source):
    path = _lora_file(tmp_path, ["lora_unet_down_blocks_0_attentions_0_proj_in"], metadata)
    report = inspect_adapter(path)
    assert report.architecture["name"] == name and report.architecture["source"] == source
    assert report.base_model is None  # nothing named a checkpoint


@pytest.mark.parametrize(
    ("stems", "name", "style", "in_features"),
    [
        (["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"],
         "flux", "kohya", 4),
        (["transformer.transformer_blocks.0.attn.to_q",
          "transformer.single_transformer_blocks.0.attn.to_q"], "flux", "diffusers", 4),
        (["lora_unet_double_blocks_0_img_mlp_fc1"], "hunyuan-video", "kohya", 4),
        (["transformer.transformer_blocks.0.attn.add_q_proj"], "sd3", "diffusers", 4),
        (["lora_unet_joint_blocks_0_context_block_attn_qkv"], "sd3", "kohya", 4),
        (["transformer.transformer_blocks.0.img_mlp.net.0.proj"], "qwen-image", "diffusers", 4),
        (["lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_cross_attn_k"], "wan", "kohya", 4),
        (["transformer.blocks.0.attn2.to_k"], "wan", "diffusers", 4),
        (["lora_te1_text_model_encoder_layers_0_mlp_fc1",
          "lora_te2_text_model_encoder_layers_0_mlp_fc1"], "sdxl", "kohya", 4),
        (["lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"], "sdxl",
         "kohya", 4),
        (["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"], "sdxl",
         "diffusers", 2048),
        (["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"], "sd2",
         "diffusers", 1024),
        (["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"], "sd1",
         "diffusers", 768),
        (["lora_te_text_model_encoder_layers_22_mlp_fc1"], "sd2", "kohya", 4),  # CLIP-L has 12
        (["lora_te_text_model_encoder_layers_11_mlp_fc1"], "sd", "kohya", 4),
        (["lora_unet_input_blocks_1_1_proj_in"], "sd", "kohya", 4),
        (["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"], "sd",
         "diffusers", 4),
    ],
)  # fmt: skip
def test_architecture_guessed_from_module_names(tmp_path, stems, name, style, in_features):
    report = inspect_adapter(_lora_file(tmp_path, stems, style=style, in_features=in_features))
    assert report.architecture == {"name": name, "source": "module names", "recorded": None}
    assert report.base_model is None


def test_no_sign_gives_no_architecture(tmp_path):
    report = inspect_adapter(_lora_file(tmp_path, ["lora_unet_proj_out"]))
    assert report.architecture is None and report.to_json()["architecture"] is None
