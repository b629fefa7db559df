"""Logits of llama.cpp (llama-cpp-python) with a LoRA GGUF against transformers + PEFT.

Not a test (llama-cpp-python builds llama.cpp from source, which takes long on two cores): the
numbers it prints are recorded in docs/math.md section 9. Run in a venv with torch,
transformers, peft and llama-cpp-python, after converting:

    python convert_hf_to_gguf.py BASE_FOLDER --outtype f32 --outfile base.gguf   (llama.cpp's)
    loratool convert fixtures/peft/NAME --to gguf --base BASE_FOLDER -o NAME.loratool.gguf
    python convert_lora_to_gguf.py --base BASE_FOLDER --outfile NAME.script.gguf fixtures/peft/NAME

    python tests/data/gguf/compare_logits.py BASE_FOLDER base.gguf DIR NAME...

BASE_FOLDER is fixtures/bases/tiny-llama plus a tokenizer.model (convert_hf_to_gguf.py needs a
tokenizer it recognises; the token ids below are given directly, so which one does not matter).
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


def main() -> None:
    base, base_gguf, folder, *names = sys.argv[1:]
    fixtures = Path(__file__).resolve().parents[3] / "fixtures" / "peft"
    ref_base = hf_logits(Path(base), None)
    cpp_base = llama_cpp_logits(Path(base_gguf), None)
    print(f"base: max |llama.cpp - transformers| = {np.abs(cpp_base - ref_base).max():.2e}")
    for name in names:
        ref = hf_logits(Path(base), fixtures / name)
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
