"""convert --to gguf against llama.cpp's own convert_lora_to_gguf.py and against the math.

tests/data/gguf/facts/ holds what the script wrote for the adapters beside it (made by
tests/data/gguf/make_gguf_facts.py, which says how to re-record them): key-values in order and
every tensor's name, shape, GGML type and sha256. Where the adapter's scales are uniform,
loratool's file must be the script's, tensor for tensor and byte for byte. Where they are not
(alpha_pattern, rsLoRA) the script is wrong (one alpha for every module) and loratool differs
on exactly those modules' lora_b; there the reference is PEFT's own delta (a PeftModel built
from the base config with the adapter loaded), in float64, with llama.cpp's q / k row
permutation written out independently here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lora_tools.adapter import Adapter  # noqa: E402
from lora_tools.errors import (  # noqa: E402
    UnsupportedAdapterError,
    UnsupportedBaseError,
    UsageError,
)
from lora_tools.formats import load_adapter  # noqa: E402
from lora_tools.ops.to_gguf import (  # noqa: E402
    ARCHITECTURES,
    convert_to_gguf,
    plan_gguf,
    read_base_config,
)
from lora_tools.ops.validate import validate  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "gguf"
FACTS = sorted((DATA / "facts").glob("*.json"))
#: adapters whose scale is not lora_alpha / r on these modules: the script serves them wrong
NOT_UNIFORM = {
    "llama-patterns": ("attn_k", "ffn_down"),  # alpha_pattern k_proj 3, down_proj 32
    "llama-rslora": ("attn_q", "attn_k", "attn_v", "attn_output"),  # every module
}


def _maker():
    spec = importlib.util.spec_from_file_location("make_gguf_facts", DATA / "make_gguf_facts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(path: Path) -> dict:
    return json.loads(path.read_text())


def _convert(tmp_path: Path, case: str, base: str, outtype: str = "f32") -> Path:
    out = tmp_path / f"{case}.{outtype}.gguf"
    convert_to_gguf(
        load_adapter(DATA / "adapters" / case), out, base=DATA / "bases" / base, outtype=outtype
    )
    return out


WRITTEN = [
    f for f in FACTS if _record(f)["returncode"] == 0 and _record(f)["case"] != "llama-tied-head"
]


@pytest.mark.parametrize("facts", WRITTEN, ids=[f.stem for f in WRITTEN])
def test_same_file_as_convert_lora_to_gguf(facts, tmp_path):
    """Key-values and tensors as the script wrote them; the uniform adapters byte for byte."""
    ref = _record(facts)
    out = _convert(tmp_path, ref["case"], ref["base"], ref["outtype"])
    # what loratool writes passes its own validate (read back as llama.cpp reads it)
    report = validate([out])
    assert report.files[0].format == "gguf"
    assert not report.failed("warning"), [str(f.message) for f in report.findings]
    mine = _maker().gguf_facts(out)
    assert mine["kv"] == ref["kv"]
    assert [t["name"] for t in mine["tensors"]] == [t["name"] for t in ref["tensors"]]
    differs = {r["name"] for t, r in zip(mine["tensors"], ref["tensors"], strict=True) if t != r}
    wrong = NOT_UNIFORM.get(ref["case"])
    if wrong is None:
        assert differs == set()
        assert mine["file_sha256"] == ref["file_sha256"]
        return
    expected = {
        r["name"]
        for r in ref["tensors"]
        if r["name"].endswith(".lora_b") and r["name"].split(".")[2] in wrong
    }
    assert differs == expected and expected
    for t, r in zip(mine["tensors"], ref["tensors"], strict=True):  # shapes and types agree
        assert (t["ne"], t["type"]) == (r["ne"], r["type"])


def _rope_permutation(out: int, n_head: int) -> np.ndarray:
    """Row ``j`` of llama.cpp's q / k weight is HF's row ``perm[j]``: per head of ``d`` rows,
    llama.cpp interleaves the two rotary halves (x0, y0, x1, y1...)."""
    d = out // n_head
    perm = np.empty(out, dtype=np.int64)
    for h in range(n_head):
        for i in range(d // 2):
            perm[h * d + 2 * i] = h * d + i
            perm[h * d + 2 * i + 1] = h * d + d // 2 + i
    return perm


def _peft_deltas(case: str, base: str) -> dict[str, np.ndarray]:
    """PEFT's own ``get_delta_weight`` per module (float64), from a PeftModel of the base."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.AutoConfig.from_pretrained(DATA / "bases" / base)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model = peft.PeftModel.from_pretrained(model, DATA / "adapters" / case)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.scaling:
            with torch.no_grad():
                delta = module.get_delta_weight("default").double().numpy()
            path = name.removeprefix("base_model.model.")
            out[path] = delta
    return out


