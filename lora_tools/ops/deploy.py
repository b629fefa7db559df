"""``convert --for vllm|sglang|llamacpp``: the PEFT adapter a serving engine loads and serves at
the strength the adapter was trained for.

The engines read one scale for the whole adapter from adapter_config.json and ignore (or refuse)
what PEFT reads per module:

- vLLM (vllm/lora/peft_helper.py ``PEFTHelper``): before 0.32 ``lora_alpha / r`` (``/ sqrt(r)``
  with ``use_rslora``) for every module, ``rank_pattern`` / ``alpha_pattern`` dropped with the
  other unknown fields; from 0.32 the patterns apply per module. Each module's factors are
  copied into buffers ``max_lora_rank`` wide (vllm/lora/layers/base_linear.py ``set_lora`` fills
  ``[:rank]``, the rest stays zero), so a module of any rank up to ``max_lora_rank`` loads;
  ``r`` above it is refused (``validate_legal``), as are DoRA, a non-empty ``modules_to_save``,
  ``bias`` other than ``none`` and (from 0.32) ``lora_bias``, base-changing inits, aLoRA,
  ``layer_replication``, BD-LoRA and QALoRA. ``max_lora_rank`` is one of 1, 8, 16, 32, 64, 128,
  256, 320, 512 (vllm/config/lora.py), 16 by default.
- SGLang (python/sglang/srt/lora/lora.py ``LoRAAdapter``): ``lora_alpha / r`` for every module,
  ``use_rslora`` ignored; one rank per adapter (q / k / v and gate / up are stacked along the
  rank axis), and ``target_modules`` normalized to its fused names (python/sglang/srt/lora/
  utils.py ``get_normalized_target_modules``: a string other than ``all`` / ``all-linear`` is
  refused).
- llama.cpp (convert_lora_to_gguf.py, src/llama-adapter.h ``get_scale``): one
  ``adapter.lora.alpha`` for the file, divided by each tensor's own rank; patterns and rsLoRA
  ignored; DoRA, ``modules_to_save`` and biases refused.

So the output has one rank ``R`` (the largest of the adapter: smaller modules are zero-padded,
which adds nothing to ``B @ A``), ``r = lora_alpha = R`` and no patterns or rsLoRA: every engine's
scale is exactly 1, and each module's own scale ``s`` is baked into its factors
(``B' = c_up * B``, ``A' = c_down * A`` with ``c_up * c_down = s``, ``c_down`` a power of two:
:func:`lora_tools.lowrank.split_scalar`). An adapter that already has one rank, one alpha and no
rsLoRA is served right as it is: its factors are kept byte for byte. docs/math.md ("Serving
engines") has the algebra and why scale 1 rather than the most common alpha.

What no equivalent adapter can express is refused by name (exit 3): DoRA, lora_B biases, full
tensors (modules_to_save), base-changing inits, convolutions; the hint is to merge the adapter
into its base with ``loratool merge`` and serve the merged model.

PEFT's saved copy of an embedding LoRA's base layer (``<module>.base_layer.weight``) is left out:
the engines skip it and serve the base's embedding, while PEFT loads the copy over it. With
``base`` given, each copy is compared with the base's tensor (block by block of rows) and a copy
that differs is refused (:func:`lora_tools.ops.base_copies.refuse_differing_copies`): on that
base the served adapter would not be the one PEFT loads. Without ``base`` nothing is compared.

Example:
    >>> from lora_tools.formats import load_adapter                               # doctest: +SKIP
    >>> res = convert_for(load_adapter("fixtures/peft/llama-patterns"), "vllm")   # doctest: +SKIP
    >>> res.rank, {m.scale for m in res.adapter.modules.values()}                 # doctest: +SKIP
    (6, {1.0})
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_tools.adapter import CONV, Adapter, LoraModule
from lora_tools.constants import ZERO_MODULES_KEY
from lora_tools.errors import UnsupportedAdapterError, UsageError
from lora_tools.lowrank import split_scalar
from lora_tools.ops._algebra import add_history, exact_targets, targets_cover, with_factors
from lora_tools.results import WrittenResult, adapter_inputs, input_ref

TARGETS = ("vllm", "sglang", "llamacpp")
#: vLLM's ``MaxLoRARanks`` (vllm/config/lora.py) and its default.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
#: SGLang's normalized names (python/sglang/srt/lora/utils.py ``get_normalized_target_modules``
#: params_mapping) and the ones its memory pool handles (``_KNOWN_LORA_TARGET_MODULES``).
SGLANG_NORMALIZED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "vocab_emb": "embed_tokens",
    "embeddings": "embed_tokens",
    "word_embeddings": "embed_tokens",
    "output": "lm_head",
    "unembed_tokens": "lm_head",
    "q_a_proj": "fused_qkv_a_proj_with_mqa",
    "kv_a_proj_with_mqa": "fused_qkv_a_proj_with_mqa",
    "in_proj_qkv": "in_proj_qkvz",
    "in_proj_q": "in_proj_qkvz",
    "in_proj_k": "in_proj_qkvz",
    "in_proj_v": "in_proj_qkvz",
    "in_proj_z": "in_proj_qkvz",
}
SGLANG_KNOWN = frozenset(
    {
        "qkv_proj",
        "qkvr",
        "o_proj",
        "wo_ud",
        "out_proj",
        "in_proj",
        "in_proj_qkvz",
        "up_proj",
        "gate_up_proj",
        "down_proj",
        "fc1_latent_proj",
        "fc2_latent_proj",
        "embed_tokens",
        "lm_head",
        "fused_qkv_a_proj_with_mqa",
        "q_b_proj",
        "kv_b_proj",
    }
)
#: PEFT inits whose adapter belongs to a base they also changed (served on the original base,
#: it is a different model).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_NAMES = {"vllm": "vLLM", "sglang": "SGLang", "llamacpp": "llama.cpp"}
_MERGE_HINT = (
    "merge the adapter into its base with `loratool merge BASE ADAPTER -o OUT` and serve the "
    "merged model"
)


@dataclass(frozen=True)
class ServedModule:
    """One module of the output: its rank before and after, and the scale baked into it.

    Attributes:
        module: the module path.
        rank: its rank in the output (the adapter's one rank).
        source_rank: its rank in the input.
        scale: its scale in the input (``alpha / r`` or ``alpha / sqrt(r)``), now in its factors.
        rescaled: its factors were multiplied by ``scale`` (False: kept byte for byte).
        added: a zero module SGLang needs to stack its neighbours (``source_rank`` 0).
    """

    module: str
    rank: int
    source_rank: int
    scale: float
    rescaled: bool
    added: bool = False

    @property
    def padded(self) -> bool:
        return not self.added and self.rank != self.source_rank

    def as_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "rank": self.rank,
            "source_rank": self.source_rank,
            "scale": self.scale,
            "rescaled": self.rescaled,
            "padded": self.padded,
            "added": self.added,
        }


@dataclass(frozen=True, repr=False)
class ServeResult(WrittenResult):
    """The adapter for ``target`` and what the conversion did.

    Attributes:
        adapter: the PEFT adapter to write (``save_adapter``).
        target: ``vllm``, ``sglang`` or ``llamacpp``.
        source_format: the input's format.
        rank: the output's one rank (``r`` and ``lora_alpha`` in its config).
        modules: one :class:`ServedModule` per module.
        server: settings the engine needs to load it (``{"max_lora_rank": N}``), if any.
        notes: what the user should know (rescaled / padded modules, server settings).
    """

    command = "convert"

    adapter: Adapter
    target: str = "vllm"
    source_format: str = ""
    rank: int = 0
    modules: tuple[ServedModule, ...] = ()
    server: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def rescaled(self) -> int:
        return sum(m.rescaled for m in self.modules)

    @property
    def padded(self) -> int:
        return sum(m.padded for m in self.modules)

    def fields(self) -> dict[str, Any]:
        return {
            "from": self.source_format,
            "to": "peft",
            "for": self.target,
            "rank": self.rank,
            "server": dict(self.server),
            "counts": {
                "modules": len(self.modules),
                "resolved_from_base": 0,
                "dropped": 0,
                "rescaled": self.rescaled,
                "padded": self.padded,
            },
            "modules": [m.as_dict() for m in self.modules],
            "dropped": [],
            "notes": list(self.notes),
        }


def check_max_lora_rank(target: str, max_lora_rank: int | None) -> None:
    """UsageError for a ``--max-lora-rank`` the target's server cannot be started with."""
    if max_lora_rank is None:
        return
    if target == "llamacpp":
        raise UsageError(
            "--max-lora-rank is a vLLM / SGLang server setting; llama.cpp has none",
            hint="leave it out for --for llamacpp",
        )
    if target == "vllm" and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise UsageError(
            f"--max-lora-rank must be one of vLLM's sizes "
            f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}, not {max_lora_rank}"
        )
    if max_lora_rank < 1:
        raise UsageError(f"--max-lora-rank must be an integer >= 1, not {max_lora_rank}")


