"""LoraConfig fields against real PEFT (the oracle): for each field that changes what is saved or
how the update applies, an adapter built with PEFT (trainables set to random values, so no update
is zero) must pass ``validate --base`` without an error, and ``merge`` must equal
``PeftModel.from_pretrained(...).merge_and_unload()`` bit for bit in float32, or refuse by name.

Before: a KaSA adapter (kasa_config) merged without lora_diag and the base truncation (weights
off by 0.19, validate silent); BD-LoRA (use_bdlora) and target_parameters (LoRA on MoE expert
parameters) got false errors (LT102 / LT304 / LT306 / LT401) and refusals naming no field; an
EVA adapter, a plain LoRA once trained, was refused as if its init changed the base.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from lora_tools.errors import UnsupportedAdapterError
from lora_tools.io.safetensors import SafetensorsFile
from lora_tools.ops.merge import merge
from lora_tools.ops.validate import validate

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.config import (  # noqa: E402
    BdLoraConfig,
    KasaConfig,
    MontecloraConfig,
    VeloraConfig,
)
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LLAMA = ROOT / "fixtures" / "bases" / "tiny-llama"
GPT2 = ROOT / "fixtures" / "bases" / "tiny-gpt2"
QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory) -> Path:
    """A one-layer Mixtral whose experts are nn.Parameters in memory (transformers 5)."""
    from transformers import MixtralConfig

    config = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=3,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("moe")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def lora(**fields) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": QV, **fields})


def build(base: Path, config: LoraConfig, out: Path, edit: dict | None = None) -> Path:
    """Save a PEFT adapter of ``config`` with random trainables; ``edit`` changes its config."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config
        )
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.1)
        model.save_pretrained(out)
    if edit:
        path = out / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    return out


