"""``extract`` end to end: the adapter reproduces the fine-tune (through loratool's merge and
through real PEFT), every module is near the exact optimum, and the checks refuse what does not
match."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lora_tools.errors import DeviceError, ShapeError, UsageError
from lora_tools.formats import load_adapter
from lora_tools.io.safetensors import SafetensorsFile, save_tensors
from lora_tools.lowrank import relative_error
from lora_tools.ops._algebra import write_adapter
from lora_tools.ops.extract import ExtractResult, extract
from lora_tools.ops.merge import merge
from lora_tools.ops.validate import validate

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
LLAMA, LLAMA_FT = FIX / "bases/tiny-llama", FIX / "finetuned/tiny-llama-ft"
FLUX, FLUX_FT = FIX / "bases/tiny-flux.safetensors", FIX / "finetuned/tiny-flux-ft.safetensors"


def read_all(path: Path) -> dict[str, np.ndarray]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for file in files:
        with SafetensorsFile(file) as f:
            out.update({k: f.read(k).astype(np.float64) for k in f})
    return out


def planted(rng: np.random.Generator, shape: tuple[int, int], spectrum, noise: float):
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], len(spectrum))))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], len(spectrum))))
    return (u * np.asarray(spectrum)) @ v.T + noise * rng.standard_normal(shape)


@pytest.fixture(scope="module")
def llama64(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A LlamaConfig base (hidden 64, 2 layers) and a fine-tune: a rank-4 update with a knee
    on every linear, the embeddings and one norm changed, lm_head unchanged."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama64")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(root / "base")
    ft = root / "ft"
    shutil.copytree(root / "base", ft)
    rng = np.random.default_rng(0)
    tensors = read_all(root / "base")
    for key, w in tensors.items():
        if w.ndim == 2 and "layers." in key:
            tensors[key] = w + planted(rng, w.shape, [0.3, 0.1, 0.05, 0.02], 1e-5)
        elif key == "model.embed_tokens.weight":
            tensors[key] = w + planted(rng, w.shape, [0.2, 0.1], 0.0)
        elif key == "model.norm.weight":
            tensors[key] = w + 0.01 * rng.standard_normal(w.shape)
    save_tensors(ft / "model.safetensors", {k: v.astype(np.float32) for k, v in tensors.items()})
    return root / "base", ft


def merged_back(result: ExtractResult, base: Path, tmp: Path) -> dict[str, np.ndarray]:
    out = tmp / ("adapter.safetensors" if result.format == "kohya" else "adapter")
    write_adapter(result.adapter, out, [])
    report = validate([out], base=base)
    assert not report.failed("warning"), [f.message for f in report.findings]
    target = tmp / ("merged.safetensors" if base.is_file() else "merged")
    merge(base, [str(out)], target)
    return read_all(target)


def assert_reproduces(result: ExtractResult, base: Path, ft: Path, merged: dict) -> None:
    """Every LoRA module's tensor is the fine-tune's within its reported error (plus the
    rounding of the factors to the output dtype); unchanged tensors are the base's."""
    b, f = read_all(base), read_all(ft)
    for row in result.modules:
        dw = f[row.tensor] - b[row.tensor]
        err = np.linalg.norm(f[row.tensor] - merged[row.tensor]) / np.linalg.norm(dw)
        assert err <= row.relative_error * (1 + 1e-3) + 2e-6, (row.tensor, err, row)
    for key in b:
        if np.array_equal(b[key], f[key]):
            np.testing.assert_array_equal(merged[key], b[key])


def test_llama_fixture_round_trips_through_merge(tmp_path: Path) -> None:
    result = extract(LLAMA, LLAMA_FT, rank=3)
    assert result.format == "peft" and len(result.modules) == 14
    assert result.unchanged == 5  # embeddings, lm_head, the three norms of layer 1 / model.norm
    assert {t.tensor for t in result.tensors} == {
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    }
    assert all(t.status == "listed" for t in result.tensors)
    b, f = read_all(LLAMA), read_all(LLAMA_FT)
    for row in result.modules:
        S = np.linalg.svd((f[row.tensor] - b[row.tensor]).astype(np.float32).astype(np.float64))[1]
        assert row.relative_error <= relative_error(S, 3) * (1 + 1e-3) + 1e-6
    config = result.adapter.config
    assert config["base_model_name_or_path"] == str(LLAMA)
    assert sorted(config["target_modules"]) == sorted(m.tensor[:-7] for m in result.modules)
    assert_reproduces(result, LLAMA, LLAMA_FT, merged_back(result, LLAMA, tmp_path))


