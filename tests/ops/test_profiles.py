"""``validate --profile``: PEFT adapters made with real PEFT against each consumer's rules.

The expected verdicts come from the consumers' own loading code: vLLM's ``PEFTHelper.
validate_legal``, ``get_rank_and_scaling`` and ``parse_fine_tuned_lora_name`` were run (from the
0.10.0, 0.30.0, 0.33.0 and 0.34.0 wheels, GPU imports stubbed) on these same adapters:

- 0.34 / 0.33: refused dora, lora-bias, modules-to-save, pissa, rank32 (max_lora_rank 16);
  every other adapter loads with PEFT's scale on every module.
- 0.30: refused dora, modules-to-save, rank32, lora-bias ("lora_B.bias is unsupported LoRA
  weight"); patterns loads with 4 modules at lora_alpha / r instead of PEFT's scale; pissa loads
  (served on the unmodified base); patterns-same-scale loads right.
- 0.10: refused dora, modules-to-save, rank32, embedding ("embed_tokens.base_layer.weight is
  unsupported LoRA weight"); patterns as 0.30.

SGLang 0.5.23 (read, not run: its loader needs a GPU): ``LoRAAdapter.scaling = lora_alpha / r``
for every module; DoRA refused in ``validate_new_adapter``; only lora_A / lora_B reach the pool.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tools.consumers import parse_profiles
from lora_tools.errors import UsageError
from lora_tools.ops.validate import validate
from tests.ops import profile_adapters

ONLY_PROFILES = "LT0,LT1,LT2,LT3,LT4"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("profile-adapters")
    for name in profile_adapters.ADAPTERS:
        profile_adapters.make(root, name)
    profile_adapters.make(root / "v256", "embedding", vocab_size=256)
    profile_adapters.save_base(root)
    profile_adapters.save_base(root, tied=True)
    return root


def codes(path: Path, profile: str, **kwargs) -> list[str]:
    report = validate([path], profiles=profile, **kwargs)
    return sorted({f.rule.code for f in report.findings})


def profile_codes(path: Path, profile: str, **kwargs) -> list[str]:
    return [c for c in codes(path, profile, **kwargs) if c.startswith("LT5")]


# the verdict of each consumer's loading code, per adapter (see the module docstring)
VLLM = {
    "vllm": {
        "clean": [],
        "all-linear": [],
        "mlp": [],
        "embedding": [],
        "patterns": [],
        "patterns-same-scale": [],
        "rslora": [],
        "dora": ["LT502"],
        "lora-bias": ["LT502"],
        "modules-to-save": ["LT502"],
        "pissa": ["LT502"],
        "rank32": ["LT503"],
    },
    "vllm:0.30": {
        "clean": [],
        "rslora": [],
        "embedding": [],
        "patterns-same-scale": [],
        "patterns": ["LT506"],
        "pissa": ["LT502"],
        "lora-bias": ["LT504"],
        "dora": ["LT502"],
        "modules-to-save": ["LT502"],
        "rank32": ["LT503"],
    },
    "vllm:0.10": {
        "clean": [],
        "embedding": ["LT504"],
        "patterns": ["LT506"],
        "dora": ["LT502"],
        "lora-bias": ["LT502"],
        "rank32": ["LT503"],
    },
}


@pytest.mark.parametrize(
    "profile,name",
    [(profile, name) for profile, table in VLLM.items() for name in table],
)
def test_vllm_verdicts(adapters, profile, name):
    assert profile_codes(adapters / name, profile) == VLLM[profile][name]


def test_clean_adapters_have_no_finding_at_all(adapters):
    for name in ("clean", "all-linear", "mlp"):
        report = validate([adapters / name], profiles="vllm,sglang")
        assert report.findings == [], (name, [f.message for f in report.findings])


def test_vllm_rank_limit_follows_max_lora_rank(adapters):
    assert profile_codes(adapters / "rank32", "vllm", max_lora_rank=32) == []
    assert profile_codes(adapters / "clean", "vllm", max_lora_rank=1) == ["LT503"]
    report = validate([adapters / "rank32"], profiles="vllm")
    (finding,) = report.findings
    assert "rank 32 above the default --max-lora-rank 16" in finding.message
    assert "--max-lora-rank 32" in finding.hint


def test_vllm_max_lora_rank_must_be_an_allowed_size(adapters):
    with pytest.raises(UsageError, match="accepts only 1, 8, 16, 32"):
        validate([adapters / "clean"], profiles="vllm", max_lora_rank=24)
    with pytest.raises(UsageError, match=r"accepts only 8, 16, 32, 64, 128, 256 \("):
        validate([adapters / "clean"], profiles="vllm:0.7", max_lora_rank=512)
    assert profile_codes(adapters / "rank32", "vllm:0.8", max_lora_rank=320) == []


def test_vllm_server_target_modules_packed_layers(adapters):
    # vLLM wraps qkv_proj when any of q/k/v is targeted: o_proj alone is left out
    report = validate([adapters / "clean"], profiles="vllm", target_modules=["q_proj"])
    (finding,) = report.findings
    assert finding.rule.code == "LT505"
    assert "2 of 8 module(s)" in finding.message and "o_proj" in finding.message
    assert profile_codes(adapters / "clean", "vllm", target_modules="qkv_proj,o_proj") == []
    assert profile_codes(adapters / "mlp", "vllm", target_modules="gate_up_proj") == ["LT505"]
    assert profile_codes(adapters / "mlp", "vllm", target_modules="up_proj,down_proj") == []
    with pytest.raises(UsageError, match="has no server list of target modules"):
        validate([adapters / "clean"], profiles="vllm:0.18", target_modules="q_proj")


def test_vllm_old_scale_finding_names_the_served_and_peft_scales(adapters):
    report = validate([adapters / "patterns"], profiles="vllm:0.31", ignore=ONLY_PROFILES)
    (finding,) = report.findings
    assert finding.rule.code == "LT506"
    # r 8 alpha 16: served at 2; q_proj r 4 -> 16 / 4 = 4, o_proj alpha 4 -> 4 / 8 = 0.5
    assert finding.found == "2" and finding.expected in ("4", "0.5")
    assert "4 module(s)" in finding.message


def test_vllm_embedding_vocab_against_base(adapters):
    base = adapters / "base-128"
    assert profile_codes(adapters / "embedding", "vllm", base=base) == []
    wrong = validate([adapters / "v256" / "embedding"], profiles="vllm", base=base)
    lt507 = [f for f in wrong.findings if f.rule.code == "LT507"]
    assert len(lt507) == 1 and (lt507[0].expected, lt507[0].found) == ("128", "256")
    # before 0.12 vLLM allowed extra vocabulary
    assert "LT507" not in codes(adapters / "v256" / "embedding", "vllm:0.11", base=base)


def test_vllm_refuses_other_formats():
    (finding,) = [
        f
        for f in validate(["fixtures/kohya/sd-lora.safetensors"], profiles="vllm").findings
        if f.rule.code.startswith("LT5")
    ]
    assert finding.rule.code == "LT501" and "kohya" in finding.message


SGLANG = {
    "clean": [],
    "all-linear": [],
    "mlp": [],
    "patterns-same-scale": [],
    "patterns": ["LT515"],
    "rslora": ["LT515"],
    "dora": ["LT512"],
    "pissa": ["LT512"],
    "lora-bias": ["LT516"],
    "modules-to-save": ["LT516"],
    "rank32": [],
    "embedding": [],
}


@pytest.mark.parametrize("name", sorted(SGLANG))
def test_sglang_verdicts(adapters, name):
    assert profile_codes(adapters / name, "sglang") == SGLANG[name]


def test_sglang_server_settings(adapters):
    assert profile_codes(adapters / "rank32", "sglang", max_lora_rank=16) == ["LT513"]
    assert profile_codes(adapters / "rank32", "sglang", max_lora_rank=32) == []
    # SGLang normalizes q/k/v to qkv_proj: naming one of them serves all three
    assert profile_codes(adapters / "clean", "sglang", target_modules="q_proj,o_proj") == []
    report = validate([adapters / "clean"], profiles="sglang", target_modules="qkv_proj")
    (finding,) = report.findings
    assert finding.rule.code == "LT514" and "['o_proj']" in finding.message
    assert profile_codes(adapters / "clean", "sglang", target_modules="all") == []


def test_profile_families_run_even_when_select_leaves_them_out(adapters):
    assert profile_codes(adapters / "dora", "vllm", select="LT1") == ["LT502"]
    assert profile_codes(adapters / "dora", "vllm", ignore="LT502") == []


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nope", "unknown consumer"),
        ("vllm:0.2", "outside the versions checked"),
        ("vllm:9.0", "outside the versions checked"),
        ("vllm:x", "is not a version"),
    ],
)
def test_bad_profiles_are_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_profiles(spec)


def test_profile_spelling():
    assert [p.spec for p in parse_profiles("vllm, vllm:0.34, sglang:0.5.23")] == [
        "vllm:0.34",
        "sglang:0.5.23",
    ]
    with pytest.raises(UsageError, match="need --profile"):
        validate(["fixtures/peft/llama-lora"], max_lora_rank=16)


# TGI v3.3.7 (read, not run: its server needs a GPU): one scale per adapter, lora_A / lora_B of
# the decoder layers' projections only, a layer type dropped unless every layer has it, ranks of
# one layer type stacked. llama.cpp: convert_lora_to_gguf.py stops at any tensor that is not a
# LoRA factor; get_scale = alpha / rank of the tensor pair.
TGI_LLAMACPP = {
    "clean": ([], []),
    "all-linear": ([], []),
    "mlp": ([], []),
    "rank32": ([], []),
    "embedding": (["LT522"], []),
    "patterns": (["LT523"], ["LT533"]),  # llama.cpp: o_proj's alpha_pattern
    # rank_pattern q_proj 4 with alpha_pattern q_proj 8: TGI serves 16 / 8 = 2 (right by luck),
    # llama.cpp 16 / 4 = 4 (PEFT 8 / 4 = 2)
    "patterns-same-scale": ([], ["LT533"]),
    "rslora": ([], ["LT533"]),
    "dora": (["LT522"], ["LT532"]),
    "lora-bias": (["LT522"], ["LT532"]),
    "modules-to-save": (["LT522"], ["LT532"]),
    "pissa": (["LT526"], ["LT535"]),
    "one-layer": ([], []),  # layer 0 only: the layer count needs --base (next test)
    "layer-rank": (["LT523", "LT525"], []),
}


@pytest.mark.parametrize("name", sorted(TGI_LLAMACPP))
def test_tgi_and_llamacpp_verdicts(adapters, name):
    tgi, llamacpp = TGI_LLAMACPP[name]
    assert profile_codes(adapters / name, "tgi") == tgi
    assert profile_codes(adapters / name, "llamacpp") == llamacpp


def test_tgi_partial_layers_counts_the_base_layers(adapters):
    report = validate([adapters / "one-layer"], profiles="tgi", base=adapters / "base-128")
    found = [f for f in report.findings if f.rule.code == "LT524"]
    assert sorted(f.module for f in found) == ["q_proj", "v_proj"]
    assert all("decoder layer(s) 1 of 2" in f.message for f in found)


def test_llamacpp_scale_finding_values(adapters):
    (finding,) = validate([adapters / "rslora"], profiles="llamacpp").findings
    # PEFT: 16 / sqrt(8); llama.cpp: 16 / 8
    assert finding.found == "2" and finding.expected == f"{16 / 8**0.5:g}"


def test_llamacpp_tied_lm_head(adapters):
    tied = validate([adapters / "lm-head"], profiles="llamacpp", base=adapters / "base-128-tied")
    assert "LT534" in {f.rule.code for f in tied.findings}
    untied = validate([adapters / "lm-head"], profiles="llamacpp", base=adapters / "base-128")
    assert not [f for f in untied.findings if f.rule.code.startswith("LT5")]


def test_unversioned_profile():
    (profile,) = parse_profiles("llamacpp")
    assert profile.spec == "llamacpp" and profile.label == "llama.cpp"
    with pytest.raises(UsageError, match="has no versions"):
        parse_profiles("llamacpp:1.0")


def test_trainable_tokens_in_every_server(adapters):
    # PEFT 0.15's token_adapter.trainable_tokens_delta: vLLM's parser refuses it, SGLang and TGI
    # drop it, llama.cpp's converter stops at it (the cross-check ran vLLM's parser on it)
    path = adapters / "trainable-tokens"
    assert profile_codes(path, "vllm") == ["LT504"]
    assert profile_codes(path, "sglang") == ["LT516"]
    assert profile_codes(path, "tgi") == ["LT522"]
    assert profile_codes(path, "llamacpp") == ["LT532"]


@pytest.mark.parametrize(
    "name,profile,expected",
    [
        ("clean", "peft", []),
        ("clean", "peft:0.14", []),  # peft_version, ensure_weight_tying...: dropped, harmless
        ("clean", "peft:0.13", ["LT562"]),
        ("rslora", "peft:0.8", ["LT562"]),
        ("trainable-tokens", "peft:0.14", ["LT563"]),
        ("trainable-tokens", "peft:0.15", []),
        ("lora-bias", "peft:0.14", []),
        ("dora", "peft:0.16", []),
    ],
)
def test_peft_versions(adapters, name, profile, expected):
    assert profile_codes(adapters / name, profile) == expected


def test_peft_dropped_key_names_the_version_that_knows_it(adapters):
    (finding,) = validate([adapters / "trainable-tokens"], profiles="peft:0.14").findings
    assert finding.module == "trainable_token_indices"
    assert "trainable_token_indices: 0.15" in finding.hint


def test_peft_unknown_keys_against_the_installed_peft():
    # the fields table agrees with the PEFT installed here (0.21): none missing, none extra
    import dataclasses

    from peft import LoraConfig

    from lora_tools.consumers import peft as facts

    installed = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    assert set(facts.FIELDS_SINCE) == installed
