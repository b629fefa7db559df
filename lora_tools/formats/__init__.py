"""Adapter formats: detection, reading and writing through one registry.

Built-in formats: ``peft``, ``diffusers``, ``kohya``, ``diffusers-old``, ``comfyui``,
``xlabs``, ``mlx``; llama.cpp's LoRA GGUF, a container of its own, is read (not written) by
:mod:`lora_tools.formats.gguf`. Third-party packages add
formats through the ``lora_tools.formats`` entry-point group, naming an
:class:`~lora_tools.formats.base.AdapterFormat` subclass.

Example:
    >>> from lora_tools.formats import load_adapter
    >>> adapter = load_adapter("fixtures/peft/llama-lora")      # doctest: +SKIP
    >>> adapter.format, len(adapter.modules)                    # doctest: +SKIP
    ('peft', 8)
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

from lora_tools.adapter import Adapter
from lora_tools.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHT_NAMES, CONFIG_WEIGHT_NAMES
from lora_tools.errors import (
    AdapterError,
    FormatError,
    UnsafeFileError,
    UnsupportedAdapterError,
    UsageError,
)
from lora_tools.formats.base import (
    AdapterFormat,
    AdapterSource,
    raise_unknown,
    read_json_config,
)
from lora_tools.formats.comfyui import ComfyUIFormat
from lora_tools.formats.diffusers import DiffusersFormat
from lora_tools.formats.diffusers_old import DiffusersOldFormat
from lora_tools.formats.gguf import READ_ONLY_HINT, read_gguf_adapter
from lora_tools.formats.kohya import KohyaFormat
from lora_tools.formats.mlx import MlxFormat
from lora_tools.formats.peft import PeftFormat
from lora_tools.formats.xlabs import XLabsFormat
from lora_tools.io.atomic import check_output
from lora_tools.io.gguf import is_gguf
from lora_tools.io.safetensors import PICKLE_SUFFIXES, SafetensorsFile, gc_paused

__all__ = [
    "AdapterFormat",
    "AdapterSource",
    "adapter_path",
    "find_adapter_files",
    "get_format",
    "load_adapter",
    "open_source",
    "registry",
    "save_adapter",
]


_REGISTRY: dict[str, AdapterFormat] = {}
_ENTRY_POINTS_LOADED = False


def register(fmt: AdapterFormat | type[AdapterFormat]) -> AdapterFormat:
    """Add a format to the registry (later registrations of a name replace earlier ones)."""
    instance = fmt() if isinstance(fmt, type) else fmt
    if not instance.name:
        raise ValueError(f"{type(instance).__name__} has no name")
    _REGISTRY[instance.name] = instance
    return instance


for _builtin in (
    PeftFormat,
    DiffusersFormat,
    KohyaFormat,
    DiffusersOldFormat,
    ComfyUIFormat,
    XLabsFormat,
    MlxFormat,
):
    register(_builtin)


def registry() -> dict[str, AdapterFormat]:
    """All formats by name, built-in ones first, then those from entry points."""
    global _ENTRY_POINTS_LOADED
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        for ep in entry_points(group="lora_tools.formats"):
            try:
                register(ep.load())
            except Exception as exc:  # a broken plugin must not break loratool
                import warnings

                warnings.warn(f"format plugin {ep.name!r} failed to load: {exc}", stacklevel=2)
    return dict(_REGISTRY)


def get_format(name: str) -> AdapterFormat:
    formats = registry()
    try:
        return formats[name]
    except KeyError:
        raise UsageError(
            f"unknown format {name!r}", hint=f"known formats: {', '.join(formats)}"
        ) from None


def adapter_path(path: str | os.PathLike[str]) -> Path:
    """The adapter a path names: ``adapter_config.json`` means the folder that holds it.

    Every command takes an adapter's config file for its folder (it is what a file manager or
    a shell completion hands out); this is the one place that says so.

    Example:
        >>> adapter_path("fixtures/peft/llama-lora/adapter_config.json")
        PosixPath('fixtures/peft/llama-lora')
    """
    path = Path(path)
    if path.name == ADAPTER_CONFIG_NAME and path.is_file():
        return path.parent
    return path


def find_adapter_files(path: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """``(weights file, config file or None)`` for an adapter file or folder
    (``adapter_config.json`` means its folder).

    Raises:
        UnsafeFileError: only a pickle (``adapter_model.bin``) is there.
        FormatError: nothing adapter-like is there.
    """
    path = adapter_path(path)
    if path.is_dir():
        candidates = [path / n for n in ADAPTER_WEIGHT_NAMES if (path / n).is_file()]
        if not candidates:
            candidates = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if len(candidates) > 1 and not any(c.name in ADAPTER_WEIGHT_NAMES for c in candidates):
            raise UsageError(
                f"folder holds {len(candidates)} .safetensors files "
                f"({', '.join(c.name for c in candidates[:3])}...); which is the adapter?",
                path=path,
                hint="pass the adapter file itself",
            )
        if not candidates:
            pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise UnsafeFileError(
                    f"only a pickle file ({pickles[0].name}) is here; loratool never unpickles "
                    "files (they can run code)",
                    path=pickles[0],
                    hint="re-save the adapter with safe_serialization=True",
                    kind="pickle",
                )
            raise FormatError(
                "no adapter weights here (looked for adapter_model.safetensors, "
                "pytorch_lora_weights.safetensors, *.safetensors)",
                path=path,
                kind="no-weights",
            )
        weights = candidates[0]
        config = path / ADAPTER_CONFIG_NAME
        return weights, config if config.is_file() else None
    if not path.exists():
        raise FormatError("no such file or folder", path=path, kind="missing")
    config = path.with_name(ADAPTER_CONFIG_NAME)
    use_config = path.name in CONFIG_WEIGHT_NAMES and config.is_file()
    return path, config if use_config else None


def open_source(path: str | os.PathLike[str]) -> AdapterSource:
    """Locate and open an adapter's files: header read and checked, config parsed."""
    weights, config_path = find_adapter_files(path)
    file = SafetensorsFile(weights)
    config = read_json_config(config_path) if config_path is not None else None
    return AdapterSource(weights=weights, file=file, config=config, config_path=config_path)


