"""llama.cpp's LoRA GGUF as an adapter source (read only: ``inspect`` and ``validate``).

What llama.cpp loads (``llama_adapter_lora_init``, src/llama-adapter.cpp; facts in
docs/formats.md) and so what this reads:

- key-values ``general.type = adapter``, ``adapter.type = lora``, ``general.architecture``
  (llama.cpp's name: ``llama``, ``qwen2``, ``gemma``...) and ``adapter.lora.alpha`` (FLOAT32,
  one for the whole file);
- tensors ``<base tensor>.lora_a`` and ``<base tensor>.lora_b`` per module, where the base
  tensor is the GGUF base model's (``blk.0.attn_q.weight``): ``lora_a`` is A ``[r, in]`` and
  ``lora_b`` is B ``[out, r]`` in numpy's order (GGML's ``ne`` reversed); for the token
  embedding the pair is flipped, ``lora_a`` = A transposed ``[n_vocab, r]``;
- each module's scale ``alpha / r`` with ``r`` its own rank (``lora_b``'s ``ne[0]``), or 1
  when alpha is 0 or absent (``llama_adapter_lora_weight::get_scale``, src/llama-adapter.h);
  a module here has ``alpha = None`` then, which means the same.

GGUF is a container of its own with one naming scheme, so it is chosen by the file (magic or
``.gguf`` name), never by scoring tensor names against the safetensors formats' registry.
The modules' factors hold the file's bytes as llama.cpp uses them: for Llama-family
architectures the q / k rows of B are permuted for llama.cpp's rotary embedding, so the
factors are not the PEFT adapter's and no operation computes with them (they are read, not
converted back).

Example:
    >>> from lora_tools.formats.gguf import read_gguf_adapter     # doctest: +SKIP
    >>> adapter = read_gguf_adapter("adapter.gguf")               # doctest: +SKIP
    >>> adapter.format, adapter.modules["blk.0.attn_q.weight"].scale   # doctest: +SKIP
    ('gguf', 2.0)
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_tools.adapter import EMBEDDING, LINEAR, Adapter, LoraModule
from lora_tools.errors import UnsupportedAdapterError
from lora_tools.formats.base import ParsedKey
from lora_tools.formats.mlx import TransposedTensor
from lora_tools.io.gguf import GgufFile

FORMAT_NAME = "gguf"
#: The key-values llama.cpp reads from a LoRA GGUF.
GENERAL_TYPE = "general.type"
GENERAL_ARCHITECTURE = "general.architecture"
ADAPTER_TYPE = "adapter.type"
LORA_ALPHA = "adapter.lora.alpha"
ALORA_INVOCATION_TOKENS = "adapter.alora.invocation_tokens"
#: Tensor-name suffixes of the two factors.
LORA_A = ".lora_a"
LORA_B = ".lora_b"
#: Tensors llama.cpp skips without a word (``_norm.weight``: "add support for norm vector").
NORM_SUFFIX = "_norm.weight"
#: The base tensor whose LoRA pair is flipped (``llm_build_inp_embd``).
TOKEN_EMBEDDING = "token_embd.weight"
#: Operations other than inspect and validate: the hint of their refusal.
READ_ONLY_HINT = (
    "loratool reads GGUF adapters with `loratool inspect` and `loratool validate`; convert "
    "the PEFT adapter it came from instead"
)


def parse_key(key: str) -> ParsedKey | None:
    """Module stem (the base tensor's name) and role of a LoRA GGUF tensor, or None.

    Example:
        >>> parse_key("blk.0.attn_q.weight.lora_a")
        ParsedKey(stem='blk.0.attn_q.weight', role='down', embedding=False)
        >>> parse_key("token_embd.weight.lora_b").embedding
        True
        >>> parse_key("blk.0.attn_norm.weight") is None
        True
    """
    for suffix, role in ((LORA_A, "down"), (LORA_B, "up")):
        if key.endswith(suffix) and len(key) > len(suffix):
            stem = key[: -len(suffix)]
            return ParsedKey(stem, role, stem.endswith(TOKEN_EMBEDDING))
    return None


def gguf_alpha(file: GgufFile) -> float | None:
    """The alpha llama.cpp applies: ``adapter.lora.alpha`` when it is a FLOAT32 other than 0,
    else None (llama.cpp's scale 1 for every module: ``alpha ? alpha / r : 1``)."""
    kv = file.kv.get(LORA_ALPHA)
    if kv is None or kv.type != "FLOAT32" or not isinstance(kv.value, (int, float)):
        return None
    value = float(kv.value)
    return None if value == 0 else value


def build_gguf_adapter(file: GgufFile, keys: set[str] | None = None) -> Adapter:
    """The :class:`Adapter` of an open LoRA GGUF: one module per ``lora_a`` / ``lora_b`` pair
    of matrices of one rank, the other tensors kept as pass-through.

    Args:
        file: the open file.
        keys: the tensors to build from (default: all); ``validate`` leaves out those its
            structure rules rejected.
    """
    adapter = Adapter(format=FORMAT_NAME, metadata=file.metadata, source=file.path)
    alpha = gguf_alpha(file)
    parts: dict[str, dict[str, str]] = {}
    for key in file.tensors:
        if keys is not None and key not in keys:
            continue
        parsed = parse_key(key)
        if parsed is None:
            adapter.passthrough[key] = file.tensor(key)
        else:
            parts.setdefault(parsed.stem, {})[parsed.role] = key
    for stem, roles in parts.items():
        a, b = (file.tensor(roles[r]) if r in roles else None for r in ("down", "up"))
        embedding = stem.endswith(TOKEN_EMBEDDING)
        if a is None or b is None or not _pair(a.shape, b.shape, embedding):
            # no LoRA module (validate says why): kept as tensors, never computed with
            adapter.passthrough.update((key, file.tensor(key)) for key in roles.values())
            continue
        adapter.modules[stem] = LoraModule(
            key=stem,
            down=TransposedTensor(a) if embedding else a,
            up=b,
            alpha=alpha,
            kind=EMBEDDING if embedding else LINEAR,
            path=stem.removesuffix(".weight"),
            keys={"down": roles["down"], "up": roles["up"]},
        )
    return adapter


def _pair(a: tuple[int, ...], b: tuple[int, ...], embedding: bool) -> bool:
    """Whether ``lora_a`` and ``lora_b`` shapes make a LoRA: two matrices of one rank."""
    if len(a) != 2 or len(b) != 2:
        return False
    return (a[1] if embedding else a[0]) == b[1]


def read_gguf_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read a llama.cpp LoRA GGUF (header only; the factors stay in the memory-mapped file).

    Raises:
        UsageError: the gguf package is not installed.
        FormatError: the file is no GGUF the gguf package can read.
        UnsupportedAdapterError: the file is a GGUF but no LoRA adapter (a base model, a
            control vector): ``general.type`` / ``adapter.type`` say otherwise.
    """
    file = GgufFile(path)
    general = file.kv.get(GENERAL_TYPE)
    adapter_type = file.kv.get(ADAPTER_TYPE)
    if (
        general is None
        or general.value != "adapter"
        or (adapter_type is None or adapter_type.value != "lora")
    ):
        found = f"general.type {general.value!r}" if general is not None else "no general.type"
        if adapter_type is not None:
            found += f", adapter.type {adapter_type.value!r}"
        raise UnsupportedAdapterError(
            f"a GGUF with {found}: no LoRA adapter (llama.cpp loads general.type 'adapter', "
            "adapter.type 'lora')",
            path=Path(path),
            hint="a base model GGUF is a base, not an adapter; `loratool validate` lists "
            "every problem of an adapter GGUF",
            kind="not-an-adapter",
        )
    return build_gguf_adapter(file)


__all__ = [
    "ADAPTER_TYPE",
    "ALORA_INVOCATION_TOKENS",
    "FORMAT_NAME",
    "GENERAL_ARCHITECTURE",
    "GENERAL_TYPE",
    "LORA_A",
    "LORA_ALPHA",
    "LORA_B",
    "NORM_SUFFIX",
    "READ_ONLY_HINT",
    "TOKEN_EMBEDDING",
    "build_gguf_adapter",
    "gguf_alpha",
    "parse_key",
    "read_gguf_adapter",
]
