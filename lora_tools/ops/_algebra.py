"""What rescale, resize, combine and convert share: module identity, factor replacement, the
history note, and writing the result.

Private to the algebra operations; the public entry points are in their own modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools import __version__
from lora_tools.adapter import Adapter, LoraModule
from lora_tools.constants import HISTORY_KEY
from lora_tools.errors import FormatError
from lora_tools.formats import adapter_path, save_adapter
from lora_tools.io.atomic import check_output
from lora_tools.io.jsonfile import parse_json
from lora_tools.io.safetensors import ArrayTensor, Tensor, numpy_dtype
from lora_tools.naming import flatten_path, split_name, target_paths

#: ``progress(done, total)``: called after each module so callers can draw a progress bar.
Progress = Callable[[int, int], None]


#: PEFT config fields that decide which layers get a LoRA layer.
TARGETING_FIELDS = (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "target_parameters",
)


def targets_cover(targets: Any, path: str) -> bool:
    """Whether PEFT's ``target_modules`` selects module ``path``: a list entry by exact name or
    ``.``-suffix, a string as a full regex match (``all-linear`` is not decided here: False)."""
    if isinstance(targets, list):
        return any(isinstance(t, str) and (path == t or path.endswith("." + t)) for t in targets)
    if isinstance(targets, str) and targets.lower() != "all-linear":
        try:
            return re.fullmatch(targets, path) is not None
        except re.error:
            return False
    return False


def exact_targets(modules: list[LoraModule]) -> dict[str, Any]:
    """Targeting fields that select exactly ``modules`` (full paths, as PEFT saves a resolved
    ``all-linear``; see :func:`lora_tools.naming.target_paths`) and nothing else."""
    return {
        "target_modules": target_paths(modules),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "target_parameters": None,
    }


def module_identity(module: LoraModule) -> tuple[str | None, str]:
    """``(component, flattened path)``: the same layer read from any format gets the same pair.

    kohya names lose the dots of the module path, so paths are compared flattened; a CLIP text
    encoder's ``text_model.`` root (there in kohya names and transformers 4 paths, not in
    transformers 5 ones) is left out.
    """
    if module.path is not None:
        component, flat = module.component, flatten_path(module.path)
    else:
        component, flat = split_name(module.key)
        component = component or module.component
    if component in ("text_encoder", "text_encoder_2"):
        flat = flat.removeprefix("text_model_")
    return component, flat


def output_alphas(fmt: str, modules: list[tuple[LoraModule, int]]) -> list[float]:
    """The alpha of each output module (given with its rank): the rank (scale 1), except in
    kohya files, where every module of a component gets one alpha, the component's most common
    rank. diffusers' kohya loader keeps only the most common alpha of a component for
    attention and text-encoder layers (the others' alpha_pattern keys match nothing), so
    mixed alphas there load at the wrong strength."""
    if fmt != "kohya":
        return [float(k) for _, k in modules]
    by_component: dict[str | None, list[int]] = {}
    for m, k in modules:
        by_component.setdefault(module_identity(m)[0], []).append(k)
    common = {c: float(Counter(ks).most_common(1)[0][0]) for c, ks in by_component.items()}
    return [common[module_identity(m)[0]] for m, _ in modules]


def cast_like(array: np.ndarray, like: Tensor) -> ArrayTensor:
    """``array`` cast once to ``like``'s dtype (the input's dtype), as a tensor."""
    return ArrayTensor(np.ascontiguousarray(array).astype(numpy_dtype(like.dtype)), like.dtype)


def with_factors(
    module: LoraModule,
    up: np.ndarray,
    down: np.ndarray,
    *,
    alpha: float | None,
    rslora: bool | None = None,
    dtype_from: LoraModule | None = None,
    bias: np.ndarray | None = None,
) -> LoraModule:
    """A copy of ``module`` with new 2-D factors ``up`` ``[out, k]`` and ``down`` ``[k, in*]``.

    The factors are reshaped to the module's layout (conv: ``[out, k, 1, ...]`` and
    ``[k, in, *kernel]``) and cast to the dtypes of ``dtype_from`` (default: ``module``).
    """
    src = dtype_from or module
    k = up.shape[1]
    up_shape = (module.up.shape[0], k, *module.up.shape[2:])
    down_shape = (k, *module.down.shape[1:])
    changes: dict[str, Any] = {
        "up": cast_like(up.reshape(up_shape), src.up),
        "down": cast_like(down.reshape(down_shape), src.down),
        "alpha": alpha,
    }
    if rslora is not None:
        changes["rslora"] = rslora
    if bias is not None:
        like = src.bias if src.bias is not None else src.up
        changes["bias"] = cast_like(bias, like)
    return dataclasses.replace(module, **changes)


def add_history(adapter: Adapter, op: str, **params: Any) -> None:
    """Append ``{"op", "version", **params}`` to the adapter's ``loratool_history`` metadata.

    Metadata stays string -> string: the list is stored as JSON text. A malformed earlier value
    is kept under ``loratool_history_unparsed`` rather than lost.
    """
    history: list[Any] = []
    raw = adapter.metadata.get(HISTORY_KEY)
    if raw:
        try:
            parsed = parse_json(raw, path=adapter.source, what=f"__metadata__[{HISTORY_KEY!r}]")
            history = parsed if isinstance(parsed, list) else [parsed]
        except FormatError:
            adapter.metadata[f"{HISTORY_KEY}_unparsed"] = raw
    entry = {"op": op, "version": __version__}
    entry.update({k: v for k, v in params.items() if v is not None})
    history.append(entry)
    adapter.metadata = {**adapter.metadata, HISTORY_KEY: json.dumps(history, sort_keys=True)}


def input_paths(adapter: Adapter, given: str | os.PathLike[str] | None = None) -> list[Path]:
    """Every path the output must not overwrite: what the user gave (``adapter_config.json``:
    its folder), the weights, the config."""
    named = adapter_path(given) if given is not None else None
    out = [Path(p) for p in (named, adapter.source, adapter.config_source) if p is not None]
    return out


def write_adapter(
    adapter: Adapter,
    out: str | os.PathLike[str],
    inputs: list[Path],
    *,
    force: bool = False,
    format: str | None = None,
) -> Path:
    """Refuse unsafe outputs, then write ``adapter`` atomically with refreshed hashes/metadata.

    Returns:
        The weights file written.
    """
    check_output(out, list(inputs), force=force)
    return save_adapter(adapter, out, format=format, force=force, refresh_hashes=True)