def best_format(keys: list[str], metadata: dict[str, str]) -> AdapterFormat | None:
    """The registered format that claims the most of ``keys`` (the first registered one on a
    tie), or None when none claims any. ``loratool validate`` detects formats with it too."""
    best, best_score = None, 0
    for fmt in registry().values():
        score = fmt.score(keys, metadata)
        if score > best_score:
            best, best_score = fmt, score
    return best


def detect_format(source: AdapterSource) -> AdapterFormat:
    """The registered format that claims the most keys; UnknownFormatError if none claims any."""
    best = best_format(source.keys, source.metadata)
    if best is None:
        raise_unknown(source)
    assert best is not None
    return best


def load_adapter(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    gguf: bool = False,
    strict: bool = True,
) -> Adapter:
    """Read an adapter file or folder into an :class:`~lora_tools.adapter.Adapter`.

    Only the header is read; tensor values are read when first used (kohya alpha scalars are
    read at once).

    Args:
        path: an adapter file (``.safetensors``) or a folder holding one.
        format: force a format by name instead of detecting it.
        gguf: also read a llama.cpp LoRA GGUF (:mod:`lora_tools.formats.gguf`); only callers
            that read without converting ask for it (``inspect``): its factors are laid out
            for llama.cpp, not as trained.
        strict: refuse a PEFT config whose ranks contradict the tensors (PEFT cannot load
            it: :meth:`~lora_tools.adapter.Adapter.require_config_ranks`); callers that only
            read and report (``inspect``) pass False.

    Raises:
        UnsupportedAdapterError: ``path`` is a GGUF and ``gguf`` is False (kind
            ``gguf-read-only``).
    """
    if is_gguf(adapter_path(path)):
        if not gguf:
            raise UnsupportedAdapterError(
                "a llama.cpp GGUF adapter: its factors are laid out for llama.cpp (q / k rows "
                "permuted, one alpha), so only inspect and validate read it",
                path=path,
                hint=READ_ONLY_HINT,
                kind="gguf-read-only",
            )
        adapter = read_gguf_adapter(adapter_path(path))
        adapter.require_usable_scales()
        return adapter
    source = open_source(path)
    fmt = get_format(format) if format else detect_format(source)
    with gc_paused():  # one module object per tensor pair: no cycles to collect
        adapter = fmt.read(source)
    if not adapter.modules and not adapter.foreign:
        raise AdapterError(
            f"no complete LoRA module (both factors) found among {len(source.keys)} tensors",
            path=source.weights,
            hint="run `loratool validate` on it for details",
            kind="no-modules",
        )
    adapter.require_usable_scales()
    if strict:
        adapter.require_config_ranks()
    return adapter


def save_adapter(
    adapter: Adapter,
    out: str | os.PathLike[str],
    *,
    format: str | None = None,
    force: bool = False,
    refresh_hashes: bool = False,
) -> Path:
    """Write an adapter in its own format (or ``format``), atomically; return the weights file
    written.

    PEFT writes a folder (adapter_model.safetensors + adapter_config.json) unless ``out`` ends in
    ``.safetensors``; kohya writes one file; diffusers writes ``pytorch_lora_weights.safetensors``
    into a folder, or the named file.

    Args:
        adapter: the adapter to write.
        out: the output file or folder.
        format: write in this format instead of the adapter's own.
        force: replace an existing file, or a folder loratool wrote; the adapter's own files
            are never replaced, with or without it (the CLI's rule: :func:`check_output`).
        refresh_hashes: tensors changed, so recompute content hashes kept in metadata.

    Raises:
        OutputError: ``out`` exists (without ``force``), is or holds the adapter's source, or is
            a folder holding files loratool did not write.

    Example:
        >>> save_adapter(load_adapter("fixtures/peft/llama-lora"), "out/copy")  # doctest: +SKIP
        PosixPath('out/copy/adapter_model.safetensors')
    """
    fmt = get_format(format or adapter.format)
    adapter.require_writable()
    sources = [p for p in (adapter.source, adapter.config_source) if p is not None]
    check_output(out, list(sources), force=force)
    return fmt.write(adapter, Path(out), refresh_hashes=refresh_hashes)
