"""The scale each consumer applies to each module of an adapter, beside loratool's own.

loratool's scale (:attr:`~lora_tools.adapter.LoraModule.scale`) is the one the trainer meant:
PEFT's rule for PEFT folders and diffusers files (alpha / r per module with ``rank_pattern`` /
``alpha_pattern``, alpha / sqrt(r) with ``use_rslora``), kohya's alpha / r for kohya names.
Consumers do not all compute it that way. Each ``_<consumer>`` function below follows that
consumer's own loading code (docs/rules.md, LT590, names the files and versions read):

- ``peft``: ``PeftModel.from_pretrained`` (peft/tuners/lora/layer.py ``update_layer``,
  peft/utils/other.py ``get_pattern_key``): per module, the first ``rank_pattern`` /
  ``alpha_pattern`` key matching ``(.*\\.)?(KEY)$``, else ``r`` / ``lora_alpha``; the config's
  rank must equal the tensors' (else PEFT refuses the file).
- ``diffusers``: ``load_lora_weights``: a file's ``lora_adapter_metadata`` config per component
  (PEFT's rule); without it ``get_peft_kwargs`` (utils/peft_utils.py) mirrors each rank into
  its alpha (scale 1; PR 14409); SD / SDXL kohya files pass their ``.alpha`` tensors as
  ``network_alphas``, so a module without one gets its component's most common alpha; the Flux
  and other converters bake each module's own alpha / r into the factors.
- ``comfyui``: comfy/lora.py ``load_lora`` reads ``<module>.alpha`` tensors only, and
  comfy/weight_adapter/lora.py scales by ``alpha / rank`` or 1 without one (an alpha kept only
  in metadata runs at scale 1: ComfyUI PR 15830 is open); diffusers-named modules its key maps
  do not hold (PEFT-style SD UNet attention, text encoders without ``text_model.``) are left
  out; PEFT files are loaded only with the SD3, PixArt or HunyuanDiT module paths whose
  ``base_model.model.`` keys ComfyUI maps, at scale 1 (:mod:`lora_tools.consumers.comfyui`).
- ``vllm``: vllm/lora/peft_helper.py: one ``lora_alpha / r`` (``/ sqrt(r)`` with
  ``use_rslora``) from the config for every module; ``rank_pattern`` / ``alpha_pattern`` are
  not read.
- ``sglang``: python/sglang/srt/lora/lora.py ``LoRAAdapter``: one ``lora_alpha / r`` for every
  module; ``use_rslora`` is not read either (sglang issue 40835).
- ``tgi``: server/text_generation_server/adapters/lora.py ``get_scaling_factor``: one
  ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``); only ``lora_A.weight`` /
  ``lora_B.weight`` keys are mapped (embedding LoRAs are not applied).
- ``llamacpp``: convert_lora_to_gguf.py writes the config's ``lora_alpha`` as the file's one
  ``adapter.lora.alpha``; src/llama-adapter.h ``get_scale`` computes ``alpha / rank`` per
  tensor pair from that tensor's rank (so ranks from ``rank_pattern`` count, alphas from
  ``alpha_pattern`` and rsLoRA do not; an alpha of 0 means scale 1).

Only the header is read (and kohya's scalar alpha tensors); torch is never imported.

Example:
    >>> from lora_tools.formats import load_adapter
    >>> table = consumer_scales(load_adapter("fixtures/peft/llama-patterns"))  # doctest: +SKIP
    >>> [d.module for d in table.disagreements()][:1]                          # doctest: +SKIP
    ['base_model.model.model.layers.0.self_attn.q_proj']
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lora_tools.adapter import CONV, EMBEDDING, Adapter, LoraModule
from lora_tools.errors import FormatError
from lora_tools.formats.kohya import read_scalar
from lora_tools.formats.peft import diffusers_component_configs
from lora_tools.naming import PEFT_DEFAULT_ALPHA, alpha_source, config_number, pattern_key

#: LoraConfig's default ``r``: what PEFT (and TGI, which parses the config with PEFT) uses
#: when a config has none.
PEFT_DEFAULT_R = 8


@dataclass(frozen=True)
class Consumer:
    """One program that loads adapters, and where its behaviour here comes from."""

    name: str
    title: str
    source: str


CONSUMERS: dict[str, Consumer] = {
    c.name: c
    for c in (
        Consumer(
            "peft",
            "PEFT",
            "huggingface/peft 0.21.2 (installed): tuners/lora/layer.py update_layer, "
            "tuners/lora/model.py, utils/other.py get_pattern_key",
        ),
        Consumer(
            "diffusers",
            "diffusers",
            "huggingface/diffusers 0.42.1 (installed): loaders/peft.py load_lora_adapter, "
            "utils/peft_utils.py get_peft_kwargs (with PR 14409), "
            "loaders/lora_conversion_utils.py",
        ),
        Consumer(
            "comfyui",
            "ComfyUI",
            "comfyanonymous/ComfyUI comfy/lora.py load_lora, comfy/weight_adapter/lora.py "
            "(0323d87); PR 15830 (alpha from metadata) open",
        ),
        Consumer(
            "vllm",
            "vLLM",
            "vllm-project/vllm vllm/lora/peft_helper.py (e745baf), lora_weights.py "
            "from_config (055e47c); rsLoRA since PR 6909",
        ),
        Consumer(
            "sglang",
            "SGLang",
            "sgl-project/sglang python/sglang/srt/lora/lora.py LoRAAdapter (db2a4cc, 002c60a); "
            "issue 40835 (use_rslora ignored) open",
        ),
        Consumer(
            "tgi",
            "TGI",
            "huggingface/text-generation-inference server/text_generation_server/adapters/"
            "lora.py (db931fc, 2026-01-08)",
        ),
        Consumer(
            "llamacpp",
            "llama.cpp",
            "ggml-org/llama.cpp convert_lora_to_gguf.py, src/llama-adapter.h get_scale, "
            "src/llama-graph.cpp (0c1e570, 2026-10-01)",
        ),
    )
}

#: Formats whose files image / video pipelines load.
_PIPELINE_FORMATS = ("kohya", "diffusers", "diffusers-old", "comfyui")
#: SD / SDXL kohya names, which diffusers converts with network_alphas (not by baking).
_SD_KOHYA_RE = re.compile(
    r"^lora_(?:unet_(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)"
    r"|te[12]?_)"
)
_FLUX_KOHYA_RE = re.compile(r"^lora_unet_(?:double_blocks|single_blocks)_")
#: SD / SDXL UNet attention modules: diffusers names their alpha ``...to_k_lora.down.weight.alpha``
#: and the ``alpha_pattern`` key made of it matches no module (measured on diffusers 0.42.1).
_ATTENTION_KOHYA_RE = re.compile(r"transformer_blocks_\d+_attn[12]_to_(?:q|k|v|out_0)$")
#: kohya name prefix -> the diffusers component its alphas are counted in.
_KOHYA_COMPONENTS = (("lora_unet_", "unet"), ("lora_te2_", "text_encoder_2"), ("lora_te", "te"))


@dataclass(frozen=True)
class ConsumerScales:
    """What one consumer makes of the file's modules.

    Attributes:
        consumer: the consumer's name (a :data:`CONSUMERS` key).
        loads: whether it loads the file at all.
        reason: why not, when it does not (its format, a refusal, a missing config field).
        rule: how it scales this file, in one line (None when it does not load it).
        scales: module key -> the scale it applies (None: it leaves the module out).
        skipped: module key -> why it leaves that module out.
    """

    consumer: str
    loads: bool
    reason: str | None = None
    rule: str | None = None
    scales: dict[str, float | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return CONSUMERS[self.consumer].title


@dataclass(frozen=True)
class Disagreement:
    """A module the consumers (and loratool) do not scale alike.

    Attributes:
        module: the module's key stem.
        rank: its rank.
        intended: loratool's scale (None when the file does not say the alpha).
        scales: consumer -> scale, for every consumer that applies the module.
        differ: the consumers whose scale is not the intended one (when it is unknown: not
            the one most of them apply).
    """

    module: str
    rank: int
    intended: float | None
    scales: dict[str, float]
    differ: tuple[str, ...]

    def describe(self) -> str:
        """``intended 2; vllm 1, sglang 1``: each differing consumer's scale after loratool's."""
        shown = ", ".join(f"{name} {self.scales[name]:.6g}" for name in self.differ)
        agree = [n for n in self.scales if n not in self.differ]
        intended = "unknown" if self.intended is None else f"{self.intended:.6g}"
        tail = f" ({', '.join(agree)} apply {intended})" if agree and self.intended else ""
        return f"loratool's scale {intended}; {shown}{tail}"


@dataclass(frozen=True)
class ScaleTable:
    """Every module's scale, as loratool and as each consumer applies it."""

    modules: tuple[LoraModule, ...]
    consumers: tuple[ConsumerScales, ...]

    def intended(self, m: LoraModule) -> float | None:
        return None if m.alpha_unknown is not None else m.scale

    def loading(self) -> list[ConsumerScales]:
        return [c for c in self.consumers if c.loads]

    def row(self, m: LoraModule) -> dict[str, float | None]:
        """consumer -> scale for one module (loading consumers only; None: left out)."""
        return {c.consumer: c.scales.get(m.key) for c in self.loading()}

    def differ(self, m: LoraModule) -> tuple[str, ...]:
        """The consumers whose scale for ``m`` is not loratool's (or, with the scale unknown,
        not the one most consumers apply)."""
        applied = {k: v for k, v in self.row(m).items() if v is not None}
        reference = self.intended(m)
        if reference is None:
            if len(applied) < 2:
                return ()
            reference = Counter(applied.values()).most_common(1)[0][0]
        return tuple(k for k, v in applied.items() if not same_scale(v, reference))

    def disagreements(self) -> list[Disagreement]:
        """One entry per module that some loading consumer scales differently."""
        out = []
        for m in self.modules:
            differ = self.differ(m)
            if differ:
                applied = {k: v for k, v in self.row(m).items() if v is not None}
                out.append(Disagreement(m.key, m.rank, self.intended(m), applied, differ))
        return out

    def to_json(self) -> dict[str, Any]:
        """``inspect --json``'s ``consumers`` object (docs/json.md)."""
        return {
            "consumers": [
                {
                    "name": c.consumer,
                    "title": c.title,
                    "loads": c.loads,
                    "reason": c.reason,
                    "rule": c.rule,
                    "source": CONSUMERS[c.consumer].source,
                }
                for c in self.consumers
            ],
            "modules": [
                {
                    "module": m.key,
                    "rank": m.rank,
                    "intended": self.intended(m),
                    "scales": self.row(m),
                    "skipped": {
                        c.consumer: c.skipped[m.key] for c in self.loading() if m.key in c.skipped
                    },
                    "differ": list(self.differ(m)),
                }
                for m in self.modules
            ],
            "disagreements": len(self.disagreements()),
        }