def convert_for(
    adapter: Adapter,
    target: str,
    *,
    base: str | os.PathLike[str] | None = None,
    component: str | None = None,
    max_lora_rank: int | None = None,
) -> ServeResult:
    """The PEFT adapter ``target`` serves at each module's own strength.

    Args:
        adapter: the adapter, in any naming loratool converts to PEFT (not modified).
        target: ``vllm``, ``sglang`` or ``llamacpp``.
        base: base checkpoint: needed for kohya names (module paths) and checks every module
            fits it, as ``convert --to peft``; the base embeddings PEFT saved in the adapter
            (left out of the output) are compared with it, and refused where they differ.
        component: the pipeline component to keep, as ``convert --to peft``.
        max_lora_rank: the server's ``--max-lora-rank`` (vLLM: one of
            :data:`VLLM_MAX_LORA_RANKS`); a larger rank is refused.

    Returns:
        A :class:`ServeResult`.

    Raises:
        UsageError: unknown target, bad ``max_lora_rank``; what ``convert --to peft`` raises.
        UnsupportedAdapterError: a feature the target cannot serve (named), a rank above
            ``max_lora_rank`` (or vLLM's largest), a module SGLang has no LoRA layer for, a
            saved base embedding that differs from ``base``'s (the engines serve the base's).
    """
    if target not in TARGETS:
        raise UsageError(f"--for must be one of {', '.join(TARGETS)}, not {target!r}")
    check_max_lora_rank(target, max_lora_rank)
    name = _NAMES[target]
    adapter.require_plain_lora(f"convert --for {target}")
    _refuse_features(adapter, name)
    if base is not None:
        from lora_tools.ops.base_copies import refuse_differing_copies

        copies = [k for k in adapter.passthrough if _base_copy(adapter, k)]
        refuse_differing_copies(adapter, base, copies, name, f"convert --for {target}")
    source = adapter
    inputs = adapter_inputs(adapter)
    if adapter.format != "peft" or base is not None or component is not None:
        from lora_tools.ops.convert import convert_adapter

        adapter = convert_adapter(adapter, "peft", base=base, component=component).adapter
        if base is not None:
            inputs += (input_ref(base, "base"),)
    adapter.require_known_scale(f"convert --for {target}")
    adapter.require_usable_scales()
    modules = list(adapter.modules.values())
    if not modules:
        raise UsageError(
            "the adapter holds no LoRA module", path=source.source, hint="give a LoRA adapter"
        )
    if target == "sglang":
        _check_sglang_modules(source, modules)
    rank = max(m.rank for m in modules)
    added = _sglang_stack_parts(source, modules, rank, base) if target == "sglang" else {}
    server = _check_rank(source, target, rank, max_lora_rank)

    uniform = (
        not added
        and len({m.rank for m in modules}) == 1
        and len({m.effective_alpha for m in modules}) == 1
        and not any(m.rslora for m in modules)
    )
    out_modules: dict[str, LoraModule] = {}
    rows: list[ServedModule] = []
    for key, m in adapter.modules.items():
        if uniform:
            out_modules[key] = dataclasses.replace(m, alpha=m.effective_alpha)
            rows.append(ServedModule(_path(m), m.rank, m.rank, m.scale, False))
            continue
        out_modules[key] = _served(m, rank)
        rows.append(ServedModule(_path(m), rank, m.rank, m.scale, True))
    for key, m in added.items():
        out_modules[key] = m
        rows.append(ServedModule(_path(m), rank, 0, 0.0, False, added=True))

    config = _config(adapter, list(out_modules.values()), None if uniform else rank)
    out = Adapter(
        format="peft",
        modules=out_modules,
        passthrough={},
        foreign={},
        metadata=_metadata(adapter.metadata, added),
        config=config,
        source=adapter.source,
        config_source=adapter.config_source,
    )
    add_history(
        out,
        "convert",
        source_format=source.format,
        to="peft",
        target=target,
        base=os.fspath(base) if base is not None else None,
        max_lora_rank=max_lora_rank,
    )
    result = ServeResult(
        out,
        target,
        source.format,
        rank,
        tuple(rows),
        server,
        source_inputs=inputs,
    )
    return dataclasses.replace(result, notes=_notes(result, source))


