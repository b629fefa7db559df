"""``convert --to gguf``: a LoRA adapter as the LoRA GGUF llama.cpp loads (``llama-cli --lora``,
``llama-server --lora``, Ollama's ``ADAPTER``), written with the ``gguf`` package (llama.cpp's
own writer; ``pip install 'loratool[gguf]'``).

What llama.cpp's ``convert_lora_to_gguf.py`` writes, and so what this writes for the same
adapter (tests/data/gguf/ holds the script's output for tiny adapters, and the tests compare):

- tensors ``<gguf name>.lora_a`` = A ``[r, in]`` and ``.lora_b`` = B ``[out, r]`` per module,
  where the gguf name is the base weight's (``gguf.TensorNameMap``: ``model.layers.0.self_attn.
  q_proj.weight`` -> ``blk.0.attn_q.weight``), in the file order of the adapter's tensors;
  embeddings (``lora_embedding_A`` / ``_B``) as ``token_embd.weight.lora_a`` = A transposed;
- Llama-family bases (llama, mistral): the rows of q_proj's and k_proj's B permuted as llama.cpp
  permutes the base's q / k weights for its rotary embedding (``LlamaModel.permute``: per head,
  the two rotary halves interleaved), so that ``B' @ A`` is the permuted update;
- GGML types from ``--outtype`` (f32, the script's default; f16, bf16, q8_0: a tensor whose rows
  do not split into 32-value blocks falls back to f16, as in the script);
- key-values ``general.architecture``, ``general.type = adapter``, ``adapter.type = lora``,
  the model card's ``general.*`` (``gguf.Metadata``, from the adapter folder's README.md),
  ``adapter.lora.alpha`` and ``general.quantization_version``.

llama.cpp scales every module by ``adapter.lora.alpha / r_module`` (``llama_adapter_lora_weight
::get_scale``, src/llama-adapter.h): one alpha for the file, each module's own rank. The script
writes the config's ``lora_alpha`` and nothing else, so modules whose PEFT scale is not
``lora_alpha / r`` (``alpha_pattern``, ``use_rslora``) are served at the wrong strength. Here
each such module's factor ``scale / (lora_alpha / r)`` is multiplied into its B (float64), so
llama.cpp's one alpha gives every module its exact scale; the other modules' bytes are the
script's. A ``rank_pattern`` alone needs nothing: llama.cpp reads each module's rank.

PEFT's saved copies of base layers (``<module>.base_layer.weight``, saved with embedding LoRAs)
are skipped, as the script skips them: llama.cpp serves the base's embedding, PEFT the copy.
When the base folder holds safetensors weights, each copy is compared with the base's tensor
(block by block of rows) and a copy that differs is refused; with a config.json alone nothing is
compared.

Refused, by name, because llama.cpp would reject the file or serve it wrong: DoRA
(magnitude vectors), ``lora_bias``, full tensors (``modules_to_save``), a LoRA on ``lm_head``
when the base ties it to the embeddings (its GGUF has no ``output.weight``), conv modules,
modules the architecture's tensor map does not name, and architectures outside
:data:`ARCHITECTURES`.

Example:
    >>> from lora_tools.formats import load_adapter                        # doctest: +SKIP
    >>> plan = plan_gguf(load_adapter("adapter/"), base="base-model/")     # doctest: +SKIP
    >>> write_gguf(plan, "adapter.gguf")                                   # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.adapter import CONV, EMBEDDING, Adapter, LoraModule
from lora_tools.errors import (
    AdapterError,
    UnsupportedAdapterError,
    UsageError,
)
from lora_tools.formats.gguf_arch import ARCHITECTURES, BaseConfig
from lora_tools.formats.gguf_arch import read_base_config as read_hf_base_config
from lora_tools.results import WrittenResult, adapter_inputs, input_ref

#: ``--outtype`` values (convert_lora_to_gguf.py's, less ``auto``) and the default (the script's).
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_OUTTYPE = "f32"
#: The operation's name in messages.
OPERATION = "convert --to gguf"
GGUF_HINT = "pip install 'loratool[gguf]' (llama.cpp's gguf package)"


@dataclass
class GgufTensor:
    """One tensor of the output: its gguf name, values as written and GGML type name."""

    name: str
    data: np.ndarray
    qtype: str


@dataclass
class GgufPlan:
    """Everything the GGUF file holds, computed; :func:`write_gguf` writes it.

    Attributes:
        arch: the ``general.architecture`` value (``llama``, ``qwen2``...).
        alpha: ``adapter.lora.alpha``.
        tensors: in file order.
        modules: module key -> gguf base name.
        baked: module key -> the factor multiplied into its lora_b (scale not alpha / r).
        card_dir: the folder whose README.md gives the ``general.*`` metadata, or None.
        base: the base config read.
        outtype: the ``--outtype``.
        invocation_tokens: aLoRA ``alora_invocation_tokens``, if the config has them.
    """

    arch: str
    alpha: float
    tensors: list[GgufTensor]
    modules: dict[str, str]
    baked: dict[str, float]
    card_dir: Path | None
    base: BaseConfig
    outtype: str
    invocation_tokens: list[int] | None = None
    skipped: list[str] = field(default_factory=list)


def read_base_config(adapter: Adapter, base: str | os.PathLike[str] | None) -> BaseConfig:
    """:func:`lora_tools.formats.gguf_arch.read_base_config` for this operation."""
    return read_hf_base_config(adapter, base, operation=OPERATION)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UsageError(
            f"{OPERATION} writes with llama.cpp's gguf package, which is not installed",
            hint=GGUF_HINT,
            kind="missing-extra",
        ) from None
    return gguf


def permute_rows(rows: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of a q / k weight's rows (of B, for a LoRA).

    Per head, HF stores the rotary pairs as two halves ``[x0..x(d/2-1), y0..]``; llama.cpp's
    rope wants them interleaved ``[x0, y0, x1, y1...]``. For k, the head count is the kv
    heads' (when it differs).

    Example:
        >>> permute_rows(np.arange(8).reshape(8, 1), 2, None)[:, 0].tolist()
        [0, 2, 1, 3, 4, 6, 5, 7]
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    out = rows.shape[0]
    if out % (2 * n_head):
        raise AdapterError(
            f"{out} rows do not split into {n_head} heads of rotary pairs",
            hint="give the base model the adapter was trained on",
            kind="shape-mismatch",
        )
    return (
        rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def global_alpha(adapter: Adapter) -> float:
    """The ``adapter.lora.alpha`` to write: the config's ``lora_alpha`` (what the script
    writes), else the alpha most modules share."""
    alpha = (adapter.config or {}).get("lora_alpha")
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha):
        return float(alpha)
    counts = Counter(m.effective_alpha for m in adapter.modules.values() if not m.rslora)
    if counts:
        return counts.most_common(1)[0][0]
    return float(next(iter(adapter.modules.values())).rank)


def llama_cpp_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp applies to a module (adapter scale 1): ``alpha / r``, or 1 when the
    file's alpha is 0 (``llama_adapter_lora_weight::get_scale``)."""
    return alpha / rank if alpha else 1.0