MATH_CASES = [
    ("llama", "llama"),
    ("llama-patterns", "llama"),
    ("llama-rslora", "llama"),
    ("mistral", "mistral"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("gemma", "gemma"),
    ("gemma2", "gemma2"),
    ("gemma3", "gemma3"),
]


@pytest.mark.oracle
@pytest.mark.parametrize(("case", "base"), MATH_CASES, ids=[c for c, _ in MATH_CASES])
def test_llama_cpp_delta_is_peft_delta(case, base, tmp_path):
    """What llama.cpp computes from the file, alpha / r_module * B' @ A, is PEFT's update with
    the base's q / k rows permuted as llama.cpp permutes them, for every module."""
    out = _convert(tmp_path, case, base)
    reader = gguf.GGUFReader(out)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    config = json.loads((DATA / "bases" / base / "config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    permuted = config["architectures"][0] in ("LlamaForCausalLM", "MistralForCausalLM")
    names = load_adapter(DATA / "adapters" / case)
    plan = plan_gguf(names, DATA / "bases" / base)
    peft_deltas = _peft_deltas(case, base)
    assert len(peft_deltas) == len(plan.modules)
    for key, gguf_name in plan.modules.items():
        path = names.modules[key].path
        a, b = tensors[gguf_name + ".lora_a"], tensors[gguf_name + ".lora_b"]
        rank = b.shape[1]
        scale = alpha / rank if alpha else 1.0
        expected = peft_deltas[path]
        if gguf_name.startswith("token_embd"):
            got = scale * (a @ b.T)  # lora_a is A transposed: [vocab, r]; rows are tokens
        else:
            got = scale * (b @ a)
            if permuted and path.endswith(("q_proj", "k_proj")):
                heads = n_head if path.endswith("q_proj") else n_kv
                expected = expected[_rope_permutation(expected.shape[0], heads)]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=path)


def test_script_scale_is_wrong_where_loratool_bakes(tmp_path):
    """The script's lora_b of an alpha_pattern module is the stored B: llama.cpp would serve
    it at lora_alpha / r = 2 instead of PEFT's 3 / 4 (k_proj) -- loratool's B carries 3/8."""
    adapter = load_adapter(DATA / "adapters" / "llama-patterns")
    plan = plan_gguf(adapter, DATA / "bases" / "llama")
    k = "base_model.model.model.layers.0.self_attn.k_proj"
    down = "base_model.model.model.layers.1.mlp.down_proj"
    q = "base_model.model.model.layers.0.self_attn.q_proj"  # rank_pattern 2 only: exact as is
    assert plan.baked[k] == pytest.approx((3 / 4) / (8 / 4))
    assert plan.baked[down] == pytest.approx((32 / 4) / (8 / 4))
    assert q not in plan.baked and adapter.modules[q].rank == 2
    rs = plan_gguf(load_adapter(DATA / "adapters" / "llama-rslora"), DATA / "bases" / "llama")
    assert len(rs.baked) == 8  # every module: (8 / sqrt 16) / (8 / 16)
    assert all(v == pytest.approx(4.0) for v in rs.baked.values())


@pytest.mark.parametrize(
    ("case", "base", "words"),
    [
        ("llama-dora", "llama", "DoRA"),
        ("llama-lora-bias", "llama", "lora_B bias"),
        ("llama-modules-to-save", "llama", "'base_model.model.lm_head.weight' is a full weight"),
        ("llama-tied-head", "llama-tied", "ties to the token embeddings"),
        ("llama-tied-head", "gemma", "GemmaForCausalLM ties"),
        ("mistral", "gemma3", "trims the embedding to the tokenizer's vocabulary"),
    ],
)
def test_refused_by_name(case, base, words, tmp_path):
    """What llama.cpp rejects (the script exits 1 on the first three; llama.cpp finds no
    output.weight for the tied heads) is refused, naming the module or tensor; nothing is
    written."""
    out = tmp_path / "x.gguf"
    with pytest.raises(UnsupportedAdapterError, match=words):
        convert_to_gguf(load_adapter(DATA / "adapters" / case), out, base=DATA / "bases" / base)
    assert list(tmp_path.iterdir()) == []


def test_script_refuses_the_same_files():
    """The recorded facts: convert_lora_to_gguf.py exits 1 on DoRA, lora_bias and
    modules_to_save, naming the tensor."""
    for case, tensor in (
        ("llama-dora", "lora_magnitude_vector"),
        ("llama-lora-bias", "lora_B.bias"),
        ("llama-modules-to-save", "lm_head.weight"),
    ):
        ref = _record(DATA / "facts" / f"{case}.f32.json")
        assert ref["returncode"] == 1 and tensor in ref["stderr_errors"][0]


def test_unsupported_architecture(tmp_path):
    base = tmp_path / "gpt2"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedBaseError, match="'GPT2LMHeadModel'"):
        plan_gguf(load_adapter(DATA / "adapters" / "llama"), base)


def test_module_the_tensor_map_lacks(tmp_path):
    """An adapter for a deeper model than the base: layer 1 is no tensor of a 1-layer base."""
    base = tmp_path / "llama"
    base.mkdir()
    config = json.loads((DATA / "bases" / "llama" / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(
        UnsupportedAdapterError, match="tensor map has no tensor for 'model.layers.1"
    ):
        plan_gguf(load_adapter(DATA / "adapters" / "llama"), base)


def test_base_from_the_adapter_config(tmp_path, monkeypatch):
    """Without --base: the config's base_model_name_or_path, when it is a local folder; else
    a usage error saying the base is needed."""
    adapter = tmp_path / "adapter"
    shutil.copytree(DATA / "adapters" / "llama", adapter)
    monkeypatch.chdir(DATA)  # base_model_name_or_path is bases/llama, relative
    plan = plan_gguf(load_adapter(adapter))
    assert plan.base.name == "llama" and plan.arch == "llama"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="needs the base model's config.json") as err:
        plan_gguf(load_adapter(adapter))
    assert err.value.kind == "needs-base"


def test_gguf_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UsageError, match="gguf package") as err:
        plan_gguf(load_adapter(DATA / "adapters" / "llama"), DATA / "bases" / "llama")
    assert "loratool[gguf]" in err.value.hint


def test_inputs_untouched(tmp_path):
    before = {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (DATA / "adapters" / "qwen2").iterdir()
    }
    _convert(tmp_path, "qwen2", "qwen2", "bf16")
    after = {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (DATA / "adapters" / "qwen2").iterdir()
    }
    assert before == after


MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "LLaMAForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
}