def _path(m: LoraModule) -> str:
    return m.path or m.key


def _metadata(metadata: dict[str, str], added: dict[str, LoraModule]) -> dict[str, str]:
    """The output's metadata: ``format: pt``, and the added zero modules listed under
    :data:`ZERO_MODULES_KEY` (with any an earlier conversion listed), so that validate's
    zero-factor rule knows they are zero on purpose."""
    out = {**metadata, "format": "pt"}
    if added:
        earlier = out.get(ZERO_MODULES_KEY)
        keys = set(added)
        with contextlib.suppress(TypeError, ValueError):
            keys |= {k for k in json.loads(earlier) if isinstance(k, str)} if earlier else set()
        out[ZERO_MODULES_KEY] = json.dumps(sorted(keys))
    return out


def _refuse(adapter: Adapter, message: str, hint: str = _MERGE_HINT) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(
        message, path=adapter.config_source or adapter.source, hint=hint, kind="unsupported-type"
    )


def _refuse_features(adapter: Adapter, name: str) -> None:
    """Refuse what no adapter the target serves can express."""
    config = adapter.config or {}
    for m in adapter.modules.values():
        if m.dora:
            raise _refuse(
                adapter,
                f"module {m.key!r} is DoRA; {name} does not serve DoRA adapters (its magnitude "
                "renormalises W + dW, which no plain LoRA reproduces)",
            )
        if m.bias is not None:
            raise _refuse(
                adapter, f"module {m.key!r} has a lora_B bias, which {name} does not load"
            )
        if m.bias_diff is not None or m.rows is not None:
            what = "a bias difference (.diff_b)" if m.bias_diff is not None else "a row range"
            raise _refuse(adapter, f"module {m.key!r} has {what}, which PEFT files cannot hold")
        if m.kind == CONV:
            raise _refuse(
                adapter,
                f"module {m.key!r} is a convolution; {name} serves language models' linear and "
                "embedding layers only",
                hint="keep image-model adapters in their own format",
            )
    full = [k for k in adapter.passthrough if not _base_copy(adapter, k)]
    if full:
        key = full[0]
        raise _refuse(
            adapter,
            f"holds {len(full)} full tensors (modules_to_save or saved layers, "
            f"e.g. {key!r}), which {name} does not load: they replace base weights, no LoRA "
            "update expresses them",
        )
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise _refuse(adapter, f"bias is {bias!r} (trained base biases); {name} loads none")
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise _refuse(
            adapter,
            f"adapter was initialised with {config['init_lora_weights']!r}, which also changed "
            f"the base weights; {name} would serve it on the original base",
            hint="convert it to a plain LoRA with PEFT first (save_pretrained with "
            "path_initial_model_for_weight_conversion)",
        )
    for field_name in ("layer_replication", "alora_invocation_tokens", "use_bdlora", "use_qalora"):
        if config.get(field_name):
            raise _refuse(adapter, f"adapter uses {field_name}, which {name} does not serve")


