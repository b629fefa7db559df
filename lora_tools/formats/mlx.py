"""MLX-LM adapters (``adapters.safetensors`` + ``adapter_config.json``, as ``mlx_lm.lora`` writes).

Keys are the model's module paths plus a leaf: ``<path>.lora_a`` ``[in, r]``, ``<path>.lora_b``
``[r, out]`` and, for DoRA (``fine_tune_type: "dora"``), ``<path>.m`` ``[out]``. mlx-lm's
``LoRALinear.fuse`` adds ``scale * (lora_b.T @ lora_a.T)`` (``[out, in]``) to the weight; one
``scale`` and one ``rank`` for the whole adapter live in the config's ``lora_parameters``
(``{rank, scale, dropout, keys}``), beside ``fine_tune_type`` (``lora`` / ``dora`` / ``full``)
and ``num_layers`` (LoRA on the last ``num_layers`` blocks; ``-1``: all of them).

In memory a module is PEFT's: ``up`` (B, ``[out, r]``) is ``lora_b`` transposed and ``down``
(A, ``[r, in]``) is ``lora_a`` transposed, both as :class:`TransposedTensor` views of the file's
tensors (nothing large is copied), and ``alpha = scale * r`` (so ``alpha / r`` is the scale).
Embeddings (``LoRAEmbedding``: ``lora_a [num_embeddings, r]``, ``lora_b [r, dims]``, update
``scale * lora_a @ lora_b``) take the same two transposes into PEFT's ``lora_embedding_A`` /
``_B``; which modules are embeddings the file does not say, so it is read from the module name
(:data:`EMBEDDING_NAMES`). Mixture-of-experts modules (``LoRASwitchLinear``, 3-D factors) and DoRA
embeddings (mlx normalises per embedding row, PEFT per dimension) are detected, not computed with.

Example:
    >>> from lora_tools.formats.mlx import MlxFormat
    >>> MlxFormat().parse_key("model.layers.0.self_attn.q_proj.lora_a")
    ParsedKey(stem='model.layers.0.self_attn.q_proj', role='down', embedding=False)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.adapter import EMBEDDING, LINEAR, Adapter, LoraModule
from lora_tools.constants import ADAPTER_CONFIG_NAME, MLX_WEIGHTS_NAME
from lora_tools.errors import AdapterError, FormatError, UnsupportedAdapterError, UsageError
from lora_tools.formats.base import (
    AdapterFormat,
    AdapterSource,
    ParsedKey,
    complete_modules,
    ensure,
    note_foreign,
)
from lora_tools.io.atomic import atomic_dir
from lora_tools.io.safetensors import Tensor, save_tensors
from lora_tools.naming import config_number

#: Last path parts of the embedding layers of the models mlx-lm ports (Llama, Qwen, Mistral,
#: Gemma: ``embed_tokens``; GPT-2 / Phi: ``wte``; GPT-NeoX: ``embed_in``...).
EMBEDDING_NAMES = frozenset(
    {"embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "embedding"}
)
#: mlx-lm's adapter leaves (tuner/utils.py ``load_adapters``: ``lora_a``, ``lora_b``, ``m``).
_ROLES = {"lora_a": "down", "lora_b": "up", "m": "magnitude"}
_ROLE_RE = re.compile(r"^(?P<stem>.+)\.(?P<role>lora_a|lora_b|m)$")
#: Adapter types of mlx-lm files that loratool detects but does not compute with.
SWITCH_KIND = "MLX SwitchLinear LoRA"
DORA_EMBEDDING_KIND = "MLX DoRA embedding"
#: The block list mlx-lm's ``keys`` are relative to (``model.layers.<i>.<key>``).
_BLOCK_RE = re.compile(r"^(?P<blocks>(?:.+\.)?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")


class TransposedTensor(Tensor):
    """A 2-D tensor read as the transpose of another one: a view, never a copy of its data.

    ``numpy()`` is the inner array's ``.T``; only :meth:`tobytes` (writing it in row-major
    order) materialises the transpose. :func:`transposed` undoes it without any copy.

    Example:
        >>> from lora_tools.io.safetensors import ArrayTensor
        >>> t = TransposedTensor(ArrayTensor(np.arange(6, dtype=np.float32).reshape(2, 3)))
        >>> t.shape, t.numpy()[2].tolist()
        ((3, 2), [2.0, 5.0])
    """

    def __init__(self, inner: Tensor) -> None:
        if len(inner.shape) != 2:
            raise ValueError(f"only 2-D tensors transpose here, not {list(inner.shape)}")
        self.inner = inner
        self.dtype = inner.dtype
        self.shape = (inner.shape[1], inner.shape[0])
        # the file the data lives in, for messages that name it (LoraModule reads .file)
        self.file = getattr(inner, "file", None)

    def numpy(self) -> np.ndarray:
        return self.inner.numpy().T

    def tobytes(self) -> bytes:
        array = np.ascontiguousarray(self.numpy())
        return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()

    def iter_bytes(self, chunk_bytes: int = 16 << 20) -> Iterable[bytes | memoryview]:
        yield self.tobytes()


def transposed(tensor: Tensor) -> Tensor:
    """The transpose of a 2-D tensor: the original itself for a :class:`TransposedTensor`."""
    return tensor.inner if isinstance(tensor, TransposedTensor) else TransposedTensor(tensor)


def alpha_for(scale: float, rank: int) -> float:
    """An alpha whose ``alpha / rank`` is ``scale``: ``scale * rank``, moved by an ulp or two
    where that product does not divide back. A few scales are no quotient of any float by
    ``rank``; they come out within an ulp (and writing the adapter back keeps the config's
    own ``scale``, :func:`mlx_config_for`).

    Example:
        >>> alpha_for(20.0, 8)
        160.0
        >>> alpha_for(2.5, 3) / 3 == 2.5
        True
    """
    alpha = scale * rank
    if not math.isfinite(alpha) or rank == 0:
        return alpha
    candidates = [alpha]
    for direction in (math.inf, -math.inf):
        step = alpha
        for _ in range(2):
            step = float(np.nextafter(step, direction))
            candidates.append(step)
    return min(candidates, key=lambda a: abs(a / rank - scale))
    for _ in range(4):
        quotient = alpha / rank
        if quotient == scale:
            break
        alpha = float(np.nextafter(alpha, math.inf if quotient < scale else -math.inf))
    return alpha


def is_mlx_config(config: dict[str, Any] | None) -> bool:
    """Whether an adapter_config.json is mlx-lm's (it has ``lora_parameters`` or
    ``fine_tune_type`` and no PEFT ``peft_type``)."""
    return (
        isinstance(config, dict)
        and "peft_type" not in config
        and ("lora_parameters" in config or "fine_tune_type" in config)
    )


def _is_embedding(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in EMBEDDING_NAMES


class MlxFormat(AdapterFormat):
    """mlx-lm's adapters: ``<module path>.lora_a`` / ``.lora_b`` (/ ``.m``) plus its config."""

    name = "mlx"
    description = "MLX-LM (adapters.safetensors + adapter_config.json)"
    default_filename = MLX_WEIGHTS_NAME

    def parse_key(self, key: str) -> ParsedKey | None:
        """``<path>.lora_a`` -> ``(path, "down")``, ``.lora_b`` -> up, ``.m`` -> magnitude.

        Example:
            >>> MlxFormat().parse_key("model.embed_tokens.lora_b")
            ParsedKey(stem='model.embed_tokens', role='up', embedding=True)
        """
        found = _ROLE_RE.match(key)
        return found and ParsedKey(
            found["stem"], _ROLES[found["role"]], _is_embedding(found["stem"])
        )

    def claims(self, key: str) -> bool:
        # ``.m`` alone is too common a leaf to claim a file by; the factors say it is mlx's.
        return key.endswith((".lora_a", ".lora_b"))

    def canonical_shape(self, role: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape a factor has in PEFT's orientation: mlx stores both transposed."""
        if role in ("down", "up") and len(shape) == 2:
            return (shape[1], shape[0])
        return shape

    def foreign_kind(
        self,
        stem: str,
        shapes: dict[str, tuple[int, ...]],
        config: dict[str, Any] | None = None,
    ) -> str | None:
        if len(shapes.get("down", ())) == 3:
            return SWITCH_KIND
        if _is_embedding(stem) and "magnitude" in shapes:
            return DORA_EMBEDDING_KIND
        return None

    def read(self, source: AdapterSource) -> Adapter:
        config = source.config or {}
        if config.get("fine_tune_type") == "full":
            raise UnsupportedAdapterError(
                "fine_tune_type is 'full': the file holds fully fine-tuned weights, not LoRA "
                "factors",
                path=source.config_path or source.weights,
                hint="it is a (partial) model checkpoint: use it as a base, not as an adapter",
                kind="unsupported-type",
            )
        adapter = source.new_adapter(self.name)
        params = config.get("lora_parameters", {})
        if not isinstance(params, dict):
            raise FormatError(
                f"lora_parameters is a {type(params).__name__}, expected an object "
                "{rank, scale, dropout, keys} (mlx-lm indexes it)",
                path=source.config_path,
                hint="fix or regenerate adapter_config.json (mlx_lm.lora writes it)",
                kind="config-invalid",
            )
        scale = params.get("scale")
        dora = config.get("fine_tune_type") == "dora"
        for stem, roles in complete_modules(self, source, adapter):
            (down_key, lora_a), (up_key, lora_b) = roles["down"], roles["up"]
            embedding = _is_embedding(stem)
            other = self.foreign_kind(stem, {role: t.shape for role, (_, t) in roles.items()})
            if other is not None:
                for key, tensor in roles.values():
                    note_foreign(adapter, other, stem, key, tensor)
                continue
            ensure(
                len(lora_a.shape) == 2 and len(lora_b.shape) == 2,
                f"module {stem!r}: lora_a and lora_b must be 2-D, found {list(lora_a.shape)} "
                f"and {list(lora_b.shape)}",
                source,
                "factor-shape",
            )
            down, up = TransposedTensor(lora_a), TransposedTensor(lora_b)
            rank = down.shape[0]
            if scale is None:
                alpha, unknown = None, f"no lora_parameters.scale in {ADAPTER_CONFIG_NAME}"
            else:
                alpha, unknown = alpha_for(config_number(scale), rank), None
            keys = {"down": down_key, "up": up_key}
            kind = EMBEDDING if embedding else LINEAR
            module = LoraModule(stem, down, up, alpha, kind, stem, keys=keys, alpha_unknown=unknown)
            if "magnitude" in roles:
                keys["magnitude"], module.magnitude = roles["magnitude"]
            elif dora:
                # A DoRA adapter whose module lost its magnitude would merge as plain LoRA.
                raise AdapterError(
                    f"module {stem!r} has no magnitude vector {stem + '.m'!r}, which every "
                    "module of a fine_tune_type 'dora' adapter has",
                    path=source.weights,
                    hint="re-export the adapter; the file lost tensors",
                    kind="missing-tensor",
                )
            adapter.modules[stem] = module
        return adapter

    # -- writing ---------------------------------------------------------------------------

    def tensors_for(self, adapter: Adapter) -> dict[str, Tensor]:
        """Every tensor to write under mlx-lm's names (``<path>.lora_a`` ...)."""
        out: dict[str, Tensor] = {}
        for m in adapter.modules.values():
            bias = m.bias is not None or m.bias_diff is not None
            if m.path is None or m.component is not None or bias:
                raise UsageError(
                    f"module {m.key!r} cannot be written as an mlx-lm adapter: "
                    + (
                        "it has a lora_B bias or .diff_b, which mlx-lm's LoRA layers do not have"
                        if bias
                        else "mlx-lm names modules by their path in one model"
                    ),
                    path=adapter.source,
                    hint="convert a plain PEFT adapter of one model (`loratool convert --to "
                    "peft`) first",
                )
            keys = m.keys if adapter.format == self.name else {}
            out[keys.get("down") or f"{m.path}.lora_a"] = transposed(m.down)
            out[keys.get("up") or f"{m.path}.lora_b"] = transposed(m.up)
            if m.magnitude is not None:
                out[keys.get("magnitude") or f"{m.path}.m"] = m.magnitude
        out.update(adapter.passthrough)
        return out

    def write(self, adapter: Adapter, out: Path, *, refresh_hashes: bool = False) -> Path:
        tensors = self.tensors_for(adapter)
        config = mlx_config_for(adapter)
        metadata = dict(adapter.metadata) or None
        if out.suffix == ".safetensors":
            raise UsageError(
                "an mlx-lm adapter is a folder: its rank and scale live in adapter_config.json "
                "and mlx-lm loads adapters.safetensors from a folder",
                path=out,
                hint="give a folder as the output path",
            )
        with atomic_dir(out, force=True) as tmp:
            save_tensors(tmp / MLX_WEIGHTS_NAME, tensors, metadata)
            (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=4) + "\n")
        return out / MLX_WEIGHTS_NAME


