"""loratool merge: PEFT / diffusers oracles, output layout, safety, engines."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_tools.constants import MERGE_RECORD_NAME
from lora_tools.errors import DeviceError, FormatError, OutputError, ResolveError, UsageError
from lora_tools.io.safetensors import SafetensorsFile, read_header, save_tensors
from lora_tools.ops.card import split_card
from lora_tools.ops.merge import AdapterSpec, merge, select_engine

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
PEFT_CASES = [
    ("tiny-llama", "llama-lora"),
    ("tiny-llama", "llama-all-linear"),
    ("tiny-llama", "llama-patterns"),
    ("tiny-llama", "llama-rslora"),
    ("tiny-llama", "llama-dora"),
    ("tiny-llama", "llama-embedding"),
    ("tiny-llama", "llama-modules-to-save"),
    ("tiny-gpt2", "gpt2-lora"),
    ("tiny-gpt2", "gpt2-bias"),
    ("tiny-llama-bf16", "llama-lora-bf16"),
    ("tiny-llama-bf16", "llama-lora"),
    ("tiny-llama-sharded", "llama-lora"),
]
ENGINES = ["cpu", "torch-cpu"]


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with SafetensorsFile(path) as f:
            for key in f.header.tensors:
                out[key] = f.read(key)
    return out


def _raw(folder: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with SafetensorsFile(path) as f:
            for key in f.header.tensors:
                out[f"{path.relative_to(folder)}:{key}"] = f.read_bytes(key)
    return out


def _sha(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def peft_reference():
    """PEFT's merge_and_unload state dict (raw bytes) per (base, adapter), cached."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cache: dict[tuple[str, str], dict[str, bytes]] = {}

    def get(base: str, adapter: str) -> dict[str, bytes]:
        if (base, adapter) not in cache:
            dtype = torch.bfloat16 if "bf16" in base else torch.float32
            model = AutoModelForCausalLM.from_pretrained(FIXTURES / "bases" / base, dtype=dtype)
            merged = PeftModel.from_pretrained(
                model, FIXTURES / "peft" / adapter
            ).merge_and_unload()
            cache[(base, adapter)] = {
                k: v.contiguous().view(torch.uint8).numpy().tobytes()
                for k, v in merged.state_dict().items()
            }
        return cache[(base, adapter)]

    return get


#: Fixtures whose rank (8) makes OpenBLAS (the cpu engine) and MKL (torch, so PEFT) sum the
#: terms of a product in different orders; every other fixture has rank <= 6 and is summed alike.
ORDER_SENSITIVE = {("tiny-llama", "llama-all-linear")}


@pytest.mark.oracle
@pytest.mark.parametrize(
    "engine,base,adapter",
    [("cpu", b, a) for b, a in PEFT_CASES if (b, a) not in ORDER_SENSITIVE]
    + [("torch-cpu", b, a) for b, a in PEFT_CASES],
)
def test_bit_identical_to_peft_merge_and_unload(
    tmp_path: Path, peft_reference, base: str, adapter: str, engine: str
) -> None:
    out = tmp_path / "out"
    summary = merge(FIXTURES / "bases" / base, [FIXTURES / "peft" / adapter], out, device=engine)
    ref = peft_reference(base, adapter)
    got = {k.split(":", 1)[1]: v for k, v in _raw(out).items()}
    changed = [k for k in got if k in ref and got[k] != ref[k]]
    assert changed == []
    assert set(ref) - set(got) <= {"lm_head.weight"}  # GPT-2's tied head is not stored
    assert summary.tensors["merged"] + summary.tensors["replaced"] > 0
    # the merge changed something: a silent no-op would also "equal" an untouched reference
    base_vals = _raw(FIXTURES / "bases" / base)
    assert any(got[k.split(":", 1)[1]] != v for k, v in base_vals.items())