def _base_copy(adapter: Adapter, key: str) -> bool:
    """``key`` is the copy of a LoRA module's own base weight PEFT saves with embedding LoRAs
    (``<module>.base_layer.weight``): the engines skip it (vLLM ``is_base_embedding_weights``,
    llama.cpp's converter), and the output leaves it out."""
    stem = key.removesuffix(".base_layer.weight")
    return stem != key and stem in adapter.modules


def _check_sglang_modules(adapter: Adapter, modules: list[LoraModule]) -> None:
    for m in modules:
        leaf = m.target_name.split(".")[-1]
        normalized = SGLANG_NORMALIZED.get(leaf, leaf)
        if normalized not in SGLANG_KNOWN:
            raise UnsupportedAdapterError(
                f"module {_path(m)!r}: SGLang has no LoRA layer for {leaf!r} (its LoRA layers: "
                f"{', '.join(sorted(SGLANG_KNOWN))}, after mapping q/k/v_proj to qkv_proj and "
                "gate/up_proj to gate_up_proj)",
                path=adapter.source,
                hint=_MERGE_HINT,
                kind="unsupported-type",
            )


#: SGLang stacks these layers' factors into one fused layer, starting from the first name
#: (python/sglang/srt/lora/lora.py ``normalize_qkv_proj``, ``normalize_gate_up_proj``): the
#: parts it needs present (k_proj / up_proj it fills with zeros itself).
_SGLANG_STACKS = (
    (("q_proj", "k_proj", "v_proj"), ("q_proj", "v_proj")),
    (("gate_proj", "up_proj"), ("gate_proj",)),
)