def same_scale(a: float, b: float) -> bool:
    """Whether two scales are the same number (float32 rounding apart at most)."""
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def consumer_scales(adapter: Adapter, consumers: Iterable[str] | None = None) -> ScaleTable:
    """The scale every consumer (or those named) applies to each LoRA module of ``adapter``.

    Modules of other types (LoHa, LoKr...) are not compared: the serving engines load LoRA only.

    Raises:
        KeyError: a name that is no :data:`CONSUMERS` key.
    """
    names = list(CONSUMERS) if consumers is None else list(consumers)
    for name in names:
        if name not in CONSUMERS:
            raise KeyError(name)
    return ScaleTable(
        modules=tuple(adapter.modules.values()),
        consumers=tuple(_RULES[name](adapter) for name in names),
    )


# -- helpers -------------------------------------------------------------------------------


def _not_loaded(name: str, reason: str) -> ConsumerScales:
    return ConsumerScales(name, loads=False, reason=reason)


def _serving_model(adapter: Adapter) -> bool:
    """A PEFT folder for a language model: what the serving engines load (no pipeline
    component, no convolution)."""
    mods = adapter.modules.values()
    return adapter.format == "peft" and all(m.component is None and m.kind != CONV for m in mods)


def _format_reason(adapter: Adapter, what: str) -> str:
    return f"{what}; this is a {adapter.format} file"