@pytest.mark.oracle
def test_cpu_engine_within_summation_error_of_peft(tmp_path: Path, peft_reference) -> None:
    """Rank 8: OpenBLAS and MKL sum the product in different orders. Every element must still
    be PEFT's up to that: |got - PEFT| <= |s| * 2 (r + 1) 2^-24 sum_k |B_ik A_kj| + ulp."""
    from lora_tools.formats import load_adapter

    base_name, adapter_name = "tiny-llama", "llama-all-linear"
    out = tmp_path / "out"
    merge(FIXTURES / "bases" / base_name, [FIXTURES / "peft" / adapter_name], out, device="cpu")
    ref = peft_reference(base_name, adapter_name)
    got = _tensors(out)
    adapter = load_adapter(FIXTURES / "peft" / adapter_name)
    targets = {
        m.key.removeprefix("base_model.model.") + ".weight": m for m in adapter.modules.values()
    }
    differing = total = 0
    for key, values in got.items():
        want = np.frombuffer(ref[key], np.float32).reshape(values.shape)
        if key not in targets:
            assert np.array_equal(values, want), key
            continue
        m = targets[key]
        up, down = (np.abs(f) for f in m.factors(np.float64))
        bound = abs(m.scale) * 2 * (m.rank + 1) * 2.0**-24 * (up @ down) + 2.0**-23 * np.abs(want)
        assert np.all(np.abs(values.astype(np.float64) - want) <= bound), key
        differing += int(np.sum(values != want))
        total += values.size
    print(f"llama-all-linear: {differing} of {total} merged elements differ from PEFT")
    assert len(targets) == 14 and total > 0


