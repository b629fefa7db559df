"""Which adapters the paths name: files, folders, configs and Hub ids, each adapter once.

A target pairs a weights file (or a pickle, never opened) with the adapter_config.json that
belongs to it; a path that names nothing usable becomes a target carrying its own finding.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lora_tools.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHT_NAMES, CONFIG_WEIGHT_NAMES
from lora_tools.io.gguf import GGUF_SUFFIX
from lora_tools.io.hub import local_reason, parse_hub_id, resolve_input
from lora_tools.io.safetensors import PICKLE_SUFFIXES, file_kind


@dataclass(frozen=True)
class Target:
    """One adapter to validate: a weights file (or a pickle), its config, or a problem path."""

    path: str
    weights: Path | None
    config: Path | None = None
    config_display: str | None = None
    problem: str | None = None  # an LT0xx code when the path itself is the finding
    problem_message: str | None = None

    @property
    def key(self) -> tuple[str, ...]:
        parts = [os.path.realpath(self.weights) if self.weights else self.path]
        parts.append(os.path.realpath(self.config) if self.config else "")
        return tuple(parts)


def _join(display: str, name: str) -> str:
    return os.path.normpath(os.path.join(display, name))


def _folder_targets(display: str, folder: Path) -> list[Target]:
    config = folder / ADAPTER_CONFIG_NAME
    cfg = config if config.is_file() else None
    cfg_display = _join(display, ADAPTER_CONFIG_NAME) if cfg else None
    standard = [folder / n for n in ADAPTER_WEIGHT_NAMES if (folder / n).is_file()]
    files = standard or sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in (".safetensors", GGUF_SUFFIX) and p.is_file()
    )
    if files:
        targets = []
        for weights in files:
            # The config belongs to PEFT's or mlx-lm's weights file, or to the folder's only
            # safetensors file (a GGUF carries its own metadata).
            attach = cfg is not None and (
                weights.name in CONFIG_WEIGHT_NAMES
                or (len(files) == 1 and weights.suffix.lower() != GGUF_SUFFIX)
            )
            targets.append(
                Target(
                    _join(display, weights.name),
                    weights,
                    cfg if attach else None,
                    cfg_display if attach else None,
                )
            )
        return targets
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        return [Target(_join(display, p.name), p, cfg, cfg_display) for p in pickles]
    return [
        Target(
            display,
            None,
            cfg,
            cfg_display,
            problem="LT018",
            problem_message="no adapter weights here (looked for adapter_model.safetensors, "
            "pytorch_lora_weights.safetensors, *.safetensors, *.gguf)",
        )
    ]


def discover(paths: Iterable[str | os.PathLike[str]]) -> list[Target]:
    """The adapters named by ``paths`` (files, folders or Hub ids), each once.

    A folder means its adapter weights (PEFT's or diffusers' file name, else every
    ``*.safetensors`` and ``*.gguf`` in it); ``adapter_config.json`` alone means its folder; a weights file
    named ``adapter_model.safetensors`` takes the config beside it. Paths naming the same files
    are validated once.
    """
    out: dict[tuple[str, ...], Target] = {}
    for spec in paths:
        display = os.fspath(spec)
        path = Path(display)
        hub = not path.exists() and parse_hub_id(display) is not None
        if hub and local_reason(display) is None:
            path = resolve_input(display, role="adapter")  # a local path always wins
        if path.is_dir():
            found = _folder_targets(display, path)
        elif path.is_file() and path.name == ADAPTER_CONFIG_NAME:
            found = _folder_targets(os.path.dirname(display) or ".", path.parent)
        elif path.is_file():
            config = path.with_name(ADAPTER_CONFIG_NAME)
            attach = path.name in CONFIG_WEIGHT_NAMES and config.is_file()
            found = [
                Target(
                    display,
                    path,
                    config if attach else None,
                    _join(os.path.dirname(display), ADAPTER_CONFIG_NAME) if attach else None,
                )
            ]
        else:
            message = "no such file or folder"
            if path.exists():  # a FIFO or a device: reading it would block or never end
                message = f"not a regular file or folder (a {file_kind(path.stat().st_mode)})"
            elif hub:
                message += f" (not looked up on the Hub: {local_reason(display)})"
            found = [Target(display, None, problem="LT017", problem_message=message)]
        for target in found:
            out.setdefault(target.key, target)
    # A weights file given alone and again through its folder is one adapter: keep the one
    # that carries the config.
    by_weights: dict[str, Target] = {}
    for target in out.values():
        wkey = os.path.realpath(target.weights) if target.weights else target.path
        kept = by_weights.get(wkey)
        if kept is None or (kept.config is None and target.config is not None):
            by_weights[wkey] = target
    return list(by_weights.values())