def _refuse(adapter: Adapter, message: str, kind: str, hint: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(message, path=adapter.source, hint=hint, kind=kind)


def _check_convertible(adapter: Adapter) -> list[str]:
    """Refuse what llama.cpp would reject or serve wrong; return the pass-through keys that
    are skipped as the script skips them (PEFT's saved ``base_layer`` weights)."""
    adapter.require_plain_lora(OPERATION)
    adapter.require_known_scale(OPERATION)
    for m in adapter.modules.values():
        if m.dora:
            raise _refuse(
                adapter,
                f"module {m.key!r} is DoRA (lora_magnitude_vector); llama.cpp has no DoRA",
                "unsupported-type",
                "merge it into the base with `loratool merge` and convert the merged model",
            )
        if m.bias is not None:
            raise _refuse(
                adapter,
                f"module {m.key!r} has a lora_B bias (lora_bias=True); llama.cpp's LoRA has none",
                "unsupported-type",
                "merge it into the base with `loratool merge` and convert the merged model",
            )
        if m.bias_diff is not None or m.rows is not None:
            raise _refuse(
                adapter,
                f"module {m.key!r} updates a bias or part of a fused weight; llama.cpp's LoRA "
                "updates whole weights only",
                "unsupported-type",
                "merge it into the base with `loratool merge`",
            )
        if m.kind == CONV:
            raise _refuse(
                adapter,
                f"module {m.key!r} is a conv LoRA; llama.cpp's LoRA covers linear layers",
                "unsupported-type",
                "only language-model adapters convert to GGUF",
            )
        if m.path is None or m.component is not None:
            raise _refuse(
                adapter,
                f"module {m.key!r} has no transformers module path",
                "unsupported-layout",
                "convert a PEFT adapter of a transformers language model",
            )
    skipped = []
    for key in adapter.passthrough:
        if key.endswith(".base_layer.weight"):
            skipped.append(key)  # PEFT saves the base embedding beside its LoRA; the base has it
            continue
        raise _refuse(
            adapter,
            f"tensor {key!r} is a full weight (modules_to_save or a saved layer), not a LoRA "
            "factor; llama.cpp's LoRA GGUF holds LoRA factors only",
            "full-tensor",
            "train without modules_to_save, or merge the adapter into the base with "
            "`loratool merge`",
        )
    return skipped


def _file_order(m: LoraModule) -> int:
    """Where the module's first tensor lies in its file (the script reads tensors in that
    order); modules built in memory keep their dict order."""
    offsets = [getattr(t, "info", None) for t in (m.down, m.up)]
    found = [info.begin for info in offsets if info is not None]
    return min(found) if found else 0


def _working(array: np.ndarray) -> np.ndarray:
    """The dtype the script computes in: float16 and float32 stay, the rest become float32."""
    if array.dtype in (np.float16, np.float32):
        return array
    return array.astype(np.float32)


def plan_gguf(
    adapter: Adapter,
    base: str | os.PathLike[str] | None = None,
    *,
    outtype: str = DEFAULT_OUTTYPE,
) -> GgufPlan:
    """Map every module to its llama.cpp tensors, permuted, scaled and typed as written.

    Args:
        adapter: a LoRA adapter of a transformers language model (PEFT, mlx-lm...).
        base: the base model folder (or its config.json); default: the adapter config's
            ``base_model_name_or_path`` when that is a local folder. Where the folder holding
            the config.json also holds ``*.safetensors`` weights, the adapter's saved base
            layers are compared with them (a copy that differs is refused).
        outtype: one of :data:`OUTTYPES`.
    """
    if outtype not in OUTTYPES:
        raise UsageError(f"unknown outtype {outtype!r}", hint=f"use one of {', '.join(OUTTYPES)}")
    gguf = _gguf()
    skipped = _check_convertible(adapter)
    config = read_base_config(adapter, base)
    weights = config.path.parent
    if skipped and any(weights.glob("*.safetensors")):
        from lora_tools.ops.base_copies import refuse_differing_copies

        refuse_differing_copies(adapter, weights, skipped, "llama.cpp", OPERATION)
    arch = ARCHITECTURES[config.hf_arch]
    model_arch = gguf.MODEL_ARCH[arch.gguf_arch]
    tensor_map = gguf.get_tensor_name_map(model_arch, config.n_layer)
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[outtype]
    alpha = global_alpha(adapter)
    tensors: list[GgufTensor] = []
    modules: dict[str, str] = {}
    baked: dict[str, float] = {}
    for m in sorted(adapter.modules.values(), key=_file_order):
        hf_name = f"{m.path}.weight".replace("language_model.", "")
        is_head = hf_name == "lm_head.weight"
        if is_head and (arch.head_dropped or config.tied):
            raise _refuse(
                adapter,
                f"module {m.key!r} targets lm_head, which {config.hf_arch} ties to the token "
                "embeddings: llama.cpp's GGUF of the base has no output.weight to apply it to",
                "tied-head",
                "train without lm_head in target_modules",
            )
        if m.kind == EMBEDDING and arch.embedding_trimmed:
            raise _refuse(
                adapter,
                f"module {m.key!r} is an embedding LoRA; llama.cpp's {config.hf_arch} converter "
                "trims the embedding to the tokenizer's vocabulary, which loratool does not read",
                "unsupported-layout",
                "train without embed_tokens in target_modules",
            )
        name = tensor_map.get_name(key=hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise _refuse(
                adapter,
                f"module {m.key!r}: llama.cpp's {arch.gguf_arch.lower()} tensor map has no "
                f"tensor for {hf_name!r}",
                "unmapped-module",
                "give the base model the adapter was trained on",
            )
        down, up = m.down.numpy(), m.up.numpy()
        if down.dtype != up.dtype:
            down, up = down.astype(np.float32), up.astype(np.float32)
        down, up = _working(down), _working(up)
        if arch.permute_qk and config.n_head:
            if hf_name.endswith("q_proj.weight"):
                up = permute_rows(up, config.n_head, config.n_head)
            elif hf_name.endswith("k_proj.weight"):
                up = permute_rows(up, config.n_head, config.n_head_kv)
        factor = m.scale / llama_cpp_scale(alpha, m.rank)
        if factor != 1.0:
            baked[m.key] = factor
            scaled = up.astype(np.float64) * factor
            up = scaled.astype(np.float16 if outtype == "f16" else np.float32)
        if m.kind == EMBEDDING:
            down = down.T
        for suffix, array in ((".lora_a", down), (".lora_b", up)):
            tensors.append(_typed(gguf, name + suffix, np.ascontiguousarray(array), qtype))
        modules[m.key] = name
    invocation = (adapter.config or {}).get("alora_invocation_tokens")
    if (adapter.config or {}).get("invocation_string") and not invocation:
        raise _refuse(
            adapter,
            "an aLoRA with invocation_string but no alora_invocation_tokens: the tokens need the "
            "base model's tokenizer",
            "alora-tokens",
            "set alora_invocation_tokens in adapter_config.json",
        )
    card_dir = None
    if adapter.source is not None and adapter.config_source is not None:
        card_dir = adapter.source.parent
    return GgufPlan(
        arch=gguf.MODEL_ARCH_NAMES[model_arch],
        alpha=alpha,
        tensors=tensors,
        modules=modules,
        baked=baked,
        card_dir=card_dir,
        base=config,
        outtype=outtype,
        invocation_tokens=[int(t) for t in invocation] if invocation else None,
        skipped=skipped,
    )


def _typed(gguf: Any, name: str, data: np.ndarray, qtype: Any) -> GgufTensor:
    """The tensor quantized to ``qtype``; f16 where its rows do not split into blocks (as the
    script falls back)."""
    try:
        out = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:
        qtype = gguf.GGMLQuantizationType.F16
        out = gguf.quants.quantize(data, qtype)
    return GgufTensor(name, out, qtype.name)


def write_gguf(plan: GgufPlan, out: str | os.PathLike[str]) -> Path:
    """Write ``plan`` to ``out`` atomically: key-values in the script's order, then tensors."""
    from lora_tools.io.atomic import atomic_file

    gguf = _gguf()
    writer = gguf.GGUFWriter(path=None, arch=plan.arch)
    for t in plan.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=gguf.GGMLQuantizationType[t.qtype])
    total, shared, expert, experts = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, plan.card_dir, None, total)
    if metadata.name is None:
        metadata.name = plan.base.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, experts)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    metadata.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
    if plan.invocation_tokens:
        writer.add_key_value(
            gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS,
            plan.invocation_tokens,
            gguf.GGUFValueType.ARRAY,
            gguf.GGUFValueType.UINT32,
        )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    path = Path(out)
    with atomic_file(path) as fh:
        # the writer's own file handling opens the final path; hand it the temporary file
        writer.fout = [fh]
        writer.path = path
        writer.state = gguf.gguf_writer.WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.fout = None
    return path