@pytest.mark.oracle
@pytest.mark.parametrize("engine", ENGINES)
def test_gpt2_dora_matches_peft(tmp_path: Path, engine: str) -> None:
    """DoRA on GPT-2's Conv1D ([in, out] storage): the norm runs over columns of the stored
    tensor, so the engines merge it in one block instead of row blocks."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = FIXTURES / "bases" / "tiny-gpt2"
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"], use_dora=True,
        fan_in_fan_out=True,
    )  # fmt: skip
    torch.manual_seed(7)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path / "adapter")
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter"
    ).merge_and_unload()
    ref = {k: v.contiguous().numpy() for k, v in reference.state_dict().items()}

    merge(base_dir, [tmp_path / "adapter"], tmp_path / "out", device=engine, block_bytes=1024)
    got = _tensors(tmp_path / "out")
    changed = [k for k in got if not np.array_equal(got[k], _tensors(base_dir)[k])]
    assert sorted(changed) == [
        f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")
    ]
    assert [k for k in got if not np.array_equal(got[k], ref[k])] == []


def test_torch_cpu_engine_writes_the_numpy_engines_bytes(tmp_path: Path) -> None:
    """The torch engine's code path (threads, queues, device copies) on the CPU: the same bytes
    as the numpy engine at a rank both BLAS libraries sum in order."""
    pytest.importorskip("torch")
    base, adapter = _synthetic(tmp_path, dtype="BF16", rank=4)
    outs = {}
    for engine in ("cpu", "torch-cpu"):
        outs[engine] = tmp_path / f"out-{engine}"
        # small blocks: several row blocks per tensor and a transposed (embedding-like) layout
        merge(base, [adapter], outs[engine], device=engine, block_bytes=16 << 10)
    assert (outs["cpu"] / "model.safetensors").read_bytes() == (
        outs["torch-cpu"] / "model.safetensors"
    ).read_bytes()


def test_bytes_do_not_depend_on_block_size_or_threads(tmp_path: Path) -> None:
    from lora_tools.ops.merge import NumpyEngine, execute, plan_merge

    base, adapter = _synthetic(tmp_path, dtype="F32", rank=16)
    outs = []
    for block_bytes, threads in ((16 << 10, 1), (40 << 10, 3), (64 << 20, 2)):
        out = tmp_path / f"out-{block_bytes}-{threads}"
        plan = plan_merge(base, [AdapterSpec(str(adapter))])
        with plan.base:
            execute(plan, out, engine=NumpyEngine(block_bytes, threads))
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.gpu
def test_cuda_engine_writes_the_same_bytes_as_numpy(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    for base_name, adapter_name in PEFT_CASES:
        outs = {}
        for engine in ("cpu", "cuda"):
            outs[engine] = tmp_path / f"{base_name}-{adapter_name}-{engine}"
            merge(
                FIXTURES / "bases" / base_name,
                [FIXTURES / "peft" / adapter_name],
                outs[engine],
                device=engine,
            )
        assert _raw(outs["cpu"]) == _raw(outs["cuda"]), (base_name, adapter_name)
    base, adapter = _synthetic(tmp_path, dtype="BF16", rank=4)
    a, b = tmp_path / "syn-cpu", tmp_path / "syn-cuda"
    merge(base, [adapter], a, device="cpu")
    merge(base, [adapter], b, device="cuda", block_bytes=64 << 10)
    assert _raw(a) == _raw(b)


def _synthetic(tmp_path: Path, dtype: str = "BF16", rank: int = 16) -> tuple[Path, Path]:
    """A small Llama-like base (one file) and a PEFT adapter on q_proj and embed_tokens."""
    import ml_dtypes

    rng = np.random.default_rng(7)
    np_dtype = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}[dtype]
    base = tmp_path / "base"
    base.mkdir()
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((300, 64)).astype(np_dtype),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((256, 64)).astype(np_dtype),
        "model.norm.weight": np.ones(64, np_dtype),
    }
    save_tensors(base / "model.safetensors", tensors, {"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    p = "base_model.model.model."
    save_tensors(
        adapter / "adapter_model.safetensors",
        {
            p + "layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((rank, 64)).astype(
                np.float32
            ),
            p + "layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((256, rank)).astype(
                np.float32
            ),
            p + "embed_tokens.lora_embedding_A": rng.standard_normal((rank, 300)).astype(
                np.float32
            ),
            p + "embed_tokens.lora_embedding_B": rng.standard_normal((64, rank)).astype(np.float32),
        },
        {"format": "pt"},
    )
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": ["q_proj", "embed_tokens"],
            }
        )
    )
    return base, adapter


def test_float64_reference_and_weights(tmp_path: Path) -> None:
    """Against numpy float64: W + sum_i w_i * s_i * B_i @ A_i, within float32 rounding."""
    base, adapter = _synthetic(tmp_path, dtype="F32", rank=4)
    out = tmp_path / "out"
    merge(base, [adapter, adapter], out, weights=[0.5, -0.25], device="cpu")
    with SafetensorsFile(adapter / "adapter_model.safetensors") as f:
        A = f.read("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").astype(
            np.float64
        )
        B = f.read("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight").astype(
            np.float64
        )
    with SafetensorsFile(base / "model.safetensors") as f:
        W = f.read("model.layers.0.self_attn.q_proj.weight").astype(np.float64)
    expected = W + (0.5 - 0.25) * 2.0 * (B @ A)
    got = _tensors(out)["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    assert np.max(np.abs(got - expected)) < 1e-5 * np.max(np.abs(expected))
    assert np.max(np.abs(got - W)) > 0.1


def test_weight_minus_one_undoes_a_merge(tmp_path: Path) -> None:
    base = FIXTURES / "bases" / "tiny-llama"
    merged, undone = tmp_path / "merged", tmp_path / "undone"
    merge(base, [FIXTURES / "peft" / "llama-lora"], merged, device="cpu")
    merge(merged, [FIXTURES / "peft" / "llama-lora"], undone, weights=[-1.0], device="cpu")
    a, b = _tensors(base), _tensors(undone)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(_tensors(merged)[key], a[key])
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6)


def test_sharded_output_mirrors_the_base(tmp_path: Path) -> None:
    base = FIXTURES / "bases" / "tiny-llama-sharded"
    out = tmp_path / "out"
    before = _sha(base)
    merge(base, [FIXTURES / "peft" / "llama-lora"], out, device="cpu")
    assert _sha(base) == before  # inputs untouched
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for name in shards:
        src, dst = read_header(base / name), read_header(out / name)
        assert list(dst.tensors) == [
            i.name for i in sorted(src.tensors.values(), key=lambda i: i.begin)
        ]
        assert {k: (v.dtype, v.shape) for k, v in dst.tensors.items()} == {
            k: (v.dtype, v.shape) for k, v in src.tensors.items()
        }
        assert dst.metadata == src.metadata
    index_src = json.loads((base / "model.safetensors.index.json").read_text())
    index_dst = json.loads((out / "model.safetensors.index.json").read_text())
    assert index_dst["weight_map"] == index_src["weight_map"]
    assert index_dst["metadata"]["total_size"] == sum(
        read_header(out / n).data_bytes for n in shards
    )
    for name in ("config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    prov = json.loads((out / MERGE_RECORD_NAME).read_text())
    assert prov["adapters"][0]["weight"] == 1.0
    assert (
        prov["adapters"][0]["sha256"]
        == hashlib.sha256(
            (FIXTURES / "peft" / "llama-lora" / "adapter_model.safetensors").read_bytes()
        ).hexdigest()
    )
    # the card (lora_tools.ops.card): a local base is named in the text, never as base_model,
    # which the Hub refuses unless it is a Hub id
    meta, body = split_card((out / "README.md").read_text())
    assert "base_model" not in meta and meta["library_name"] == "transformers"
    assert meta["tags"] == ["lora", "merge", "loratool"]
    assert f"`{base}` with LoRA adapters merged into its weights." in body
    assert "- `" + str(FIXTURES / "peft" / "llama-lora") + "` (weight 1, 8 modules)" in body
    assert f"sha256 are in `{MERGE_RECORD_NAME}`" in body and "loratool:begin" not in body


@pytest.mark.parametrize(
    ("name_or_path", "expected"),
    [("org/tiny-llama", "org/tiny-llama"), ("/abs/tiny-llama", None), ("org/x@main", None)],
)
def test_card_names_a_hub_base_in_its_front_matter(
    tmp_path: Path, name_or_path: str, expected: str | None
) -> None:
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "bases" / "tiny-llama", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))
    merge(base, [FIXTURES / "peft" / "llama-lora"], tmp_path / "out", device="cpu")
    meta, body = split_card((tmp_path / "out" / "README.md").read_text())
    assert meta.get("base_model") == expected
    if expected:
        assert meta["base_model_relation"] == "finetune"
        assert f"base_model:finetune:{expected}" in meta["tags"]
        assert f"[{expected}](https://huggingface.co/{expected}) with LoRA adapters" in body
    else:
        assert "base_model_relation" not in meta and "with LoRA adapters" in body


def test_dtype_option_changes_dtypes_and_total_size(tmp_path: Path) -> None:
    base = FIXTURES / "bases" / "tiny-llama-sharded"
    out = tmp_path / "out"
    merge(base, [FIXTURES / "peft" / "llama-lora"], out, dtype="bf16", device="cpu")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    src_total = json.loads((base / "model.safetensors.index.json").read_text())["metadata"][
        "total_size"
    ]
    assert index["metadata"]["total_size"] == src_total // 2
    for shard in out.glob("*.safetensors"):
        assert {t.dtype for t in read_header(shard).tensors.values()} == {"BF16"}


def test_tokenizer_files_copied_and_pickles_dropped(tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "bases" / "tiny-llama", base)
    (base / "pytorch_model.bin").write_bytes(b"pickle")
    out = tmp_path / "out"
    summary = merge(base, [FIXTURES / "peft" / "llama-lora"], out, device="cpu")
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert not (out / "pytorch_model.bin").exists()
    assert "tokenizer.json" in summary.copied_files


@pytest.mark.oracle
@pytest.mark.parametrize(
    "adapter", ["kohya/sd-lora.safetensors", "kohya/sd-locon.safetensors", "diffusers/sd-lora"]
)
def test_diffusers_fuse_lora_agrees(tmp_path: Path, adapter: str) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    base = FIXTURES / "bases" / "tiny-sd"
    out = tmp_path / "out"
    merge(base, [FIXTURES / adapter], out, device="cpu")
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.load_lora_weights(FIXTURES / adapter)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    worst = 0.0
    changed = 0
    for comp, folder in (("unet", "unet"), ("text_encoder", "text_encoder")):
        ref = getattr(pipe, comp).state_dict()
        with SafetensorsFile(next((out / folder).glob("*.safetensors"))) as f:
            for key in f.header.tensors:
                rkey = key if key in ref else key.removeprefix("text_model.")
                got = torch.from_numpy(f.read(key).astype(np.float32))
                diff = (got - ref[rkey].float()).abs().max().item()
                worst = max(worst, diff)
        with (
            SafetensorsFile(next((base / folder).glob("*.safetensors"))) as f0,
            SafetensorsFile(next((out / folder).glob("*.safetensors"))) as f1,
        ):
            changed += sum(f0.read_bytes(k) != f1.read_bytes(k) for k in f0.header.tensors)
    assert changed > 0
    # diffusers bakes kohya's alpha / r into the factors and fuses through PEFT: the values
    # agree to float32 rounding (measured max abs diff: 0 for sd-lora and diffusers sd-lora,
    # 5.96e-08 for sd-locon, whose 3x3 convs PEFT fuses through conv2d)
    print(f"max abs diff vs diffusers fuse_lora: {worst:.3g}")
    assert worst < 2e-6, worst


def test_single_file_bases_sdxl_and_flux(tmp_path: Path) -> None:
    for base, adapter in (
        ("tiny-sdxl.safetensors", "sdxl-lora"),
        ("tiny-flux.safetensors", "flux-lora"),
    ):
        out = tmp_path / f"{adapter}.safetensors"
        summary = merge(
            FIXTURES / "bases" / base,
            [FIXTURES / "kohya" / f"{adapter}.safetensors"],
            out,
            device="cpu",
        )
        assert summary.tensors["merged"] == summary.adapters[0]["counts"]["modules"] > 0
        hdr = read_header(out)
        assert json.loads(hdr.metadata["loratool_merge"])["adapters"][0]["weight"] == 1.0
        # float64 reference for every merged tensor, within one rounding of the output dtype
        from lora_tools.formats import load_adapter
        from lora_tools.io.checkpoint import open_checkpoint
        from lora_tools.resolve import resolve

        ad = load_adapter(FIXTURES / "kohya" / f"{adapter}.safetensors")
        with open_checkpoint(FIXTURES / "bases" / base) as ckpt:
            res = resolve(ad, ckpt)
            with SafetensorsFile(FIXTURES / "bases" / base) as fb, SafetensorsFile(out) as fo:
                for match in res.matches.values():
                    key = match.target.key
                    w = fb.read(key).astype(np.float64)
                    want = w + match.module.delta().reshape(w.shape)
                    got = fo.read(key).astype(np.float64)
                    ulp = np.abs(want) * 2.0 ** -(8 if "flux" in base else 11) + 1e-6
                    assert np.all(np.abs(got - want) <= ulp), key


def test_unmatched_modules(tmp_path: Path) -> None:
    base = FIXTURES / "bases" / "tiny-llama"
    with pytest.raises(ResolveError, match="0 of 8 modules"):
        merge(base, [FIXTURES / "peft" / "gpt2-lora"], tmp_path / "a", device="cpu")
    adapter = tmp_path / "partial"
    shutil.copytree(FIXTURES / "peft" / "llama-lora", adapter)
    src = adapter / "adapter_model.safetensors"
    with SafetensorsFile(src) as f:
        tensors = {
            k.replace("layers.1.self_attn.q_proj", "layers.9.self_attn.q_proj"): f.read(k)
            for k in f.header.tensors
        }
    save_tensors(src, tensors, {"format": "pt"})
    with pytest.raises(ResolveError, match="1 of 8 modules match no base weight"):
        merge(base, [adapter], tmp_path / "b", device="cpu")
    assert not (tmp_path / "b").exists()
    summary = merge(base, [adapter], tmp_path / "c", device="cpu", allow_unmatched=True)
    assert summary.adapters[0]["counts"]["modules_merged"] == 7
    assert len(summary.adapters[0]["unmatched"]) == 1


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir() if name in p.name] == []


def test_corrupt_shard_halfway_leaves_nothing(tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "bases" / "tiny-llama-sharded", base)
    last = sorted(base.glob("model-*.safetensors"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 100])  # truncated: found when the third shard opens
    for engine in ENGINES:
        with pytest.raises(FormatError):
            merge(base, [FIXTURES / "peft" / "llama-lora"], tmp_path / "out", device=engine)
        _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("engine", ENGINES)
def test_interrupt_leaves_nothing(tmp_path: Path, engine: str) -> None:
    seen = {"bytes": 0}

    def interrupt(nbytes: int, tensors: int) -> None:
        seen["bytes"] += nbytes
        if seen["bytes"] > 20_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(
            FIXTURES / "bases" / "tiny-llama-sharded",
            [FIXTURES / "peft" / "llama-lora"],
            tmp_path / "out",
            device=engine,
            progress=interrupt,
        )
    _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("engine", ENGINES)
def test_fsync_puts_every_output_file_on_the_disk_before_the_rename(
    tmp_path: Path, synced: list[Path], engine: str
) -> None:
    """Default: no fsync (the output is atomic, the disk gets it later, as after cp);
    fsync=True: every file of the output, then its folders, then the parent."""
    base, adapter = FIXTURES / "bases" / "tiny-llama-sharded", FIXTURES / "peft" / "llama-lora"
    summary = merge(base, [adapter], tmp_path / "plain", device=engine)
    assert synced == [] and summary.fsync is False

    summary = merge(base, [adapter], tmp_path / "out", device=engine, fsync=True)
    assert summary.fsync is True
    out = tmp_path / "out"
    files = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "loratool_merge.json", "model.safetensors.index.json"} <= {
        str(f) for f in files
    }
    partial = [p for p in synced if p.is_relative_to(tmp_path) and p != tmp_path]
    temp_root = Path(*partial[-1].relative_to(tmp_path).parts[:1])
    assert temp_root.name.startswith(".out.partial-")
    flushed = {p.relative_to(tmp_path / temp_root) for p in partial}
    assert files <= flushed  # every file, under its final name in the temporary folder
    assert synced[-1] == tmp_path  # the rename itself


@pytest.mark.parametrize("engine", ENGINES)
def test_a_full_disk_is_one_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    import errno
    import os
    import shutil
    from collections import namedtuple

    base, adapter = FIXTURES / "bases" / "tiny-llama-sharded", FIXTURES / "peft" / "llama-lora"
    # found before anything is written: the file system reports too little free space
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
        with pytest.raises(OutputError, match=r"not enough disk space: the merged model \(3"):
            merge(base, [adapter], tmp_path / "out", device=engine)
    _no_leftovers(tmp_path, "out")
    # found halfway: a write fails (the space went to something else meanwhile)
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd: int, data: object, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(
        "lora_tools.io.safetensors.writer._copy_chunk",
        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
    )
    with pytest.raises(OutputError, match="No space left on device") as err:
        merge(base, [adapter], tmp_path / "out", device=engine)
    assert "model-0000" in str(err.value) and err.value.hint and "free some space" in err.value.hint
    _no_leftovers(tmp_path, "out")


def test_output_checks(tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "bases" / "tiny-llama", base)
    adapter = FIXTURES / "peft" / "llama-lora"
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        merge(base, [adapter], tmp_path / "exists", device="cpu")
    merge(base, [adapter], tmp_path / "exists", device="cpu", force=True)
    assert (tmp_path / "exists" / "model.safetensors").is_file()
    with pytest.raises(OutputError, match="inside the input"):
        merge(base, [adapter], base / "merged", device="cpu")
    with pytest.raises(OutputError, match="same path"):
        merge(base, [adapter], base, device="cpu", force=True)


def test_refuses_uncomputed_types_and_bad_weights(tmp_path: Path) -> None:
    from lora_tools.errors import UnsupportedAdapterError
    from lora_tools.io.safetensors import save_tensors

    # LyCORIS' norm type (w_norm / b_norm) is detected, not computed: merge names it
    norm = tmp_path / "norm.safetensors"
    stem = "lora_unet_down_blocks_0_resnets_0_norm1"
    save_tensors(norm, {f"{stem}.{n}": np.ones(4, np.float32) for n in ("w_norm", "b_norm")})
    with pytest.raises(UnsupportedAdapterError, match="type norm"):
        merge(FIXTURES / "bases" / "tiny-sd", [norm], tmp_path / "a", device="cpu")
    with pytest.raises(UsageError, match="weight"):
        merge(
            FIXTURES / "bases" / "tiny-llama",
            [FIXTURES / "peft" / "llama-modules-to-save"],
            tmp_path / "b",
            weights=[0.5],
            device="cpu",
        )


def test_device_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_tools.ops.merge import engine as merge_mod

    assert select_engine("cpu").name == "numpy"
    with pytest.raises(UsageError):
        select_engine("tpu")
    with pytest.raises(UsageError):
        select_engine("numpy")  # cpu is the numpy engine; one spelling
    # auto decides without importing torch when no GPU device node or CUDA device is visible
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert merge_mod._cuda_possible() is False
    assert select_engine("auto").name == "numpy"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(merge_mod.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    assert merge_mod._cuda_possible() is (merge_mod.importlib.util.find_spec("torch") is not None)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        # a device node but no GPU torch can use: auto falls back, cuda is a clear error
        assert select_engine("auto").name == "numpy"
        with pytest.raises(DeviceError, match="cuda"):
            select_engine("cuda")
    assert select_engine("torch-cpu").name == "torch-cpu"
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(DeviceError, match="needs torch"):
        select_engine("cuda:0")
    assert select_engine("auto").name == "numpy"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("base", ["tiny-llama", "tiny-llama-sharded"])
def test_non_finite_factors_are_refused_and_leave_nothing(
    tmp_path: Path, engine: str, base: str
) -> None:
    """PEFT merges NaN / Inf factors silently (fixtures/manifest.json); loratool refuses.

    On the sharded base the third shard holds no target, so a second thread copies it while
    the error is found in the first: that thread stops and removes its file too.
    """
    from lora_tools.errors import AdapterError

    out = tmp_path / "out"
    with pytest.raises(AdapterError, match=r"holds 1 NaN/Inf values") as err:
        merge(FIXTURES / "bases" / base, [FIXTURES / "broken/nan-weights"], out, device=engine)
    assert err.value.kind == "non-finite"
    assert "model.layers.0.self_attn.q_proj.weight" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder
