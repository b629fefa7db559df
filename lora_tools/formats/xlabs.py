"""XLabs-AI x-flux LoRA files for Flux.1: attention-processor names, no alpha.

Keys (x-flux src/flux/modules/layers.py ``DoubleStreamBlockLoraProcessor`` /
``SingleStreamBlockLoraProcessor``, as diffusers' ``_convert_xlabs_flux_lora_to_diffusers``
reads them, optionally under ``diffusion_model.``): ``double_blocks.N.processor.<name>.down.weight``
``[r, in]`` and ``.up.weight`` ``[out, r]``. Each processor adds its LoRA to the output of one
BFL module (:data:`DOUBLE` / :data:`SINGLE`); the single block's ``qkv_lora`` is added to the
first ``3 * hidden`` rows of the fused ``linear1`` (its q, k, v; the mlp rows get none), which
:attr:`~lora_tools.adapter.LoraModule.rows` says.

The files store no alpha: x-flux scales by ``network_alpha / r`` with ``network_alpha`` given at
load time (None: 1), and diffusers and ComfyUI load them at scale 1, so alpha = r.

Example:
    >>> XLabsFormat().parse_key("double_blocks.3.processor.qkv_lora2.up.weight")
    ParsedKey(stem='double_blocks.3.processor.qkv_lora2', role='up', embedding=False)
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_tools.adapter import LINEAR, Adapter, LoraModule
from lora_tools.errors import UsageError
from lora_tools.formats.base import AdapterFormat, AdapterSource, ParsedKey, complete_modules
from lora_tools.io.safetensors import Tensor, save_tensors

#: Double-block processor LoRA -> the BFL module it updates (1: image stream, 2: text stream).
DOUBLE = {
    "qkv_lora1": "img_attn.qkv",
    "proj_lora1": "img_attn.proj",
    "qkv_lora2": "txt_attn.qkv",
    "proj_lora2": "txt_attn.proj",
}
#: Single-block processor LoRA -> the BFL module it updates.
SINGLE = {"qkv_lora": "linear1", "proj_lora": "linear2"}
_BLOCKS = {"double_blocks": DOUBLE, "single_blocks": SINGLE}
_NAMES = {
    (blocks, native): name for blocks, table in _BLOCKS.items() for name, native in table.items()
}

_KEY_RE = re.compile(
    r"^(?P<stem>(?:diffusion_model\.)?(?P<blocks>double_blocks|single_blocks)\.(?P<n>\d+)"
    r"\.processor\.(?P<name>[a-z_]+lora[12]?))\.(?P<role>down|up)\.weight$"
)
_PATH_RE = re.compile(r"^(?P<blocks>double_blocks|single_blocks)\.(?P<n>\d+)\.(?P<native>.+)$")


def _native(stem_match: re.Match[str]) -> str | None:
    table = _BLOCKS[stem_match.group("blocks")]
    native = table.get(stem_match.group("name"))
    if native is None:
        return None
    return f"{stem_match.group('blocks')}.{stem_match.group('n')}.{native}"


class XLabsFormat(AdapterFormat):
    """x-flux (XLabs-AI) Flux LoRA: ``<block>.N.processor.<qkv|proj>_lora*.down|up.weight``."""

    name = "xlabs"
    description = "XLabs x-flux Flux LoRA (double_blocks.N.processor.qkv_lora1.down.weight ...)"
    default_filename = "lora.safetensors"

    def claims(self, key: str) -> bool:
        m = _KEY_RE.match(key)
        return m is not None and _native(m) is not None

    def parse_key(self, key: str) -> ParsedKey | None:
        m = _KEY_RE.match(key)
        if m is None or _native(m) is None:
            return None
        return ParsedKey(m.group("stem"), m.group("role"))

    def read(self, source: AdapterSource) -> Adapter:
        adapter = Adapter(
            format=self.name, metadata=source.metadata, source=source.weights, config=None
        )
        for stem, roles in complete_modules(self, source, adapter):
            m = _KEY_RE.match(roles["down"][0])
            assert m is not None
            (down_key, down), (up_key, up) = roles["down"], roles["up"]
            path = _native(m)
            single_qkv = m.group("blocks") == "single_blocks" and m.group("name") == "qkv_lora"
            adapter.modules[stem] = LoraModule(
                key=stem,
                down=down,
                up=up,
                alpha=None,
                kind=LINEAR,
                path=path,
                component="transformer",
                keys={"down": down_key, "up": up_key},
                rows=(0, up.shape[0]) if single_qkv else None,
            )
        return adapter

    def stem_for(self, module: LoraModule) -> str:
        """The processor stem of a module on a BFL path; UsageError for any other module."""
        m = _PATH_RE.match(module.path or "")
        name = _NAMES.get((m.group("blocks"), m.group("native"))) if m else None
        single_qkv = name == "qkv_lora"
        if m is None or name is None or module.component not in (None, "transformer"):
            raise UsageError(
                f"module {module.key!r} (path {module.path!r}) is no module an x-flux "
                "processor has a LoRA for (double_blocks.N.img_attn|txt_attn.qkv|proj, "
                "single_blocks.N.linear1 q/k/v rows, single_blocks.N.linear2)",
                path=None,
                hint="keep this adapter in kohya, comfyui or diffusers format",
            )
        if single_qkv != (module.rows is not None and module.rows[0] == 0):
            raise UsageError(
                f"module {module.key!r}: x-flux's single-block qkv_lora updates the q, k, v "
                f"rows of linear1, this module rows {module.rows or 'all'}",
                path=None,
                hint="keep this adapter in kohya, comfyui or diffusers format",
            )
        return f"{m.group('blocks')}.{m.group('n')}.processor.{name}"

    def tensors_for(self, adapter: Adapter) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for m in adapter.modules.values():
            problem = None
            if m.dora or m.bias is not None or m.bias_diff is not None or m.rslora:
                problem = "has a DoRA magnitude, a bias or rsLoRA"
            elif m.scale != 1:
                problem = f"has scale {m.scale:g} (alpha {m.effective_alpha:g}, rank {m.rank})"
            if problem is not None:
                raise UsageError(
                    f"module {m.key!r} {problem}; x-flux files store no alpha and load at "
                    "scale 1, and hold LoRA factors only",
                    path=adapter.source,
                    hint="keep this adapter in kohya, comfyui or diffusers format",
                )
            try:
                stem = self.stem_for(m) if not m.keys else None
            except UsageError as exc:
                raise UsageError(exc.message, path=adapter.source, hint=exc.hint) from None
            out[m.keys.get("down") or f"{stem}.down.weight"] = m.down
            out[m.keys.get("up") or f"{stem}.up.weight"] = m.up
        out.update(adapter.passthrough)
        return out

    def write(self, adapter: Adapter, out: Path, *, refresh_hashes: bool = False) -> Path:
        if out.suffix != ".safetensors":
            raise UsageError(
                "x-flux adapters are single files", path=out, hint="give a .safetensors output path"
            )
        save_tensors(out, self.tensors_for(adapter), dict(adapter.metadata) or None)
        return out