def peft_merged(base: Path, adapter: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def codes(adapter: Path, base: Path) -> list[str]:
    return sorted({f.rule.code for f in validate([adapter], base=base).findings})


#: field -> (base, config, config edit): merged bit for bit as PEFT, validate --base finds nothing
EQUAL = {
    "default": ("llama", lora(), None),
    "use_rslora": ("llama", lora(use_rslora=True), None),
    "layers_to_transform": ("llama", lora(layers_to_transform=[1], layers_pattern="layers"), None),
    "rank_alpha_pattern_regex": (
        "llama",
        lora(rank_pattern={r"layers\.\d\.self_attn\.q_proj": 2}, alpha_pattern={"v_proj": 3}),
        None,
    ),
    "exclude_modules": ("llama", lora(exclude_modules=["model.layers.0.self_attn.q_proj"]), None),
    "use_dora": ("llama", lora(target_modules=["q_proj", "down_proj"], use_dora=True), None),
    "embedding": ("llama", lora(target_modules=["embed_tokens", "q_proj"]), None),
    "modules_to_save": ("llama", lora(modules_to_save=["lm_head"]), None),
    "fan_in_fan_out": (
        "gpt2",
        lora(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        None,
    ),
    "bias_all": ("gpt2", lora(target_modules=["c_attn"], fan_in_fan_out=True, bias="all"), None),
    "init_orthogonal": ("llama", lora(init_lora_weights="orthogonal"), None),
    "init_gaussian": ("llama", lora(init_lora_weights="gaussian"), None),
    "init_mica": ("llama", lora(init_lora_weights="mica"), None),
    "init_eva": ("llama", lora(), {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}}),
    "velora_config": ("llama", lora(velora_config=VeloraConfig()), None),
    "monteclora_config": ("llama", lora(monteclora_config=MontecloraConfig()), None),
    "use_qalora": ("llama", lora(use_qalora=True, qalora_group_size=8), None),
    "trainable_token_indices": ("llama", lora(trainable_token_indices=[1, 2]), None),
    # GPT-2 ties lm_head to wte (the checkpoint holds wte only): the LoRA merges into it
    "tied_lm_head": ("gpt2", lora(target_modules=["lm_head"]), None),
    "tied_lm_head_ensure_weight_tying": (
        "gpt2",
        lora(target_modules=["lm_head"], ensure_weight_tying=True),
        None,
    ),
    # two adapters on the shared weight (no ensure_weight_tying): both apply
    "tied_lm_head_and_wte": ("gpt2", lora(target_modules=["lm_head", "wte"]), None),
    "tied_lm_head_with_conv1d": (
        "gpt2",
        lora(target_modules=["lm_head", "c_attn"], fan_in_fan_out=True),
        None,
    ),
}

#: field -> (base, config, words the refusal must hold, the codes validate --base reports)
REFUSED = {
    "init_pissa": ("llama", lora(init_lora_weights="pissa"), "'pissa'", []),
    "init_olora": ("llama", lora(init_lora_weights="olora"), "'olora'", []),
    "alora_invocation_tokens": (
        "llama",
        lora(alora_invocation_tokens=[5, 6]),
        "alora_invocation_tokens",
        [],
    ),
    "kasa_config": ("llama", lora(kasa_config=KasaConfig()), "kasa_config", ["LT110"]),
    # layers 0-1 then 1 again (sharing weights): modules on layers.2 are layer 1's in the base
    "layer_replication": (
        "llama",
        lora(layer_replication=[[0, 2], [1, 2]]),
        "layer_replication",
        [],
    ),
    "use_bdlora": (
        "llama",
        lora(
            target_modules=["q_proj", "o_proj"],
            use_bdlora=BdLoraConfig(
                target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2
            ),
        ),
        "use_bdlora",
        ["LT110"],
    ),
    "target_parameters": (
        "moe",
        lora(target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
        "target_parameters",
        ["LT110"],
    ),
    "target_parameters_and_modules": (
        "moe",
        lora(target_modules=["q_proj"], target_parameters=["experts.down_proj"]),
        "target_parameters",
        ["LT111"],
    ),
    "dora_embedding": (
        "llama",
        lora(target_modules=["embed_tokens"], use_dora=True),
        "DoRA embedding",
        [],
    ),
}


def base_of(name: str, moe_base: Path) -> Path:
    return {"llama": LLAMA, "gpt2": GPT2, "moe": moe_base}[name]


@pytest.mark.parametrize("field", list(EQUAL))
def test_merge_equals_peft_merge_and_unload(tmp_path, moe_base, field) -> None:
    name, config, edit = EQUAL[field]
    base = base_of(name, moe_base)
    adapter = build(base, config, tmp_path / "adapter", edit)
    assert codes(adapter, base) in ([], ["LT590"])  # LT590: the servers' scale, not PEFT's
    merge(base, [adapter], tmp_path / "out")
    want = peft_merged(base, adapter)
    with SafetensorsFile(tmp_path / "out" / "model.safetensors") as f:
        got = {k: f.read(k) for k in f}
    changed = 0
    for key, tensor in want.items():
        if key == "lm_head.weight" and key not in got:
            continue  # tied to the input embedding (GPT-2): the checkpoint has no tensor of it
        assert got[key].tobytes() == tensor.numpy().tobytes(), key
        changed += got[key].tobytes() != _base_bytes(base, key)
    assert changed > 0


def _base_bytes(base: Path, key: str) -> bytes:
    with SafetensorsFile(base / "model.safetensors") as f:
        return f.read(key).tobytes()


@pytest.mark.parametrize("field", list(REFUSED))
def test_what_merge_cannot_reproduce_is_refused_by_name(tmp_path, moe_base, field) -> None:
    name, config, words, found = REFUSED[field]
    base = base_of(name, moe_base)
    adapter = build(base, config, tmp_path / "adapter")
    assert codes(adapter, base) == found
    with pytest.raises(UnsupportedAdapterError) as exc:
        merge(base, [adapter], tmp_path / "out")
    assert words in exc.value.message
    assert not (tmp_path / "out").exists()
