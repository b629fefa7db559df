"""How each format names a module: every naming fact, below the formats that use it.

A module is one layer of one pipeline component. PEFT keys spell it
``base_model.model.<dotted path>``, diffusers keys ``<component>.<dotted path>``, kohya names
``<prefix>_<path with every . replaced by _>`` (the prefix names the component). The formats
read and write these names (:mod:`lora_tools.formats`); base-weight resolution
(:mod:`lora_tools.resolve`), the operations and validate's rules compare modules across formats
with the same helpers, so that no module outside ``formats/`` spells a format's names itself.

It imports only the bottom layer (:mod:`lora_tools.errors`, :mod:`lora_tools.patterns`):
every layer may use it, the adapter model included.

Example:
    >>> split_stem("base_model.model.layers.0.q_proj")
    (None, 'layers.0.q_proj')
    >>> split_name("lora_te1_text_model_encoder_layers_0_mlp_fc1")
    ('text_encoder', 'text_model_encoder_layers_0_mlp_fc1')
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from lora_tools import patterns as patterns_mod
from lora_tools.errors import FormatError

if TYPE_CHECKING:
    from lora_tools.adapter import LoraModule

# -- PEFT and diffusers --------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."
#: Pipeline components whose PEFT-style keys diffusers prefixes with the component name.
COMPONENTS = (
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "prior",
    "decoder",
)


def split_stem(stem: str) -> tuple[str | None, str]:
    """``(component, module path)`` for a PEFT or diffusers key stem."""
    if stem.startswith(PEFT_PREFIX):
        return None, stem[len(PEFT_PREFIX) :]
    head, _, rest = stem.partition(".")
    if head in COMPONENTS and rest:
        rest = rest[len(PEFT_PREFIX) :] if rest.startswith(PEFT_PREFIX) else rest
        return head, rest
    return None, stem


def target_paths(modules: Iterable[LoraModule]) -> list[str]:
    """``target_modules`` that select exactly ``modules``: their full paths (PEFT matches a list
    entry by name or ``.``-suffix, so layer names alone would also create empty layers for
    every other layer of that name). CLIP text-encoder paths drop their ``text_model.`` root:
    the suffix matches the module under transformers 4 and 5 alike.

    Example:
        >>> from lora_tools.adapter import LoraModule
        >>> target_paths([LoraModule("k", None, None, None, "linear", path="a.q_proj")])
        ['a.q_proj']
    """
    out = set()
    for m in modules:
        path = m.path or m.key
        if (m.component or "").startswith("text_encoder"):
            path = path.removeprefix("text_model.")
        out.add(path)
    return sorted(out)


# -- kohya ----------------------------------------------------------------------------------------

#: kohya name prefix -> diffusers pipeline component.
KOHYA_PREFIXES: dict[str, str] = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
    "lora_transformer": "transformer",
}
#: component -> the prefix loratool writes.
KOHYA_COMPONENT_PREFIX = {
    "unet": "lora_unet",
    "transformer": "lora_unet",
    "text_encoder": "lora_te",
    "text_encoder_2": "lora_te2",
    "text_encoder_3": "lora_te3",
}
#: A kohya (or LyCORIS) name prefix at the start of a key.
KOHYA_PREFIX_RE = re.compile(r"^(lora_unet|lora_te[123]?|lora_transformer|lycoris)_")


def flatten_path(path: str) -> str:
    """A module path as kohya spells it: ``a.b_c.0`` -> ``a_b_c_0``."""
    return path.replace(".", "_")


#: Module roots of transformers' CLIPTextModel: sd-scripts names them under ``text_model.``
#: (transformers 4), which transformers 5 and diffusers files leave out.
_CLIP_ROOTS = ("encoder.layers.", "embeddings.", "final_layer_norm")


def kohya_name(component: str | None, path: str) -> str:
    """The kohya module name of ``path`` in ``component``.

    Example:
        >>> kohya_name("text_encoder", "encoder.layers.0.self_attn.q_proj")
        'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
    """
    prefix = KOHYA_COMPONENT_PREFIX.get(component or "unet", "lora_unet")
    if component in ("text_encoder", "text_encoder_2") and path.startswith(_CLIP_ROOTS):
        path = "text_model." + path
    return f"{prefix}_{flatten_path(path)}"


#: Flattened module roots of a UNet, in diffusers (``down_blocks``) and original / SGM
#: (``input_blocks``) layout. A denoiser name (``lora_unet_``, ``lycoris_``) whose path starts
#: otherwise is a transformer's (Flux / SD3 / Wan / HunyuanVideo, diffusers or native names).
_UNET_FLAT_ROOTS = (
    "down_blocks_",
    "up_blocks_",
    "mid_block_",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding_linear_",
    "add_embedding_",
    "class_embedding_",
    "input_blocks_",
    "middle_block_",
    "output_blocks_",
    "time_embed_",
    "label_emb_",
    "out_0",
    "out_2",
)


def denoiser_component(flat: str) -> str:
    """``unet`` or ``transformer``: the pipeline component a flattened denoiser path names.

    sd-scripts and musubi-tuner write every denoiser as ``lora_unet_`` and LyCORIS as
    ``lycoris_``; the path says which model it is.

    Example:
        >>> denoiser_component("double_blocks_0_img_attn_qkv")
        'transformer'
        >>> denoiser_component("input_blocks_4_1_proj_in")
        'unet'
    """
    return "unet" if flat.startswith(_UNET_FLAT_ROOTS) else "transformer"


def split_name(stem: str) -> tuple[str | None, str]:
    """``(component, flattened path)`` of a kohya module name (``lora_unet_`` and LyCORIS'
    ``lycoris_`` name the denoiser: :func:`denoiser_component` says which)."""
    m = KOHYA_PREFIX_RE.match(stem)
    if m is None:
        return None, stem
    flat = stem[m.end() :]
    prefix = m.group(1)
    if prefix in ("lora_unet", "lycoris"):
        return denoiser_component(flat), flat
    return KOHYA_PREFIXES.get(prefix), flat


#: Layer names recognised at the end of flattened (kohya) module names, longest first.
FLAT_TARGET_NAMES = sorted(
    [
        "to_q",
        "to_k",
        "to_v",
        "to_out_0",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "out_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "fc1",
        "fc2",
        "proj_in",
        "proj_out",
        "ff_net_0_proj",
        "ff_net_2",
        "conv1",
        "conv2",
        "conv_shortcut",
        "conv",
        "time_emb_proj",
        "img_attn_qkv",
        "img_attn_proj",
        "txt_attn_qkv",
        "txt_attn_proj",
        "img_mlp_0",
        "img_mlp_2",
        "txt_mlp_0",
        "txt_mlp_2",
        "img_mod_lin",
        "txt_mod_lin",
        "linear1",
        "linear2",
        "modulation_lin",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "c_attn",
        "c_proj",
        "c_fc",
        "qkv",
        "proj",
        "emb_layers_1",
        "in_layers_2",
        "out_layers_3",
        "skip_connection",
        "op",
        "norm_out_linear",
    ],
    key=len,
    reverse=True,
)


def flat_target_name(name: str) -> str:
    """The layer a flattened (kohya) module name targets: a known layer name at its end
    (``to_out_0`` is ``to_out.0``), else the part after the last ``_<digits>_`` (after the
    kohya prefix for a module outside the blocks: ``lora_unet_img_in`` targets ``img_in``).

    Example:
        >>> flat_target_name("lora_unet_down_blocks_0_attentions_0_to_out_0")
        'to_out.0'
    """
    for known in FLAT_TARGET_NAMES:
        if name.endswith("_" + known) or name == known:
            return "to_out.0" if known == "to_out_0" else known
    return re.split(r"_\d+_", split_name(name)[1])[-1]


# -- PEFT config patterns: which config entry speaks for a module ----------------------------------

#: ``LoraConfig.lora_alpha``'s default: what PEFT uses when a config has no ``lora_alpha``.
PEFT_DEFAULT_ALPHA = 8


def pattern_key(patterns: dict[str, Any], path: str, *, name: str = "pattern") -> str | None:
    """The first pattern key that PEFT would match against module ``path``, or None.

    Matching takes time linear in ``path`` whatever the keys are (:mod:`lora_tools.patterns`).

    Raises:
        FormatError: a key PEFT cannot use (it fails to load the config on it), or one that
            cannot be matched in bounded time; ``name`` (``alpha_pattern``) says whose key.
    """
    for key in patterns:
        try:
            if patterns_mod.peft_pattern_matches(str(key), path):
                return key
        except patterns_mod.PatternError as exc:
            raise FormatError(
                f"{name} key {key!r} {exc}",
                hint=f"write {name} keys as module names or simple regexes "
                "(PEFT matches them as (.*\\.)?(KEY)$)",
                kind="config-invalid",
            ) from None
    return None


def config_number(value: object) -> float:
    """A JSON config number as a float: NaN for anything PEFT cannot divide by r.

    Strings, objects, lists, booleans and null are not numbers (PEFT's ``lora_alpha / r``
    fails on them, or silently treats true as 1); integers too large for a float become
    +-inf instead of raising OverflowError.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("nan")
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def alpha_source(config: dict[str, Any], path: str) -> tuple[str, object]:
    """Which config entry gives module ``path`` its alpha (a pattern key, ``lora_alpha``, or
    LoraConfig's default when there is none), and the value it holds there."""
    alpha_pattern = config.get("alpha_pattern") or {}
    key = (
        pattern_key(alpha_pattern, path, name="alpha_pattern")
        if isinstance(alpha_pattern, dict)
        else None
    )
    if key is not None:
        return f"alpha_pattern[{key!r}]", alpha_pattern[key]
    if "lora_alpha" in config:
        return "lora_alpha", config["lora_alpha"]
    return "lora_alpha (absent: LoraConfig's default)", PEFT_DEFAULT_ALPHA