def _stored_alpha(m: LoraModule) -> float | None:
    """A kohya-style module's alpha tensor as stored (0 stays 0), or None without one."""
    return None if m.alpha_tensor is None else read_scalar(m.alpha_tensor)


def _divide(alpha: float, rank: float, rslora: bool = False) -> float:
    denom = math.sqrt(rank) if rslora else rank
    return alpha / denom


class _ConfigProblem(Exception):
    """A config field the consumer cannot use: it does not load the file."""


def _number(config: dict[str, Any], key: str, default: float | None) -> float:
    if key not in config:
        if default is None:
            raise _ConfigProblem(f"its config has no {key!r}")
        return float(default)
    value = config_number(config[key])
    if not math.isfinite(value):
        raise _ConfigProblem(f"{key} is {config[key]!r}, not a number")
    return value


def _peft_params(config: dict[str, Any], path: str) -> tuple[float, float, bool]:
    """``(r, alpha, use_rslora)`` PEFT gives module ``path`` under ``config``."""
    try:
        ranks = config.get("rank_pattern") or {}
        key = pattern_key(ranks, path, name="rank_pattern") if isinstance(ranks, dict) else None
        r = config_number(ranks[key]) if key is not None else _number(config, "r", PEFT_DEFAULT_R)
        _, raw = alpha_source(config, path)
    except FormatError as exc:
        raise _ConfigProblem(exc.message) from None
    alpha = config_number(raw)
    if not (math.isfinite(r) and r > 0 and math.isfinite(alpha)):
        raise _ConfigProblem(f"module {path!r}: r {r!r} / lora_alpha {raw!r} are not numbers")
    return r, alpha, bool(config.get("use_rslora", False))


def _peft_rule(name: str, adapter: Adapter, configs: Callable[[LoraModule], dict | None]):
    """Scales under PEFT's per-module rule, each module under ``configs(m)``; modules whose
    config is None are skipped by the caller."""
    scales: dict[str, float | None] = {}
    for m in adapter.modules.values():
        config = configs(m)
        if config is None:
            continue
        try:
            r, alpha, rslora = _peft_params(config, m.path or "")
        except _ConfigProblem as exc:
            return None, _not_loaded(name, f"{exc}: LoraConfig cannot be built")
        if r != m.rank:
            return None, _not_loaded(
                name,
                f"module {m.key!r} has rank {m.rank} but the config gives it {r:g}: "
                "PEFT refuses the file (size mismatch, LT304)",
            )
        scales[m.key] = _divide(alpha, r, rslora)
    return scales, None


# -- the consumers ---------------------------------------------------------------------------


def _peft(adapter: Adapter) -> ConsumerScales:
    if adapter.format != "peft":
        return _not_loaded(
            "peft",
            _format_reason(
                adapter, "PeftModel.from_pretrained loads PEFT folders with adapter_config.json"
            ),
        )
    config = adapter.config
    if config is None:
        return _not_loaded("peft", "no adapter_config.json: PeftModel.from_pretrained fails")
    if str(config.get("peft_type", "")).upper() != "LORA":
        return _not_loaded(
            "peft", f"peft_type is {config.get('peft_type')!r}: PEFT builds no LoRA layers (LT303)"
        )
    scales, refused = _peft_rule("peft", adapter, lambda m: config)
    if refused is not None:
        return refused
    return ConsumerScales(
        "peft",
        loads=True,
        rule="per module: alpha / r from lora_alpha, r and the first matching "
        "rank_pattern / alpha_pattern key"
        + (" (rsLoRA: alpha / sqrt(r))" if _rslora(config) else ""),
        scales=scales,
    )


def _rslora(config: dict[str, Any] | None) -> bool:
    return bool((config or {}).get("use_rslora", False))