def _sglang_stack_parts(
    adapter: Adapter,
    modules: list[LoraModule],
    rank: int,
    base: str | os.PathLike[str] | None,
) -> dict[str, LoraModule]:
    """Zero modules (rank ``rank``, shapes from ``base``) for the parts of a fused layer SGLang
    needs and the adapter lacks: a layer with v_proj but no q_proj LoRA is skipped (its
    weights match no fused name), one with q_proj but no v_proj fails to load. Zero factors
    add nothing to the update. Without ``base`` the shapes are unknown: refused."""
    from lora_tools.adapter import LINEAR
    from lora_tools.io.safetensors import ArrayTensor
    from lora_tools.naming import PEFT_PREFIX

    present = {m.path for m in modules if m.path}
    like = modules[0]
    missing: dict[str, str] = {}  # missing module path -> a module beside it
    for m in modules:
        if not m.path:
            continue
        parent, _, leaf = m.path.rpartition(".")
        for parts, needed in _SGLANG_STACKS:
            if leaf in parts:
                for name in needed:
                    if f"{parent}.{name}" not in present:
                        missing.setdefault(f"{parent}.{name}", m.path)
    if not missing:
        return {}
    if base is None:
        path, beside = next(iter(missing.items()))
        raise UnsupportedAdapterError(
            f"module {beside!r} has no {path.rpartition('.')[2]!r} LoRA beside it "
            f"({len(missing)} such parts missing); SGLang stacks q/k/v_proj and gate/up_proj "
            "starting from q_proj / gate_proj and skips or fails on such a layer",
            path=adapter.source,
            hint="pass --base with the base checkpoint: zero modules of the right shapes are "
            "added (they change nothing)",
            kind="unsupported-layout",
        )
    from lora_tools.io.checkpoint import open_checkpoint

    out: dict[str, LoraModule] = {}
    with open_checkpoint(base) as ckpt:
        weights = next(iter(ckpt.components.values()))
        for path in missing:
            key = f"{path}.weight"
            if key not in weights:
                raise UnsupportedAdapterError(
                    f"SGLang needs a {path.rpartition('.')[2]!r} LoRA beside the adapter's "
                    f"modules, and the base has no weight {key!r} to shape it",
                    path=base,
                    hint="give the base checkpoint the adapter was trained on",
                    kind="unsupported-layout",
                )
            n_out, n_in = weights.info(key).shape[:2]
            down = ArrayTensor(np.zeros((rank, n_in), like.down.numpy().dtype), like.down.dtype)
            up = ArrayTensor(np.zeros((n_out, rank), like.up.numpy().dtype), like.up.dtype)
            out[PEFT_PREFIX + path] = LoraModule(
                key=PEFT_PREFIX + path, down=down, up=up, alpha=float(rank), kind=LINEAR, path=path
            )
    return out


def _check_rank(
    adapter: Adapter, target: str, rank: int, max_lora_rank: int | None
) -> dict[str, Any]:
    """The server settings the output needs; UnsupportedAdapterError when none serves it."""
    if target == "llamacpp":
        return {}
    name = _NAMES[target]
    limit = max_lora_rank
    if limit is None and target == "vllm" and rank > VLLM_MAX_LORA_RANKS[-1]:
        limit = VLLM_MAX_LORA_RANKS[-1]
    if limit is not None and rank > limit:
        what = "--max-lora-rank" if max_lora_rank is not None else "vLLM's largest max_lora_rank"
        raise UnsupportedAdapterError(
            f"the adapter's rank is {rank}, above {what} {limit}; {name} refuses it",
            path=adapter.config_source or adapter.source,
            hint=f"make a rank-{limit} adapter first (`loratool resize ADAPTER --rank {limit} "
            "-o OUT`)"
            + (", or start the server with a larger --max-lora-rank" if max_lora_rank else ""),
            kind="rank-too-large",
        )
    if target == "vllm":
        return {"max_lora_rank": next(n for n in VLLM_MAX_LORA_RANKS if n >= rank)}
    return {"max_lora_rank": rank}


def _served(m: LoraModule, rank: int) -> LoraModule:
    """``m`` at scale 1 and rank ``rank``: factors times its scale (split by
    :func:`split_scalar`), zero-padded to ``rank``; ``alpha = rank``, no rsLoRA."""
    up, down = m.finite_factors(consequence="the served adapter would be NaN")
    c_up, c_down = split_scalar(m.scale)
    up_p = np.zeros((up.shape[0], rank), dtype=np.float64)
    down_p = np.zeros((rank, down.shape[1]), dtype=np.float64)
    up_p[:, : m.rank] = up * c_up
    down_p[: m.rank] = down * c_down
    return with_factors(m, up_p, down_p, alpha=float(rank), rslora=False)


def _config(adapter: Adapter, modules: list[LoraModule], rank: int | None) -> dict[str, Any]:
    """The source config with one rank and alpha (``rank``; None: the modules' own), no
    patterns, rsLoRA, DoRA, lora bias or modules_to_save, and ``target_modules`` a list."""
    config = dict(adapter.config or {})
    r = rank if rank is not None else modules[0].rank
    alpha = float(rank) if rank is not None else modules[0].effective_alpha
    config.update(
        peft_type="LORA",
        r=r,
        lora_alpha=int(alpha) if alpha.is_integer() else alpha,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        use_dora=False,
        lora_bias=False,
        modules_to_save=None,
        bias="none",
    )
    if config.get("init_lora_weights") not in (True, False, None):
        # how the factors were initialised for training (not a base-changing one: refused
        # above); vLLM 0.32+ refuses names it does not know
        config["init_lora_weights"] = True
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not all(
        targets_cover(targets, m.path or m.key) for m in modules
    ):
        config.update(exact_targets(modules))
    return config


def _notes(result: ServeResult, source: Adapter) -> tuple[str, ...]:
    notes: list[str] = []
    name = _NAMES[result.target]
    if result.rescaled:
        scales = Counter(m.scale for m in result.modules)
        notes.append(
            f"{result.rescaled} modules carry their own scale in their factors (distinct "
            f"scales in the input: {len(scales)}); r = lora_alpha = {result.rank}, so {name} "
            "applies scale 1 to every module"
        )
    if result.padded:
        ranks = sorted({m.source_rank for m in result.modules if m.padded})
        notes.append(
            f"{result.padded} modules zero-padded from rank {', '.join(map(str, ranks))} to "
            f"{result.rank} (adds nothing to B @ A)"
        )
    zeros = [m.module for m in result.modules if m.added]
    if zeros:
        notes.append(
            f"{len(zeros)} zero modules added (e.g. {zeros[0]!r}): SGLang stacks q/k/v_proj and "
            "gate/up_proj from q_proj / gate_proj"
        )
    config = source.config or {}
    dropped = [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("use_rslora"):
        dropped.append("use_rslora")
    if dropped:
        notes.append(f"{', '.join(dropped)} removed: their scales are in the factors")
    copies = [k for k in source.passthrough if _base_copy(source, k)]
    if copies:
        notes.append(
            f"{len(copies)} copies of base embedding weights left out (e.g. {copies[0]!r}): "
            f"{name} does not read them"
        )
    max_rank = result.server.get("max_lora_rank")
    if result.target == "vllm" and max_rank and max_rank > VLLM_DEFAULT_MAX_LORA_RANK:
        notes.append(
            f"rank {result.rank} is above vLLM's default max_lora_rank "
            f"{VLLM_DEFAULT_MAX_LORA_RANK}: start vLLM with --max-lora-rank {max_rank}"
        )
    if result.target == "sglang":
        notes.append(
            f"SGLang sizes its LoRA buffers from the adapters given at start: an adapter loaded "
            f"later needs --max-lora-rank >= {result.rank}"
        )
    if result.target == "llamacpp":
        notes.append(
            "make the GGUF with llama.cpp's convert_lora_to_gguf.py OUT --base BASE, or "
            "`loratool convert OUT --to gguf -o adapter.gguf`"
        )
    return tuple(notes)


__all__ = [
    "TARGETS",
    "VLLM_MAX_LORA_RANKS",
    "ServeResult",
    "ServedModule",
    "check_max_lora_rank",
    "convert_for",
]