def mlx_keys(paths: Iterable[str]) -> list[str]:
    """mlx-lm's ``lora_parameters.keys`` for module paths: relative to the block for modules in
    ``...layers.<i>.``, the full path for the others (``lm_head``, ``model.embed_tokens``).

    Example:
        >>> mlx_keys(["model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.q_proj",
        ...           "lm_head"])
        ['lm_head', 'self_attn.q_proj']
    """
    keys = set()
    for path in paths:
        m = _BLOCK_RE.match(path)
        keys.add(m.group("rest") if m else path)
    return sorted(keys)


def mlx_config_for(adapter: Adapter) -> dict[str, Any]:
    """The adapter_config.json mlx-lm loads ``adapter`` with: one rank and one scale for all.

    The adapter's own config is kept when it is mlx-lm's and still says every module's rank
    and scale; otherwise ``fine_tune_type``, ``num_layers`` (-1: every block; modules mlx-lm
    then adds where the file has none start with ``lora_b = 0``, no update) and
    ``lora_parameters`` are written fresh (the config's other fields stay).

    Raises:
        UnsupportedAdapterError: modules of different ranks or scales, or rsLoRA mixed in a way
            one ``scale`` cannot say (mlx-lm has one rank and one scale per adapter).
    """
    modules = list(adapter.modules.values())
    if not modules:
        raise UsageError("no LoRA module to write", path=adapter.source)
    ranks = sorted({m.rank for m in modules})
    scales = sorted({m.scale for m in modules})
    if len(ranks) > 1 or len(scales) > 1:
        what = (
            f"ranks {', '.join(map(str, ranks[:4]))}"
            if len(ranks) > 1
            else f"scales {', '.join(f'{s:g}' for s in scales[:4])}"
        )
        raise UnsupportedAdapterError(
            f"modules have {what}; an mlx-lm adapter has one rank and one scale "
            "(lora_parameters.rank / .scale) for every module",
            path=adapter.source,
            hint="write it as a PEFT adapter instead (PEFT keeps a rank and alpha per module)",
            kind="unsupported-type",
        )
    rank, scale = ranks[0], scales[0]
    dora = any(m.dora for m in modules)
    if any(m.dora for m in modules) and not all(m.dora for m in modules):
        raise UnsupportedAdapterError(
            "some modules are DoRA and some are not; mlx-lm's fine_tune_type is one of them "
            "for every module",
            path=adapter.source,
            hint="keep this adapter in PEFT format",
            kind="unsupported-type",
        )
    own = adapter.config if is_mlx_config(adapter.config) else None
    if own is not None:
        params = own.get("lora_parameters") or {}
        if (
            isinstance(params, dict)
            and params.get("rank") == rank
            and params.get("scale") is not None
            and alpha_for(config_number(params["scale"]), rank) / rank == scale
            and (own.get("fine_tune_type") == "dora") == dora
        ):
            return dict(own)
    config = dict(own or {})
    source = adapter.config or {}
    dropout = source.get("lora_dropout", 0.0) if own is None else None
    params = dict((own or {}).get("lora_parameters") or {})
    params.update(rank=rank, scale=_num(scale), keys=mlx_keys(m.path or m.key for m in modules))
    if dropout is not None:
        params["dropout"] = dropout
    params.setdefault("dropout", 0.0)
    # -1: every block. The modules may no longer be the config's (combine, a converted file),
    # and the model's block count is not known here to say how many of the last ones they use.
    config.update(fine_tune_type="dora" if dora else "lora", lora_parameters=params, num_layers=-1)
    base = source.get("base_model_name_or_path")
    if own is None and isinstance(base, str) and base:
        config["model"] = base
    return dict(sorted(config.items()))


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)