@dataclass(frozen=True, repr=False)
class GgufResult(WrittenResult):
    """What ``convert --to gguf`` wrote (the ``convert`` JSON document, ``to: gguf``)."""

    command = "convert"

    plan: GgufPlan | None = None
    source_format: str = ""

    def fields(self) -> dict[str, Any]:
        assert self.plan is not None
        plan = self.plan
        notes = (
            [
                f"{len(plan.baked)} modules' scales baked into lora_b (llama.cpp applies one "
                f"alpha {plan.alpha:g} / r to every module)"
            ]
            if plan.baked
            else []
        )
        return {
            "from": self.source_format,
            "to": "gguf",
            "counts": {
                "modules": len(plan.modules),
                "resolved_from_base": 0,
                "dropped": 0,
                "tensors": len(plan.tensors),
                "scales_baked": len(plan.baked),
            },
            "modules": [
                {
                    "module": key,
                    "tensor": name,
                    **({"baked": plan.baked[key]} if key in plan.baked else {}),
                }
                for key, name in plan.modules.items()
            ],
            "dropped": [],
            "notes": notes,
            "architecture": plan.arch,
            "outtype": plan.outtype,
            "alpha": plan.alpha,
        }


def convert_to_gguf(
    adapter: Adapter,
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    outtype: str = DEFAULT_OUTTYPE,
) -> GgufResult:
    """:func:`plan_gguf` then :func:`write_gguf`; the result for the CLI."""
    plan = plan_gguf(adapter, base, outtype=outtype)
    written = write_gguf(plan, out)
    inputs = (*adapter_inputs(adapter), input_ref(plan.base.path, "base"))
    return GgufResult(plan=plan, source_format=adapter.format, source_inputs=inputs).with_output(
        written
    )


__all__ = [
    "ARCHITECTURES",
    "DEFAULT_OUTTYPE",
    "OUTTYPES",
    "GgufPlan",
    "GgufResult",
    "convert_to_gguf",
    "permute_rows",
    "plan_gguf",
    "read_base_config",
    "write_gguf",
]