@pytest.mark.oracle
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize(
    "given", [{}, {"num_attention_heads": 4}, {"num_attention_heads": 4, "num_key_value_heads": 2}]
)
def test_config_defaults_are_transformers(arch, given, tmp_path):
    """A config.json that leaves head counts, layers or tying out reads as transformers'
    AutoConfig reads it (what llama.cpp's converter sees)."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": [arch], "model_type": MODEL_TYPES[arch], **given})
    )
    ref = transformers.AutoConfig.from_pretrained(tmp_path)
    mine = read_base_config(Adapter(format="peft"), tmp_path)
    assert (mine.n_layer, mine.n_head, mine.n_head_kv, mine.tied) == (
        ref.num_hidden_layers,
        ref.num_attention_heads,
        ref.num_key_value_heads,
        ref.tie_word_embeddings,
    )


def test_mlx_adapter_converts_with_its_scale(tmp_path):
    """An mlx-lm adapter (one scale in its config, no lora_alpha): alpha = scale * r, and what
    llama.cpp computes from the file is loratool's update of each module (embedding included),
    q / k rows permuted."""
    mlx = Path(__file__).resolve().parents[1] / "data" / "mlx"
    adapter = load_adapter(mlx / "lora")
    out = tmp_path / "mlx.gguf"
    result = convert_to_gguf(adapter, out, base=mlx / "base")
    plan = result.plan
    reader = gguf.GGUFReader(out)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    assert alpha == 2.5 * 4 and not plan.baked
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    for key, name in plan.modules.items():
        m = adapter.modules[key]
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        scale = alpha / b.shape[1]
        got = scale * (a @ b.T) if name.startswith("token_embd") else scale * (b @ a)
        expected = m.delta()
        if m.path.endswith(("q_proj", "k_proj")):
            heads = plan.base.n_head if m.path.endswith("q_proj") else plan.base.n_head_kv
            expected = expected[_rope_permutation(expected.shape[0], heads)]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=key)
