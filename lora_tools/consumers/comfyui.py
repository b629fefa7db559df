"""ComfyUI: what ``comfy.lora.load_lora`` reads from a LoRA file and how it applies it.

Read from comfyanonymous/ComfyUI: ``comfy/lora.py`` at 41444b5 (``load_lora``,
``model_lora_keys_unet``, ``model_lora_keys_clip``; its ``base_model.model.`` keys again in
Comfy-Org/ComfyUI at 17358c8, with ``comfy/utils.py`` ``mmdit_to_diffusers`` /
``pixart_to_diffusers`` at 09708ea, ``comfy/ldm/hydit/`` and ``comfy/sd.py``
``load_lora_for_models`` at 033046c), ``comfy/weight_adapter/lora.py`` at 0323d87
(``LoRAAdapter.load``, ``calculate_weight``) and ``comfy/weight_adapter/__init__.py`` at 0bca89e
(the adapter types). ComfyUI has no release to name, so the profile takes no version; it does
not run here (no install), so the facts are read, and its key spellings are checked against the
files loratool writes in the tests.

- ComfyUI loads one LoRA file for its diffusion models and text encoders (``LoraLoader``). Each
  module stem ``x`` the model maps (``lora_unet_*``, ``lora_te*_*``, ``diffusion_model.*``,
  ``unet.*``, ``text_encoder.*``, ``transformer.*``, ``text_encoders.*``, ``lycoris_*``,
  ``lora_transformer_*``; ``base_model.model.*`` for a few models only, :data:`PEFT_FAMILIES`)
  is looked up with the tensor spellings in :data:`READ_SUFFIXES`; every other tensor is logged
  as "lora key not loaded" and dropped.
- PEFT names (``base_model.model.<path>``, a PEFT model's own state dict): only
  ``model_lora_keys_unet`` builds them, for SD3 / SD3.5 and PixArt on their diffusers paths
  (``mmdit_to_diffusers``, ``pixart_to_diffusers``), for HunyuanDiT on ComfyUI's native paths
  (Tencent's, ``blocks.N.attn1.Wqkv``) and for ACE-Step 1.5 on its decoder's native paths (not
  modelled here: no shapes read). ``model_lora_keys_clip`` builds none: no text encoder's
  module loads from a PEFT file. Nothing strips the prefix: ``load_lora_for_models`` passes the
  file to ``lora_convert.convert_lora`` (BFL Control, Wan Fun, USO, fused-qkv conversions
  only) and looks each stem up as is. The factors are read as ``.lora_A.weight`` /
  ``.lora_B.weight`` (``LoRAAdapter.load``); a PEFT file has no ``.alpha`` tensor, so its
  modules run at scale 1 (``lora_alpha`` lives in adapter_config.json, which is not read).
- The types: LoRA (kohya, diffusers, PEFT ``lora_A`` / ``lora_B``, Mochi, transformers and
  Qwen spellings; Tucker ``lora_mid``; kohya DoRA ``dora_scale``), LoHa, LoKr, GLoRA, OFT,
  BOFT, full ``diff`` / ``diff_b``, ``w_norm`` / ``b_norm`` and ``set_weight``. PEFT's DoRA
  magnitudes (``lora_magnitude_vector``), LoRA biases (``lora_B.bias``) and embedding LoRAs
  (``lora_embedding_A``) are none of them.
- Diffusers names map only as ``model_lora_keys_unet`` / ``model_lora_keys_clip`` build them:
  an SD / SDXL UNet's attention projections as ``unet.<path>.processor.to_q`` (the old
  attention-processor spelling; ``.to_out.0`` without the ``.0``), so PEFT-style
  ``unet.<path>.to_q`` modules match nothing; text-encoder modules only as
  ``text_encoder(_2).text_model.encoder.layers.N.<mlp.fc1|mlp.fc2|self_attn.q/k/v/out_proj>``
  (the CLIP layers of ``LORA_CLIP_MAP``).
- Scale: ``alpha / rank`` from the module's ``.alpha`` tensor, 1 without one; an alpha kept
  only in metadata (diffusers' ``lora_adapter_metadata``) is not read (PR 15830, open).
"""

from __future__ import annotations

import re

from lora_tools.consumers import Consumer

CONSUMER = Consumer(
    name="comfyui",
    title="ComfyUI",
    family="LT55",
    current=(),
    oldest=(),
    checked=(
        "comfy/lora.py@41444b5",
        "comfy/lora.py@17358c8 (model_lora_keys_unet's base_model.model. keys)",
        "comfy/utils.py@09708ea",
        "comfy/weight_adapter/lora.py@0323d87",
        "comfy/weight_adapter/__init__.py@0bca89e",
    ),
    repository="comfyanonymous/ComfyUI",
)

#: Every tensor suffix ``load_lora`` (and the weight adapters' ``load``) reads after a module
#: stem.
READ_SUFFIXES = (
    # per module
    ".alpha",
    ".dora_scale",
    ".reshape_weight",
    # LoRA spellings: kohya, diffusers, PEFT / diffusers 2, diffusers 3, Mochi, transformers,
    # Qwen's default adapter
    ".lora_up.weight",
    ".lora_down.weight",
    ".lora_mid.weight",
    "_lora.up.weight",
    "_lora.down.weight",
    ".lora_B.weight",
    ".lora_A.weight",
    ".lora.up.weight",
    ".lora.down.weight",
    ".lora_B",
    ".lora_A",
    ".lora_linear_layer.up.weight",
    ".lora_linear_layer.down.weight",
    ".lora_B.default.weight",
    ".lora_A.default.weight",
    # LoHa, LoKr
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".hada_t1",
    ".hada_t2",
    ".lokr_w1",
    ".lokr_w2",
    ".lokr_w1_a",
    ".lokr_w1_b",
    ".lokr_w2_a",
    ".lokr_w2_b",
    ".lokr_t2",
    # GLoRA, OFT / BOFT
    ".a1.weight",
    ".a2.weight",
    ".b1.weight",
    ".b2.weight",
    ".oft_blocks",
    ".rescale",
    # full weights and norms
    ".w_norm",
    ".b_norm",
    ".diff",
    ".diff_b",
    ".set_weight",
)


def tensor_read(name: str) -> bool:
    """Whether ``load_lora`` reads a tensor named ``name`` (given that its module maps)."""
    return name.endswith(READ_SUFFIXES)


#: ``LORA_CLIP_MAP``'s layers: the text-encoder modules the diffusers names map to.
_CLIP_DIFFUSERS = re.compile(
    r"text_encoder(?:_2)?\.text_model\.encoder\.layers\.\d+\."
    r"(?:mlp\.fc1|mlp\.fc2|self_attn\.(?:q|k|v|out)_proj)"
)
#: A UNet attention projection spelled without ``.processor.``.
_UNET_ATTENTION = re.compile(r"\.to_(?:q|k|v|out\.0)$")


#: The up-factor spellings of ``LoRAAdapter.load``, longest first: what follows the module stem
#: ComfyUI looks up.
_UP_SPELLINGS = (
    ".lora_linear_layer.up.weight",
    ".lora_B.default.weight",
    "_lora.up.weight",
    ".lora_up.weight",
    ".lora.up.weight",
    ".lora_B.weight",
    ".lora_B",
)


def module_stem(up_key: str) -> str:
    """The module stem ``load_lora`` looks ``up_key`` up under (``...attn1.processor.to_q`` for
    ``...attn1.processor.to_q_lora.up.weight``)."""
    for spelling in _UP_SPELLINGS:
        if up_key.endswith(spelling):
            return up_key[: -len(spelling)]
    return up_key


def diffusers_name_unmapped(up_key: str) -> bool:
    """Whether the module of a diffusers-named up factor (``unet.down_blocks...attn1.to_q.
    lora_B.weight``) is one that ComfyUI's key maps never contain, so that its tensors are
    "lora key not loaded"."""
    stem = module_stem(up_key)
    if stem.startswith("unet."):
        return bool(_UNET_ATTENTION.search(stem)) and ".processor." not in stem
    if stem.startswith(("text_encoder.", "text_encoder_2.")):
        return _CLIP_DIFFUSERS.fullmatch(stem) is None
    return False


#: The models ``model_lora_keys_unet`` maps ``base_model.model.<path>`` keys for -> what the
#: paths are (ACE-Step 1.5's decoder paths, also mapped, are not modelled).
PEFT_FAMILIES = {
    "SD3 / SD3.5": "SD3Transformer2DModel's diffusers paths: transformer_blocks.N.attn.to_q...",
    "PixArt": "PixArtTransformer2DModel's diffusers paths: transformer_blocks.N.attn1.to_q...",
    "HunyuanDiT": "its native paths: blocks.N.attn1.Wqkv...",
}
#: Each family's module paths under ``base_model.model.``: the ``.weight`` keys of
#: ``mmdit_to_diffusers`` / ``pixart_to_diffusers``, and for HunyuanDiT every native weight
#: of ComfyUI's ``HunYuanDiT`` (comfy/ldm/hydit/models.py, attn_layers.py).
_PEFT_PATHS = {
    "SD3 / SD3.5": re.compile(
        r"transformer_blocks\.\d+\.(?:"
        r"attn\.(?:to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out|norm_(?:added_)?[qk])"
        r"|attn2\.(?:to_[qkv]|to_out\.0|norm_[qk])"
        r"|ff(?:_context)?\.net\.(?:0\.proj|2)"
        r"|norm1(?:_context)?\.linear)"
        r"|context_embedder|time_text_embed\.(?:timestep|text)_embedder\.linear_[12]"
        r"|pos_embed\.proj|norm_out\.linear|proj_out"
    ),
    "PixArt": re.compile(
        r"transformer_blocks\.\d+\.(?:attn[12]\.(?:to_[qkv]|to_out\.0)|ff\.net\.(?:0\.proj|2))"
        r"|adaln_single\.(?:linear|emb\.(?:resolution|aspect_ratio|timestep)_embedder\.linear_[12])"
        r"|caption_projection\.linear_[12]|pos_embed\.proj|proj_out"
    ),
    "HunyuanDiT": re.compile(
        r"blocks\.\d+\.(?:"
        r"attn1\.(?:Wqkv|out_proj|[qk]_norm)|attn2\.(?:q_proj|kv_proj|out_proj|[qk]_norm)"
        r"|mlp\.fc[12]|default_modulation\.1|skip_linear|norm[123]|skip_norm)"
        r"|mlp_t5\.[02]|extra_embedder\.[02]|x_embedder\.proj|t_embedder\.mlp\.[02]"
        r"|final_layer\.(?:linear|adaLN_modulation\.1)|style_embedder"
    ),
}