def _diffusers(adapter: Adapter) -> ConsumerScales:
    fmt = adapter.format
    mods = list(adapter.modules.values())
    if fmt == "diffusers":
        configs = diffusers_component_configs(adapter.metadata)
        with_config = {m.key: configs.get(m.component or "") for m in mods}
        scales, refused = _peft_rule("diffusers", adapter, lambda m: with_config[m.key])
        if refused is not None:
            return refused
        without = [m for m in mods if with_config[m.key] is None]
        for m in without:
            scales[m.key] = 1.0
        rule = (
            "per component: the lora_adapter_metadata config, PEFT's rule"
            if not without
            else "no lora_adapter_metadata for "
            + ", ".join(sorted({m.component or "?" for m in without}))
            + ": every alpha mirrors its rank (scale 1)"
        )
        return ConsumerScales("diffusers", loads=True, rule=rule, scales=scales)
    if fmt == "diffusers-old":
        return ConsumerScales(
            "diffusers",
            loads=True,
            rule="old attention-processor keys carry no alpha: scale 1",
            scales={m.key: 1.0 for m in mods},
        )
    if fmt == "kohya" and _sd_kohya(mods):
        return _diffusers_network_alphas(mods)
    if fmt in ("kohya", "comfyui"):
        scales = {}
        for m in mods:
            alpha = _stored_alpha(m)
            scales[m.key] = 1.0 if alpha is None else _divide(alpha, m.rank)
        return ConsumerScales(
            "diffusers",
            loads=True,
            rule="the converter bakes each module's own alpha / r into the factors "
            "(no alpha tensor: scale 1)",
            scales=scales,
        )
    return _not_loaded(
        "diffusers",
        _format_reason(
            adapter,
            "load_lora_weights reads pipeline LoRA files: diffusers, kohya or ComfyUI names",
        ),
    )


def _sd_kohya(mods: list[LoraModule]) -> bool:
    """SD / SDXL kohya names (not Flux's): diffusers' ``_convert_non_diffusers_lora_to_diffusers``
    path, whose alphas become ``network_alphas``."""
    if any(_FLUX_KOHYA_RE.match(m.key) for m in mods):
        return False
    return any(_SD_KOHYA_RE.match(m.key) for m in mods)


def _kohya_component(key: str) -> str:
    return next((comp for prefix, comp in _KOHYA_COMPONENTS if key.startswith(prefix)), "unet")


def _diffusers_network_alphas(mods: list[LoraModule]) -> ConsumerScales:
    """``get_peft_kwargs`` per component on SD / SDXL kohya files.

    ``lora_alpha`` is the component's most common stored alpha (the first seen in key order on
    a tie), and only other alphas go into ``alpha_pattern``: a module without an alpha tensor
    gets the common one, not its rank. The pattern keys are made from diffusers' converted
    names, and for UNet attention modules (``attn1`` / ``attn2`` ``to_q`` / ``to_k`` /
    ``to_v`` / ``to_out.0``) and every text-encoder module they match no module, so those
    modules get the common alpha too, whatever theirs says (measured on diffusers 0.42.1).
    Without any alpha tensor in the component every module runs at scale 1.
    """
    by_component: dict[str, list[LoraModule]] = {}
    for m in sorted(mods, key=lambda m: m.keys.get("down", m.key)):
        by_component.setdefault(_kohya_component(m.key), []).append(m)
    scales: dict[str, float | None] = {}
    borrowed = dropped = 0
    for component, members in by_component.items():
        stored = [(m, _stored_alpha(m)) for m in members]
        alphas = [a for _, a in stored if a is not None]
        common = Counter(alphas).most_common(1)[0][0] if alphas else None
        for m, alpha in stored:
            if common is None:
                scales[m.key] = 1.0
                continue
            if alpha is None:
                borrowed += 1
                alpha = common
            elif alpha != common and (component != "unet" or _ATTENTION_KOHYA_RE.search(m.key)):
                dropped += 1
                alpha = common
            scales[m.key] = _divide(alpha, m.rank)
    rule = "network_alphas per component: the most common alpha, other alphas as alpha_pattern"
    if borrowed:
        rule += f"; {borrowed} modules without an alpha get the most common one"
    if dropped:
        rule += f"; {dropped} attention / text-encoder modules lose their own alpha to it"
    return ConsumerScales("diffusers", loads=True, rule=rule, scales=scales)


