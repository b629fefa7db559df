"""Make the tiny PEFT adapters under tests/data/gguf/ and record what llama.cpp's own
convert_lora_to_gguf.py writes for them (``facts/<case>.<outtype>.json``).

tests/ops/test_to_gguf.py checks ``loratool convert --to gguf`` against these facts: the same
tensor names, shapes, GGML types and bytes (sha256 of each tensor), and the same key-value
metadata. llama.cpp's scripts are on no package index, so the tests read the recorded facts;
this script re-records them.

Regenerate (outside the dev env: it needs torch, transformers and peft, and llama.cpp's
sources; llama-cpp-python's sdist vendors them, with gguf-py):

    python -m venv /tmp/g && /tmp/g/bin/pip install torch transformers peft safetensors gguf
    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/sd
    tar xzf /tmp/sd/llama_cpp_python-0.3.36.tar.gz -C /tmp/sd
    /tmp/g/bin/python tests/data/gguf/make_gguf_facts.py adapters   # rewrites bases/ and adapters/
    /tmp/g/bin/python tests/data/gguf/make_gguf_facts.py facts \\
        --llama-cpp /tmp/sd/llama_cpp_python-0.3.36/vendor/llama.cpp

The script is run as ``python convert_lora_to_gguf.py --base BASE --outtype T --outfile OUT
ADAPTER`` (its own vendored gguf-py, as it imports by default). Cases marked ``refused`` record
the script's exit status instead of a file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASES = HERE / "bases"
ADAPTERS = HERE / "adapters"
FACTS = HERE / "facts"

#: Tiny base configs: hidden 64, two layers, heads 4 (head_dim 16), a 128-token vocabulary.
_COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 128,
    "max_position_embeddings": 256,
}
BASE_CONFIGS = {
    "llama": ("LlamaConfig", {**_COMMON, "num_key_value_heads": 2, "tie_word_embeddings": False}),
    "llama-tied": (
        "LlamaConfig",
        {**_COMMON, "num_key_value_heads": 4, "tie_word_embeddings": True},
    ),
    "mistral": ("MistralConfig", {**_COMMON, "num_key_value_heads": 1}),
    "qwen2": ("Qwen2Config", {**_COMMON, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "gemma": ("GemmaConfig", {**_COMMON, "num_key_value_heads": 1, "head_dim": 16}),
    "qwen3": ("Qwen3Config", {**_COMMON, "num_key_value_heads": 2, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**_COMMON, "num_key_value_heads": 2, "head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", {**_COMMON, "num_key_value_heads": 1, "head_dim": 16}),
}
ARCHITECTURES = {
    "LlamaConfig": "LlamaForCausalLM",
    "MistralConfig": "MistralForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
    "GemmaConfig": "GemmaForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM",
    "Gemma2Config": "Gemma2ForCausalLM",
    "Gemma3TextConfig": "Gemma3ForCausalLM",
}
_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_ALL = [*_ATTN, "gate_proj", "up_proj", "down_proj"]

#: case -> (base, LoraConfig fields, dtype of the saved factors, outtypes, refused)
CASES: dict[str, tuple[str, dict, str, tuple[str, ...], bool]] = {
    "llama": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": [*_ALL, "lm_head"]},
        "float32",
        ("f32", "f16", "bf16", "q8_0"),
        False,
    ),
    "mistral": (
        "mistral",
        {"r": 8, "lora_alpha": 16, "target_modules": [*_ATTN, "embed_tokens"]},
        "float16",
        ("f32", "f16"),
        False,
    ),
    "qwen2": (
        "qwen2",
        {"r": 4, "lora_alpha": 4, "target_modules": _ALL},
        "bfloat16",
        ("f32", "bf16"),
        False,
    ),
    "gemma": (
        "gemma",
        {"r": 4, "lora_alpha": 16, "target_modules": _ATTN},
        "float32",
        ("f32", "q8_0"),
        False,
    ),
    # the script writes one alpha and ignores alpha_pattern / use_rslora: its tensors differ
    # from loratool's on the modules whose scale is not lora_alpha / r
    "llama-patterns": (
        "llama",
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": _ALL,
            "rank_pattern": {"q_proj": 2, "layers.1.self_attn.v_proj": 8},
            "alpha_pattern": {"k_proj": 3, "down_proj": 32},
        },
        "float32",
        ("f32",),
        False,
    ),
    "llama-rslora": (
        "llama",
        {"r": 16, "lora_alpha": 8, "target_modules": _ATTN, "use_rslora": True},
        "float32",
        ("f32",),
        False,
    ),
    # what llama.cpp does not load, by the script's exit status (the script refuses these)
    "llama-dora": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": _ATTN, "use_dora": True},
        "float32",
        ("f32",),
        True,
    ),
    "llama-modules-to-save": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": _ATTN, "modules_to_save": ["lm_head"]},
        "float32",
        ("f32",),
        True,
    ),
    "llama-lora-bias": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": _ATTN, "lora_bias": True},
        "float32",
        ("f32",),
        True,
    ),
    # converts, but llama.cpp refuses it at load: the base GGUF has no output.weight
    "llama-tied-head": (
        "llama-tied",
        {"r": 4, "lora_alpha": 8, "target_modules": ["lm_head"]},
        "float32",
        ("f32",),
        False,
    ),
    "qwen3": (
        "qwen3",
        {"r": 4, "lora_alpha": 8, "target_modules": _ALL},
        "float32",
        ("f32",),
        False,
    ),
    "gemma2": (
        "gemma2",
        {"r": 4, "lora_alpha": 8, "target_modules": _ALL},
        "float32",
        ("f32", "f16"),
        False,
    ),
    "gemma3": (
        "gemma3",
        {"r": 8, "lora_alpha": 4, "target_modules": _ALL},
        "float32",
        ("f32",),
        False,
    ),
    # an activated LoRA: the script writes its invocation tokens (adapter.alora.invocation_tokens)
    "llama-alora": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": _ATTN, "alora_invocation_tokens": [3, 5, 7]},
        "float32",
        ("f32",),
        False,
    ),
}


def make_bases() -> None:
    import transformers

    for name, (cls, fields) in BASE_CONFIGS.items():
        config = getattr(transformers, cls)(**fields, architectures=[ARCHITECTURES[cls]])
        config.save_pretrained(BASES / name)


def make_adapters() -> None:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    for index, (case, (base, fields, dtype, _outtypes, _refused)) in enumerate(CASES.items()):
        config = transformers.AutoConfig.from_pretrained(BASES / base)
        torch.manual_seed(1000 + index)
        model = transformers.AutoModelForCausalLM.from_config(config)
        peft_model = get_peft_model(model, LoraConfig(**fields))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:  # PEFT zero-initialises lora_B: give every factor values
                    param.copy_(torch.randn_like(param) * 0.2)
        peft_model.to(getattr(torch, dtype))
        out = ADAPTERS / case
        peft_model.save_pretrained(out)
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = f"bases/{base}"  # relative: the files move
        cfg["target_modules"] = sorted(cfg["target_modules"])  # a set: PEFT's order varies
        (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        card = (out / "README.md").read_text().replace(str(BASES / base), f"bases/{base}")
        (out / "README.md").write_text(card)


def gguf_facts(path: Path) -> dict:
    """Everything the tests compare: key-values in order, tensors in order with their bytes."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    kv = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        value = field.contents()
        kind = GGUFValueType(field.types[0]).name
        if field.types[0] == GGUFValueType.ARRAY:
            kind += "[" + GGUFValueType(field.types[-1]).name + "]"
        kv.append({"key": field.name, "type": kind, "value": value})
    tensors = []
    for t in reader.tensors:
        raw = bytes(t.data.tobytes())
        tensors.append(
            {
                "name": t.name,
                "ne": [int(n) for n in t.shape],
                "type": t.tensor_type.name,
                "nbytes": int(t.n_bytes),
                "sha256": hashlib.sha256(raw).hexdigest(),
            }
        )
    return {
        "kv": kv,
        "tensors": tensors,
        "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def record_facts(llama_cpp: Path, only: list[str] | None = None) -> None:
    script = llama_cpp / "convert_lora_to_gguf.py"
    commit = (
        subprocess.run(
            ["git", "-C", str(llama_cpp), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or None
    )
    FACTS.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["HF_HUB_OFFLINE"] = "1"
    for case, (base, _fields, _dtype, outtypes, refused) in CASES.items():
        if only and case not in only:
            continue
        for outtype in outtypes:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out.gguf"
                args = [
                    "--base",
                    f"bases/{base}",
                    "--outtype",
                    outtype,
                    "--outfile",
                    str(out),
                    f"adapters/{case}",
                ]
                run = subprocess.run(
                    [sys.executable, str(script), *args],
                    cwd=HERE,
                    capture_output=True,
                    text=True,
                    env=env,
                )
                record = {
                    "case": case,
                    "base": base,
                    "outtype": outtype,
                    "script": "convert_lora_to_gguf.py",
                    "llama_cpp_commit": commit,
                    "args": ["--base", f"bases/{base}", "--outtype", outtype, f"adapters/{case}"],
                    "returncode": run.returncode,
                }
                if run.returncode == 0:
                    record.update(gguf_facts(out))
                else:
                    errors = [
                        ln for ln in run.stderr.splitlines() if "ERROR" in ln or "Error" in ln
                    ]
                    record["stderr_errors"] = errors[-3:]
                if (run.returncode != 0) != refused:
                    raise SystemExit(f"{case}/{outtype}: rc {run.returncode}\n{run.stderr[-2000:]}")
            name = FACTS / f"{case}.{outtype}.json"
            name.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            print(f"{name.relative_to(HERE)}: rc {run.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("adapters", help="rewrite bases/ and adapters/ with PEFT")
    facts = sub.add_parser("facts", help="run convert_lora_to_gguf.py, write facts/")
    facts.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp checkout")
    facts.add_argument("cases", nargs="*", help="only these cases (default: all)")
    args = parser.parse_args()
    if args.what == "adapters":
        make_bases()
        make_adapters()
    else:
        record_facts(args.llama_cpp, args.cases)


if __name__ == "__main__":
    main()