def peft_mapped(path: str, family: str) -> bool:
    """Whether ``model_lora_keys_unet`` of a ``family`` model holds ``base_model.model.<path>``
    (``path``: the module path, prefix removed)."""
    pattern = _PEFT_PATHS.get(family)
    return pattern is not None and pattern.fullmatch(path) is not None


def peft_family(paths: list[str]) -> str | None:
    """The family of :data:`PEFT_FAMILIES` whose map holds every one of ``paths`` (the first
    such, in that order), or None: what the module names alone show."""
    for family in PEFT_FAMILIES:
        if paths and all(peft_mapped(p, family) for p in paths):
            return family
    return None


def peft_closest(paths: list[str]) -> str | None:
    """The family of :data:`PEFT_FAMILIES` whose map holds the most of ``paths``; None when it
    holds none."""
    counts = {f: sum(peft_mapped(p, f) for p in paths) for f in PEFT_FAMILIES}
    best = max(counts, key=lambda f: counts[f])
    return best if counts[best] else None


#: Diffusers model classes (a ``config.json``'s ``_class_name``) -> family.
_CLASSES = {
    "SD3Transformer2DModel": "SD3 / SD3.5",
    "PixArtTransformer2DModel": "PixArt",
    "HunyuanDiT2DModel": "HunyuanDiT",
    "FluxTransformer2DModel": "Flux",
    "UNet2DConditionModel": "SD / SDXL UNet",
    "WanTransformer3DModel": "Wan",
    "HunyuanVideoTransformer3DModel": "HunyuanVideo",
    "QwenImageTransformer2DModel": "Qwen-Image",
}
#: Family <- a weight only its native single file has (``model.diffusion_model.`` /
#: ``diffusion_model.`` removed); ComfyUI's model detection reads such keys.
_NATIVE_MARKERS = (
    ("joint_blocks.0.x_block.attn.qkv.weight", "SD3 / SD3.5"),
    ("blocks.0.attn1.Wqkv.weight", "HunyuanDiT"),
    ("y_embedder.y_proj.fc1.weight", "PixArt"),
    ("double_blocks.0.img_attn.qkv.weight", "Flux"),
    ("double_blocks.0.img_attn_qkv.weight", "HunyuanVideo"),
    ("blocks.0.self_attn.q.weight", "Wan"),
    ("input_blocks.0.0.weight", "SD / SDXL UNet"),
    ("transformer_blocks.0.img_mlp.net.0.proj.weight", "Qwen-Image"),
)
_NATIVE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def base_family(keys: list[str], class_names: list[str], model_types: list[str]) -> str | None:
    """The family of a base model: a key of :data:`PEFT_FAMILIES`, another model's name
    (``Flux``, ``a transformers model (model_type llama)``...), or None when loratool cannot tell.

    Args:
        keys: the base's tensor names.
        class_names: its diffusers model classes (``_class_name`` of the ``transformer`` /
            ``unet`` config, or of a model folder's).
        model_types: the transformers ``model_type`` of a model folder without a class name.
    """
    for name in class_names:
        if name:
            return _CLASSES.get(name, name)
    present = set(keys)
    for key in keys:
        for prefix in _NATIVE_PREFIXES:
            if key.startswith(prefix):
                present.add(key[len(prefix) :])
    for marker, family in _NATIVE_MARKERS:
        if marker in present:
            return family
    for model_type in model_types:
        if model_type:
            return f"a transformers model (model_type {model_type})"
    return None


def family_title(family: str) -> str:
    """``SD3 / SD3.5 (SD3Transformer2DModel's diffusers paths...)`` for a family of
    :data:`PEFT_FAMILIES`, else the name itself."""
    paths = PEFT_FAMILIES.get(family)
    return f"{family} ({paths})" if paths else family