def _comfyui(adapter: Adapter) -> ConsumerScales:
    if adapter.format == "peft" and _comfyui_peft_family(adapter):
        # SD3 / PixArt / HunyuanDiT PEFT names: no .alpha tensor, so scale 1 (lora_alpha is in
        # adapter_config.json, which ComfyUI does not read)
        scales = {m.key: 1.0 for m in adapter.modules.values()}
        return ConsumerScales("comfyui", loads=True, rule=_COMFYUI_PEFT_RULE, scales=scales)
    if adapter.format not in _PIPELINE_FORMATS:
        return _not_loaded(
            "comfyui",
            _format_reason(adapter, "loratool models ComfyUI on pipeline LoRA files only"),
        )
    scales: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    for m in adapter.modules.values():
        if adapter.format in ("diffusers", "diffusers-old") and comfyui_unmapped(m):
            scales[m.key] = None
            skipped[m.key] = (
                "ComfyUI's key maps hold no such diffusers name: 'lora key not loaded' (LT554)"
            )
            continue
        alpha = _stored_alpha(m)
        scales[m.key] = 1.0 if alpha is None else _divide(alpha, m.rank)
    rule = "each module's .alpha tensor / rank; scale 1 without one"
    if adapter.format == "diffusers" and diffusers_component_configs(adapter.metadata):
        rule += " (the lora_adapter_metadata alpha is not read: ComfyUI PR 15830)"
    return ConsumerScales("comfyui", loads=True, rule=rule, scales=scales, skipped=skipped)


_COMFYUI_PEFT_RULE = (
    "scale 1: a PEFT file has no .alpha tensor, and adapter_config.json's lora_alpha is not read"
)


def _comfyui_peft_family(adapter: Adapter) -> str | None:
    """The model family whose ``base_model.model.`` keys ComfyUI maps that every module path of
    a PEFT file fits (:func:`lora_tools.consumers.comfyui.peft_family`)."""
    from lora_tools.consumers.comfyui import peft_family

    return peft_family([m.path or m.key for m in adapter.modules.values()])


def comfyui_unmapped(m: LoraModule) -> bool:
    """A diffusers-named module ComfyUI's key maps never hold (an SD UNet's attention
    projection without ``.processor.``, a text-encoder module without ``text_model.``)."""
    from lora_tools.consumers.comfyui import diffusers_name_unmapped

    return "up" in m.keys and diffusers_name_unmapped(m.keys["up"])


def _served(name: str, what: str) -> Callable[[Adapter], ConsumerScales | None]:
    """The common gate of the serving engines: a PEFT folder of a language model."""

    def gate(adapter: Adapter) -> ConsumerScales | None:
        if not _serving_model(adapter):
            return _not_loaded(
                name, _format_reason(adapter, f"{what} loads PEFT folders of language models")
            )
        if adapter.config is None:
            return _not_loaded(
                name, "no adapter_config.json: the server reads r and lora_alpha there"
            )
        return None

    return gate


def _global(
    name: str, adapter: Adapter, scale: float, rule: str, skip: Callable[[LoraModule], str | None]
) -> ConsumerScales:
    scales: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    for m in adapter.modules.values():
        why = skip(m)
        scales[m.key] = None if why else scale
        if why:
            skipped[m.key] = why
    return ConsumerScales(name, loads=True, rule=rule, scales=scales, skipped=skipped)


def _never(m: LoraModule) -> str | None:
    return None