def test_real_peft_loads_it_and_merges_to_the_fine_tune(tmp_path: Path, llama64) -> None:
    from tests.consumers import peft_consume

    base, ft = llama64
    result = extract(base, ft, rank=4, keep_diffs=True)
    kinds = {m.kind for m in result.adapter.modules.values()}
    assert kinds == {"linear", "embedding"}
    out = tmp_path / "adapter"
    write_adapter(result.adapter, out, [])
    consumed = peft_consume(base, out)
    assert consumed.problems(len(result.modules)) == []
    f = read_all(ft)
    for row in result.modules:
        dw = f[row.tensor] - consumed.base["/" + row.tensor]
        err = np.linalg.norm(f[row.tensor] - consumed.merged["/" + row.tensor])
        assert err <= row.relative_error * np.linalg.norm(dw) * (1 + 1e-3) + 1e-6, row
    # the changed norm went into modules_to_save whole, so PEFT restores it exactly
    assert result.adapter.config["modules_to_save"] == ["model.norm"]
    np.testing.assert_allclose(consumed.merged["/model.norm.weight"], f["model.norm.weight"])
    assert {t.status for t in result.tensors} == {"stored"}


def test_energy_rule_and_merge_round_trip_on_llama64(tmp_path: Path, llama64) -> None:
    base, ft = llama64
    result = extract(base, ft, energy=0.99)
    b, f = read_all(base), read_all(ft)
    for row in result.modules:
        S = np.linalg.svd((f[row.tensor] - b[row.tensor]).astype(np.float32).astype(np.float64))[1]
        cum = np.cumsum(S**2) / np.sum(S**2)
        assert row.rank == int(np.searchsorted(cum, 0.99 * (1 - 1e-12)) + 1), row
    methods = {row.method for row in result.modules}
    assert "randomized" in methods
    assert_reproduces(result, base, ft, merged_back(result, base, tmp_path))


def test_flux_single_file_gives_kohya_names_that_merge_back(tmp_path: Path) -> None:
    result = extract(FLUX, FLUX_FT, rank=3)
    assert result.format == "kohya"
    assert all(m.key.startswith("lora_unet_") for m in result.adapter.modules.values())
    assert {t.dtype for m in result.adapter.modules.values() for t in (m.up, m.down)} == {"BF16"}
    merged = merged_back(result, FLUX, tmp_path)
    b, f = read_all(FLUX), read_all(FLUX_FT)
    for row in result.modules:
        dw = f[row.tensor] - b[row.tensor]
        err = np.linalg.norm(f[row.tensor] - merged[row.tensor]) / np.linalg.norm(dw)
        # the base, the factors and the merge are bf16: two roundings of the result on top
        assert err <= row.relative_error + 0.02, (row.tensor, err, row.relative_error)


def test_keep_diffs_in_kohya_writes_diff_tensors(tmp_path: Path) -> None:
    result = extract(LLAMA, LLAMA_FT, rank=3, format="kohya", keep_diffs=True)
    keys = set(result.adapter.passthrough)
    assert keys == {
        "lora_unet_layers_0_input_layernorm.diff",
        "lora_unet_layers_0_post_attention_layernorm.diff",
    }
    out = tmp_path / "a.safetensors"
    write_adapter(result.adapter, out, [])
    read = load_adapter(out)
    assert len(read.modules) == 14 and set(read.deltas) == {k[:-5] for k in keys}


def test_gpt2_conv1d_and_biases_load_in_peft(tmp_path: Path) -> None:
    from tests.consumers import peft_consume

    base = FIX / "bases/tiny-gpt2"
    ft = tmp_path / "ft"
    shutil.copytree(base, ft)
    rng = np.random.default_rng(2)
    tensors = read_all(base)
    for key, w in tensors.items():
        if key.endswith("attn.c_attn.weight") or key.endswith("mlp.c_fc.weight"):
            tensors[key] = w + planted(rng, w.shape, [0.2, 0.1], 0.0)
        elif key.endswith("attn.c_attn.bias") or key.endswith("ln_f.bias"):
            tensors[key] = w + 0.01 * rng.standard_normal(w.shape)
    save_tensors(ft / "model.safetensors", {k: v.astype(np.float32) for k, v in tensors.items()})
    result = extract(base, ft, rank=2, keep_diffs=True)
    assert result.adapter.config["fan_in_fan_out"] is True
    assert result.adapter.config["lora_bias"] is True
    assert result.adapter.config["modules_to_save"] == ["transformer.ln_f"]
    out = tmp_path / "adapter"
    write_adapter(result.adapter, out, [])
    consumed = peft_consume(base, out)
    assert consumed.problems(len(result.modules)) == []
    f = read_all(ft)
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
        np.testing.assert_allclose(consumed.merged["/" + key], f[key], atol=1e-5)
    for key in ("transformer.h.0.attn.c_attn.bias", "transformer.ln_f.bias"):
        np.testing.assert_allclose(consumed.merged["/" + key], f[key], atol=1e-6)


