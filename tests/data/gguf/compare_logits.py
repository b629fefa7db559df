"""Logits of llama.cpp (llama-cpp-python) with a LoRA GGUF against transformers + PEFT.

Not a test (llama-cpp-python builds llama.cpp from source, which takes long on two cores): the
numbers it prints are recorded in docs/math.md section 12. llama-cpp-python 0.3.36's sdist
vendors llama.cpp with convert_hf_to_gguf.py, convert_lora_to_gguf.py and gguf-py (L below is
its vendor/llama.cpp). Build it CPU-only into a folder of its own, next to a venv with torch,
transformers, peft and tokenizers:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
        pip install --no-deps --target LCP llama_cpp_python-0.3.36.tar.gz
    pip install --no-deps --target LCP diskcache   (llama_cpp imports it)

convert_hf_to_gguf.py needs a tokenizer it recognises (tiny-llama's is a WordLevel one): the
``tokenizer`` step copies fixtures/bases/tiny-llama to BASE and gives the copy a 128-token
Llama-style BPE tokenizer (byte fallback); the token ids below are given directly, so which
tokenizer does not matter. Its Llama set_vocab imports sentencepiece before it looks for a
tokenizer.model, so without sentencepiece put a stub ``sentencepiece`` package on PYTHONPATH
(STUB/sentencepiece/__init__.py holding ``class SentencePieceProcessor: pass``; never
called, as BASE has no tokenizer.model). Then, for each adapter NAME in
fixtures/peft:

    python tests/data/gguf/compare_logits.py tokenizer BASE
    PYTHONPATH=STUB python L/convert_hf_to_gguf.py BASE --outtype f32 --outfile DIR/base.gguf
    loratool convert fixtures/peft/NAME --to gguf --base BASE -o DIR/NAME.loratool.gguf
    PYTHONPATH=STUB python L/convert_lora_to_gguf.py --base BASE --outtype f32 \
        --outfile DIR/NAME.script.gguf fixtures/peft/NAME

    PYTHONPATH=LCP python tests/data/gguf/compare_logits.py BASE DIR/base.gguf DIR NAME...

NAME is a fixtures/peft adapter or a path to an adapter folder (tests/data/gguf/adapters/mistral);
``tokenizer BASE SOURCE`` copies the base folder SOURCE instead of tiny-llama, e.g. SOURCE
made by ``random-base SOURCE tests/data/gguf/bases/mistral tests/data/gguf/adapters/mistral``.
An adapter that targets embed_tokens carries PEFT's ``base_layer.weight``, which PEFT loads
over the base's embedding and the GGUF drops: give it a base with that same embedding.

For each adapter, both GGUFs are run on the same token ids and their last-layer logits compared
with PeftModel's (float32): max |difference|, and the adapter's effect ``|logits - base|``
relative to PEFT's (1.0 is the right strength).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TOKENS = [1, 5, 17, 42, 9, 77, 3, 64, 23, 11, 99, 50]


def llama_cpp_logits(base_gguf: Path, lora: Path | None) -> np.ndarray:
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    llm = Llama(
        model_path=str(base_gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=1, **kwargs
    )
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)], dtype=np.float64)


def hf_logits(base: Path, adapter: Path | None) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double().numpy()


def write_tokenizer(dest: Path, source: Path) -> None:
    """Copy the base ``source`` to ``dest`` with a tokenizer convert_hf_to_gguf.py reads
    (LlamaHfVocab): Llama-style BPE with byte fallback, as many tokens as the config's vocab."""
    import json
    import shutil
    import string

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    specials = ["<unk>", "<s>", "</s>"]
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    pieces = [*specials, "\u2581", *chars]
    pieces += [f"\u2581{c}" for c in chars[: config["vocab_size"] - len(pieces)]]
    pieces = pieces[: config["vocab_size"]]
    merges = [("\u2581", p[1:]) for p in pieces if len(p) == 2 and p[0] == "\u2581"]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(dest / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "model_max_length": config["max_position_embeddings"],
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def write_random_base(dest: Path, config_folder: Path, adapter: Path) -> None:
    """A float32 base from ``config_folder``'s config.json, random (seed 0) but for the embedding
    the adapter saved, if it saved one (PEFT loads it over the base's)."""
    import torch
    import transformers
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(config_folder)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    saved = load_file(adapter / "adapter_model.safetensors")
    embedding = saved.get("base_model.model.model.embed_tokens.base_layer.weight")
    if embedding is not None:
        model.get_input_embeddings().weight.data.copy_(embedding)
    model.save_pretrained(dest)


def main() -> None:
    if sys.argv[1] == "tokenizer":
        default = Path(__file__).resolve().parents[3] / "fixtures" / "bases" / "tiny-llama"
        write_tokenizer(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else default)
        return
    if sys.argv[1] == "random-base":
        write_random_base(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        return
    base, base_gguf, folder, *names = sys.argv[1:]
    fixtures = Path(__file__).resolve().parents[3] / "fixtures" / "peft"
    ref_base = hf_logits(Path(base), None)
    cpp_base = llama_cpp_logits(Path(base_gguf), None)
    print(f"base: max |llama.cpp - transformers| = {np.abs(cpp_base - ref_base).max():.2e}")
    for name in names:
        adapter = fixtures / name if "/" not in name else Path(name)
        name = adapter.name
        ref = hf_logits(Path(base), adapter)
        effect = np.linalg.norm(ref - ref_base)
        for tool in ("loratool", "script"):
            got = llama_cpp_logits(Path(base_gguf), Path(folder) / f"{name}.{tool}.gguf")
            strength = np.linalg.norm(got - cpp_base) / effect
            print(
                f"{name:18s} {tool:8s}: max |llama.cpp - PEFT| = {np.abs(got - ref).max():.2e}, "
                f"adapter effect {strength:.3f} of PEFT's"
            )


if __name__ == "__main__":
    main()