def _vllm(adapter: Adapter) -> ConsumerScales:
    refused = _served("vllm", "vLLM")(adapter)
    if refused is not None:
        return refused
    config = adapter.config or {}
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        return _not_loaded("vllm", f"its config has no {missing[0]!r}: PEFTHelper.from_dict fails")
    if config.get("modules_to_save"):
        return _not_loaded("vllm", "modules_to_save is not empty: vLLM refuses the adapter")
    if config.get("use_dora"):
        return _not_loaded("vllm", "use_dora: vLLM refuses DoRA adapters")
    try:
        r, alpha = _number(config, "r", None), _number(config, "lora_alpha", None)
    except _ConfigProblem as exc:
        return _not_loaded("vllm", str(exc))
    rslora = _rslora(config)
    rule = f"one scale for every module: lora_alpha / {'sqrt(r)' if rslora else 'r'}"
    return _global("vllm", adapter, _divide(alpha, r, rslora), _patterns_note(config, rule), _never)


def _patterns_note(config: dict[str, Any], rule: str) -> str:
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return rule + "; rank_pattern / alpha_pattern are not read"
    return rule


def _sglang(adapter: Adapter) -> ConsumerScales:
    refused = _served("sglang", "SGLang")(adapter)
    if refused is not None:
        return refused
    config = adapter.config or {}
    try:
        r, alpha = _number(config, "r", None), _number(config, "lora_alpha", None)
    except _ConfigProblem as exc:
        return _not_loaded("sglang", f"{exc}: LoRAConfig fails")
    rule = "one scale for every module: lora_alpha / r"
    if _rslora(config):
        rule += "; use_rslora is not read"
    return _global("sglang", adapter, _divide(alpha, r), _patterns_note(config, rule), _never)


def _tgi(adapter: Adapter) -> ConsumerScales:
    refused = _served("tgi", "TGI")(adapter)
    if refused is not None:
        return refused
    config = adapter.config or {}
    try:
        r = _number(config, "r", PEFT_DEFAULT_R)
        alpha = _number(config, "lora_alpha", PEFT_DEFAULT_ALPHA)
    except _ConfigProblem as exc:
        return _not_loaded("tgi", str(exc))
    rslora = _rslora(config)
    rule = f"one scale for every module: lora_alpha / {'sqrt(r)' if rslora else 'r'}"

    def skip(m: LoraModule) -> str | None:
        if m.kind == EMBEDDING:
            return "TGI maps lora_A.weight / lora_B.weight keys only"
        return None

    return _global("tgi", adapter, _divide(alpha, r, rslora), _patterns_note(config, rule), skip)


def _llamacpp(adapter: Adapter) -> ConsumerScales:
    if adapter.format == "gguf":  # its own file: the GGUF reader's modules carry its scale
        return ConsumerScales(
            "llamacpp",
            loads=True,
            rule="the file's adapter.lora.alpha / each tensor's rank (1 when alpha is 0)",
            scales={m.key: m.scale for m in adapter.modules.values()},
        )
    refused = _served("llamacpp", "convert_lora_to_gguf.py")(adapter)
    if refused is not None:
        return refused
    config = adapter.config or {}
    try:
        alpha = _number(config, "lora_alpha", None)
    except _ConfigProblem as exc:
        return _not_loaded("llamacpp", f"{exc}: convert_lora_to_gguf.py fails")
    scales: dict[str, float | None] = {}
    for m in adapter.modules.values():
        scales[m.key] = 1.0 if alpha == 0 else _divide(alpha, m.rank)
    rule = "one adapter.lora.alpha (lora_alpha) / each tensor's rank"
    extras = [
        n
        for n, on in (
            ("alpha_pattern", config.get("alpha_pattern")),
            ("use_rslora", _rslora(config)),
        )
        if on
    ]
    if extras:
        rule += f"; {' and '.join(extras)} not read"
    return ConsumerScales("llamacpp", loads=True, rule=rule, scales=scales)


_RULES: dict[str, Callable[[Adapter], ConsumerScales]] = {
    "peft": _peft,
    "diffusers": _diffusers,
    "comfyui": _comfyui,
    "vllm": _vllm,
    "sglang": _sglang,
    "tgi": _tgi,
    "llamacpp": _llamacpp,
}
