"""The real consumers as oracles: load a file loratool wrote the way PEFT or diffusers would, and
compare the merged weights with a numpy float64 reference.

- :func:`peft_consume`: ``PeftModel.from_pretrained`` on a transformers model or a bare diffusers
  UNet, then ``merge_and_unload``. Every LoRA parameter PEFT creates must be in the file and every
  tensor of the file must be loaded (no missing, no unexpected keys).
- :func:`diffusers_consume`: ``StableDiffusionPipeline.load_lora_weights`` + ``fuse_lora``. The
  number of LoRA layers diffusers injects must equal the file's module count (diffusers logs only
  a debug line when it injects nothing).
- Both capture what the libraries say while the adapter is applied (``warnings`` and the
  ``peft`` / ``diffusers`` / ``transformers`` loggers): any warning-level record, and any
  diffusers loader debug record, is a finding. Deprecation warnings about the libraries' own
  APIs (``FutureWarning`` / ``DeprecationWarning``) say nothing about the file and are left out.
- :func:`reference_deltas`: the float64 update of every module of an input adapter, laid out
  like the base tensor it updates (found with :func:`lora_tools.resolve.resolve`), from the
  factors and scale: ``scale * up @ down`` (embeddings transposed, GPT-2 Conv1D transposed).

Weights are keyed ``"<component>/<key>"`` (component ``""`` for a plain model); text-encoder
keys lose their ``text_model.`` root (transformers 5 names the modules without it).

Base models are read from fixtures/bases with local files only, once per process, and copied
for every use.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_tools.adapter import Adapter
from lora_tools.formats import load_adapter
from lora_tools.io.checkpoint import open_checkpoint
from lora_tools.resolve import resolve

LOGGERS = ("peft", "diffusers", "transformers")
#: Base keys of the tiny SD pipeline's components that LoRAs touch.
PIPELINE_COMPONENTS = ("unet", "text_encoder")


@dataclass
class Consumed:
    """What a consumer made of an adapter file.

    Attributes:
        merged: float64 weights after the merge, keyed ``component/key``.
        base: float64 weights of the untouched base, same keys.
        messages: what the libraries warned or logged while applying the adapter.
        layers: LoRA layers the consumer created.
        missing: LoRA parameters the consumer created that the file does not hold.
        unexpected: tensors of the file the consumer did not load.
    """

    merged: dict[str, np.ndarray]
    base: dict[str, np.ndarray]
    messages: list[str] = field(default_factory=list)
    layers: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def problems(self, modules: int) -> list[str]:
        """Every way the load fell short of "nothing missing, nothing ignored, no warnings"."""
        out = [f"message: {m}" for m in self.messages]
        out += [f"missing: {k}" for k in self.missing[:5]]
        out += [f"unexpected: {k}" for k in self.unexpected[:5]]
        if self.layers != modules:
            out.append(f"{self.layers} LoRA layers created for {modules} modules")
        return out


def norm_key(component: str, key: str) -> str:
    if component.startswith("text_encoder"):
        key = key.removeprefix("text_model.")
    return f"{component}/{key}"


class _Records(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__(level=logging.DEBUG)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        loader_debug = record.name.startswith("diffusers.loaders") and record.levelno < logging.INFO
        if record.levelno >= logging.WARNING or loader_debug:
            self.out.append(f"{record.name} {record.levelname}: {record.getMessage()}")


@contextlib.contextmanager
def captured() -> Iterator[list[str]]:
    """Collect warnings and the libraries' warning / loader-debug log records."""
    out: list[str] = []
    handler = _Records(out)
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield out
        for w in caught:
            if not issubclass(w.category, (FutureWarning, DeprecationWarning)):
                out.append(f"{w.category.__name__}: {w.message}")
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def _f64(state: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in state.items()}


@functools.cache
def _base_model(kind: str, path: str):
    import torch

    if kind == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(path, local_files_only=True)
    if kind == "pipeline":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(
            path, safety_checker=None, local_files_only=True
        )
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if "bf16" in path else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)


def model_copy(kind: str, path: Path):
    """A fresh copy of a base model: ``causal-lm`` / ``unet`` / ``pipeline``."""
    return copy.deepcopy(_base_model(kind, str(path)))


def peft_consume(base: Path, adapter_dir: Path, *, kind: str = "causal-lm") -> Consumed:
    """Apply a PEFT adapter folder with ``PeftModel.from_pretrained`` and merge it.

    ``kind``: ``causal-lm`` (transformers) or ``unet`` (a bare diffusers UNet; its weights are
    keyed under component ``unet``).
    """
    import peft
    from safetensors import safe_open

    component = "unet" if kind == "unet" else ""
    model = model_copy(kind, base)
    before = {norm_key(component, k): v for k, v in _f64(model.state_dict()).items()}
    with captured() as messages:
        pm = peft.PeftModel.from_pretrained(model, adapter_dir)
    with safe_open(adapter_dir / "adapter_model.safetensors", "np") as f:
        saved = set(f.keys())
    # The keys PEFT itself would save for the layers it created: each must be in the file, and
    # the file must hold nothing else (PEFT ignores unexpected keys silently).
    with warnings.catch_warnings():
        # what saving would say (embedding layers saved, 1-D lora_B.bias) is not the load's
        warnings.simplefilter("ignore")
        expected = set(peft.get_peft_model_state_dict(pm))
    layers = {k.split(".lora_")[0] for k in expected if ".lora_" in k}
    out = Consumed(merged={}, base=before, messages=messages, layers=len(layers))
    out.missing = sorted(expected - saved)
    out.unexpected = sorted(saved - expected)
    try:
        merged = pm.merge_and_unload()
    except RuntimeError as exc:
        if "lora_bias" not in str(exc):
            raise
        out.merged = _lora_bias_merge(pm, component, before)
        return out
    out.merged = {norm_key(component, k): v for k, v in _f64(merged.state_dict()).items()}
    return out


