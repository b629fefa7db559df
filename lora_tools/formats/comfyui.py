"""ComfyUI-style LoRA files: the model's own (native) module paths under ComfyUI's prefixes.

Keys: ``diffusion_model.<native path>.<role>`` for the denoiser (BFL / SGM / original names,
e.g. ``diffusion_model.double_blocks.0.img_attn.qkv``), and
``text_encoders.<clip_l|clip_g|t5xxl>.transformer.<path>`` for text encoders. Roles, all of
which ComfyUI's comfy/lora.py ``load_lora`` reads: ``lora_down.weight`` or ``lora_A.weight``
(down), ``lora_up.weight`` or ``lora_B.weight`` (up), ``alpha`` (a missing one is alpha = r),
``diff_b`` (a bias difference: :attr:`~lora_tools.adapter.LoraModule.bias_diff`). OneTrainer's
COMFY output writes these names with ``lora_A`` / ``lora_B`` and ``alpha``.

Example:
    >>> ComfyUIFormat().parse_key("diffusion_model.x.lora_A.weight")
    ParsedKey(stem='diffusion_model.x', role='down', embedding=False)
    >>> ComfyUIFormat().locate("diffusion_model.double_blocks.0.img_attn.qkv")
    ('transformer', 'double_blocks.0.img_attn.qkv')
"""

from __future__ import annotations

import re

from lora_tools.adapter import LoraModule
from lora_tools.formats.base import classify_foreign
from lora_tools.formats.kohya import KohyaFormat
from lora_tools.naming import denoiser_component, flatten_path

DENOISER_PREFIX = "diffusion_model."
TEXT_ENCODERS_PREFIX = "text_encoders."
#: ComfyUI's text-encoder names -> diffusers pipeline components (SDXL / SD3 order; Flux's
#: T5 is its pipeline's ``text_encoder_2``).
TEXT_ENCODERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
_COMPONENT_TEXT_ENCODER = {v: k for k, v in TEXT_ENCODERS.items()}
_TEXT_ENCODER_RE = re.compile(r"^text_encoders\.(?P<name>[A-Za-z0-9_]+)\.(?:transformer\.)?")

_ROLE_RE = re.compile(
    r"^(?P<stem>(?:diffusion_model|text_encoders)\..+)\.(?P<role>lora_down\.weight|lora_A\.weight|"
    r"lora_up\.weight|lora_B\.weight|alpha|diff_b)$"
)
_ROLES = {
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "alpha": "alpha",
    "diff_b": "bias_diff",
}


class ComfyUIFormat(KohyaFormat):
    """``diffusion_model.`` / ``text_encoders.`` keys with native module paths."""

    name = "comfyui"
    description = (
        "ComfyUI (diffusion_model.* / text_encoders.*.transformer.* native paths, "
        "lora_down / lora_up or lora_A / lora_B, alpha, diff_b)"
    )
    default_filename = "lora.safetensors"
    role_re = _ROLE_RE
    roles = _ROLES

    def claims(self, key: str) -> bool:
        if not key.startswith((DENOISER_PREFIX, TEXT_ENCODERS_PREFIX)):
            return False
        return self.parse_key(key) is not None or classify_foreign(key) is not None

    def score(self, keys: list[str], metadata: dict[str, str]) -> int:
        """Twice the keys claimed: the PEFT and kohya readers claim the same role suffixes, but
        under ComfyUI's prefixes the names are ComfyUI's (and so is the ``alpha`` they skip)."""
        return 2 * super().score(keys, metadata)

    def locate(self, stem: str) -> tuple[str | None, str | None]:
        """``(component, native dotted path)``: ``diffusion_model.`` is the UNet or the
        transformer (the path says which); a text encoder ComfyUI names otherwise than
        :data:`TEXT_ENCODERS` has no known component."""
        if stem.startswith(DENOISER_PREFIX):
            path = stem[len(DENOISER_PREFIX) :]
            return denoiser_component(flatten_path(path)), path
        m = _TEXT_ENCODER_RE.match(stem)
        if m is None:
            return None, stem
        return TEXT_ENCODERS.get(m.group("name")), stem[m.end() :]

    def stem_for(self, module: LoraModule) -> str:
        """``diffusion_model.<path>`` / ``text_encoders.<name>.transformer.<path>``: the path
        must be the native one (ComfyUI maps no diffusers names under these prefixes)."""
        path = module.path or module.key
        name = _COMPONENT_TEXT_ENCODER.get(module.component or "")
        if name is not None:
            return f"{TEXT_ENCODERS_PREFIX}{name}.transformer.{path}"
        return DENOISER_PREFIX + path