def test_missing_and_reshaped_tensors_are_errors_naming_them(tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    shutil.copytree(LLAMA_FT, ft)
    tensors = read_all(LLAMA_FT)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((64, 16))
    save_tensors(ft / "model.safetensors", tensors)
    with pytest.raises(ShapeError, match=r"'model.layers.1.mlp.up_proj.weight' is \[64, 32\]"):
        extract(LLAMA, ft, rank=2)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_tensors(ft / "model.safetensors", tensors)
    with pytest.raises(ShapeError, match="'model.layers.1.mlp.up_proj.weight' is in the base"):
        extract(LLAMA, ft, rank=2)


def test_a_resized_vocabulary_is_reported_not_refused(tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    shutil.copytree(LLAMA_FT, ft)
    tensors = read_all(LLAMA_FT)
    tensors["model.embed_tokens.weight"] = np.zeros((130, 32))
    save_tensors(ft / "model.safetensors", tensors)
    result = extract(LLAMA, ft, rank=2)
    (row,) = [t for t in result.tensors if t.status == "resized"]
    assert row.tensor == "model.embed_tokens.weight" and "128 to 130" in row.reason


def _resized_ft(tmp_path: Path) -> Path:
    """tiny-llama-ft with two tokens added (130 rows of embedding and lm_head), in its dtype."""
    ft = tmp_path / "ft"
    shutil.copytree(LLAMA_FT, ft)
    with SafetensorsFile(LLAMA_FT / "model.safetensors") as f:
        tensors = {k: f.read(k) for k in f}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = tensors[key]
        tensors[key] = np.concatenate([rows, (0.5 * rows[:2]).astype(rows.dtype)])
    save_tensors(ft / "model.safetensors", tensors)
    return ft


def test_a_resized_vocabulary_is_stored_whole_with_keep_diffs_and_peft_loads_it(tmp_path) -> None:
    """--keep-diffs stores the fine-tuned embedding in modules_to_save; PEFT loads it onto the
    base once the base has the rows (resize_token_embeddings), and the model's weights are the
    fine-tune's: the embedding exactly, the LoRA layers within the reported error."""
    pytest.importorskip("peft")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ft = _resized_ft(tmp_path)
    plain = extract(LLAMA, ft, rank=8)
    assert any("resized" in n and "--keep-diffs" in n for n in plain.notes)
    assert not plain.adapter.passthrough
    result = extract(LLAMA, ft, rank=8, keep_diffs=True)
    rows = [t for t in result.tensors if t.status == "resized"]
    assert [t.tensor for t in rows] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert all("modules_to_save" in t.reason and "130 rows" in t.reason for t in rows)
    assert {"model.embed_tokens", "lm_head"} <= set(result.adapter.config["modules_to_save"])
    out = write_adapter(result.adapter, tmp_path / "out", [])
    base = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
    base.resize_token_embeddings(130)
    merged = PeftModel.from_pretrained(base, out.parent).merge_and_unload().state_dict()
    want = read_all(ft)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        np.testing.assert_array_equal(merged[key].numpy(), want[key])
    for m in result.modules:
        got = merged[m.tensor].numpy().astype(np.float64)
        base_w, ft_w = read_all(LLAMA)[m.tensor], want[m.tensor]
        err = np.linalg.norm(ft_w - got) / np.linalg.norm(ft_w - base_w)
        assert err <= m.relative_error + 1e-4, m.tensor
    # on the base as it is, PEFT refuses it, and so do merge and validate
    found = [(f.rule.code, f.module) for f in validate([out.parent], base=LLAMA).findings]
    assert sorted(found) == [
        ("LT403", "base_model.model.lm_head.weight"),
        ("LT403", "base_model.model.model.embed_tokens.weight"),
    ]
    with pytest.raises(ShapeError, match="resized vocabulary"):
        merge(LLAMA, [out.parent], tmp_path / "merged")


def test_identical_checkpoints_extract_nothing() -> None:
    with pytest.raises(UsageError, match="21 tensors are bit-equal"):
        extract(LLAMA, LLAMA, rank=2)


def test_modules_regex_lists_the_rest() -> None:
    result = extract(LLAMA, LLAMA_FT, rank=2, modules=r"self_attn\.(q|v)_proj")
    assert len(result.modules) == 4
    listed = [t for t in result.tensors if t.reason == "left out by --modules"]
    assert len(listed) == 10


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="--device cuda"):
        extract(LLAMA, LLAMA_FT, rank=2, device="cuda")


@pytest.mark.parametrize("device", ["torch-cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_gives_the_numpy_adapter(device: str, tmp_path: Path, llama64) -> None:
    """torch's path (on the CPU here; on the GPU with ``-m gpu`` where one exists) gives the
    numpy adapter within the stated tolerance: same ranks and methods, errors within 1e-4 of
    numpy's, every certified one within 1e-3 of the optimum; the energy rule picks the same
    ranks."""
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    base, ft = llama64
    for rule in ({"rank": 3}, {"energy": 0.95}):
        a = extract(base, ft, device="cpu", **rule)
        b = extract(base, ft, device=device, **rule)
        assert b.device.startswith("cuda") or device != "cuda"
        for ra, rb in zip(a.modules, b.modules, strict=True):
            assert (ra.module, ra.rank, ra.method) == (rb.module, rb.rank, rb.method)
            assert rb.relative_error == pytest.approx(ra.relative_error, rel=1e-4, abs=1e-7)
            assert rb.excess_bound <= 1e-3