def _lora_bias_merge(pm, component: str, before: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights PEFT's merge would give where the base layer has no bias to merge into:
    ``W + get_delta_weight`` and a new bias ``scaling * lora_B.bias`` (what the forward adds).
    ``W`` comes from ``before``: the failed merge may have updated a weight already."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, np.ndarray] = {}
    for name, layer in pm.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        key = norm_key(component, f"{name}.weight")
        out[key] = before[key] + layer.get_delta_weight("default").detach().double().numpy()
        b = layer.lora_B["default"].bias
        if b is not None:
            out[norm_key(component, f"{name}.bias")] = (
                b.detach().double().numpy() * layer.scaling["default"]
            )
    return out


def diffusers_consume(pipeline_dir: Path, lora_file: Path) -> Consumed:
    """``load_lora_weights`` + ``fuse_lora`` on the tiny SD pipeline (UNet + text encoder)."""
    pipe = model_copy("pipeline", pipeline_dir)
    parts = [(c, getattr(pipe, c)) for c in PIPELINE_COMPONENTS]
    before = {norm_key(c, k): v for c, mod in parts for k, v in _f64(mod.state_dict()).items()}
    with captured() as messages:
        pipe.load_lora_weights(str(lora_file))
    layers = {
        (c, k.split(".lora_")[0]) for c, mod in parts for k in mod.state_dict() if ".lora_A." in k
    }
    pipe.fuse_lora()
    merged = {}
    for c, mod in parts:
        for k, v in mod.state_dict().items():
            if ".lora_" not in k:
                merged[norm_key(c, k.replace(".base_layer.", "."))] = v.detach().double().numpy()
    return Consumed(merged=merged, base=before, messages=messages, layers=len(layers))


def reader_consume(base: Path, adapter_path: Path) -> Consumed:
    """No library consumer: the file as loratool reads it back, resolved against ``base``."""
    adapter = load_adapter(adapter_path)
    out = Consumed(merged={}, base={}, layers=len(adapter.modules))
    deltas = reference_deltas(adapter, base)
    with open_checkpoint(base) as ckpt:
        for key, target in _resolved_targets(adapter, ckpt).items():
            comp = ckpt.components[target.component]
            w = np.asarray(comp.open(target.file).tensor(target.key).numpy(), np.float64)
            out.base[key], out.merged[key] = w, w + deltas[key]
    return out


def _resolved_targets(adapter: Adapter, ckpt) -> dict:
    """``component/key`` -> the base tensor each module updates (lora biases left out)."""
    unbiased = {k: dataclasses.replace(m, bias=None) for k, m in adapter.modules.items()}
    res = resolve(dataclasses.replace(adapter, modules=unbiased), ckpt)
    res.raise_for_problems(adapter)
    return {
        norm_key(match.component or match.target.component, match.target.key): match.target
        for match in res.matches.values()
    }


def reference_deltas(adapter: Adapter, base: Path) -> dict[str, np.ndarray]:
    """float64 ``scale * up @ down`` per module (and ``scale * bias`` per lora bias), in the
    layout of the base tensor it updates, keyed ``component/key``."""
    # A lora bias needs no base bias here: where there is none, PEFT's layer adds it anyway.
    unbiased = {k: dataclasses.replace(m, bias=None) for k, m in adapter.modules.items()}
    with open_checkpoint(base) as ckpt:
        res = resolve(dataclasses.replace(adapter, modules=unbiased), ckpt)
        res.raise_for_problems(adapter)
    out: dict[str, np.ndarray] = {}
    for key, match in res.matches.items():
        m = adapter.modules[key]
        d = m.delta()
        if match.transpose:
            d = d.T
        d = d.reshape(match.target.info.shape)
        component = match.component or match.target.component
        out[norm_key(component, match.target.key)] = d
        if m.bias is not None:
            bias_key = match.target.key.removesuffix(".weight") + ".bias"
            out[norm_key(component, bias_key)] = m.scale * np.asarray(m.bias.numpy(), np.float64)
    return out


def replacements(adapter: Adapter, base: Path) -> dict[str, np.ndarray]:
    """Full tensors (modules_to_save) that replace a base tensor, keyed ``component/key``."""
    with open_checkpoint(base) as ckpt:
        res = resolve(adapter, ckpt)
    out = {}
    for key, target in res.replacements.items():
        if ".base_layer." in key:
            continue  # PEFT's copy of a targeted embedding equals the base
        out[norm_key(target.component, target.key)] = np.asarray(
            adapter.passthrough[key].numpy(), np.float64
        )
    return out


def dora_merged(
    adapter: Adapter, base: Path, weights: dict[str, np.ndarray], deltas: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """DoRA: ``m * (W + dW) / ||W + dW||`` per output row, for the DoRA modules' keys."""
    with open_checkpoint(base) as ckpt:
        res = resolve(adapter, ckpt)
    out = {}
    for key, match in res.matches.items():
        m = adapter.modules[key]
        if m.magnitude is None:
            continue
        k = norm_key(match.component or match.target.component, match.target.key)
        full = weights[k] + deltas[k]
        norm = np.linalg.norm(full.reshape(full.shape[0], -1), axis=1)
        mag = np.asarray(m.magnitude.numpy(), np.float64).reshape(-1)
        out[k] = full * (mag / norm).reshape(-1, *([1] * (full.ndim - 1)))
    return out
