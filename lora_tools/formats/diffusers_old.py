"""Older diffusers LoRA spellings (attention processors and LoRACompatible layers).

- ``<path>.processor.to_q_lora.down.weight`` / ``.up.weight`` (``to_out_lora`` is ``to_out.0``)
- ``<path>.lora.down.weight`` / ``.lora.up.weight``
- ``<path>.lora_linear_layer.down.weight`` / ``.up.weight`` (text encoders)

These files carry no alpha: the scale is 1. Keys without a component prefix belong to the UNet.
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_tools.adapter import CONV, LINEAR, Adapter, LoraModule
from lora_tools.constants import DIFFUSERS_WEIGHTS_NAME
from lora_tools.errors import UsageError
from lora_tools.formats.base import AdapterFormat, AdapterSource, ParsedKey, add_foreign
from lora_tools.io.atomic import atomic_dir
from lora_tools.io.safetensors import Tensor, save_tensors
from lora_tools.naming import COMPONENTS

_PROCESSOR_RE = re.compile(
    r"^(?P<stem>(?P<parent>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora)"
    r"\.(?P<role>down|up)\.weight$"
)
_LAYER_RE = re.compile(
    r"^(?P<stem>(?P<parent>.+)\.(?:lora|lora_linear_layer))\.(?P<role>down|up)\.weight$"
)


def split_key(key: str) -> tuple[str, str, str] | None:
    """``(stem, module path with component, role)`` for an old diffusers key, else None.

    The one grammar of this format: :meth:`DiffusersOldFormat.parse_key` and the reader both
    use it.

    Example:
        >>> split_key("down_blocks.0.attn.processor.to_out_lora.up.weight")
        ('down_blocks.0.attn.processor.to_out_lora', 'down_blocks.0.attn.to_out.0', 'up')
    """
    m = _PROCESSOR_RE.match(key)
    if m is not None:
        proj = "to_out.0" if m.group("proj") == "to_out" else m.group("proj")
        return m.group("stem"), f"{m.group('parent')}.{proj}", m.group("role")
    m = _LAYER_RE.match(key)
    if m is not None:
        return m.group("stem"), m.group("parent"), m.group("role")
    return None


class DiffusersOldFormat(AdapterFormat):
    """Legacy diffusers attention-processor and LoRA-layer keys (read, and written back as is)."""

    name = "diffusers-old"
    description = "older diffusers spellings (processor.to_q_lora, .lora.down, lora_linear_layer)"
    default_filename = DIFFUSERS_WEIGHTS_NAME

    def claims(self, key: str) -> bool:
        return split_key(key) is not None

    def parse_key(self, key: str) -> ParsedKey | None:
        """``<stem>.down.weight`` / ``.up.weight`` -> ``(stem, role)`` (see :func:`split_key`)."""
        parsed = split_key(key)
        return ParsedKey(parsed[0], parsed[2]) if parsed else None

    def read(self, source: AdapterSource) -> Adapter:
        adapter = Adapter(format=self.name, metadata=source.metadata, source=source.weights)
        parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
        paths: dict[str, str] = {}
        for key in source.keys:
            tensor = source.file.tensor(key)
            parsed = split_key(key)
            if parsed is None:
                if not add_foreign(adapter, key, tensor):
                    adapter.passthrough[key] = tensor
                continue
            stem, path, role = parsed
            parts.setdefault(stem, {})[role] = (key, tensor)
            paths[stem] = path
        for stem, roles in parts.items():
            if "down" not in roles or "up" not in roles:
                for key, tensor in roles.values():
                    adapter.passthrough[key] = tensor
                continue
            head, _, rest = paths[stem].partition(".")
            component, path = (head, rest) if head in COMPONENTS else ("unet", paths[stem])
            (down_key, down), (up_key, up) = roles["down"], roles["up"]
            adapter.modules[stem] = LoraModule(
                key=stem,
                down=down,
                up=up,
                alpha=None,
                kind=CONV if len(down.shape) > 2 else LINEAR,
                path=path,
                component=component,
                keys={"down": down_key, "up": up_key},
            )
        return adapter

    def write(self, adapter: Adapter, out: Path, *, refresh_hashes: bool = False) -> Path:
        tensors: dict[str, Tensor] = {}
        for m in adapter.modules.values():
            if not m.keys or m.scale != 1.0:
                raise UsageError(
                    f"module {m.key!r} cannot be written in the old diffusers spelling "
                    "(new modules, or a scale other than 1)",
                    path=out,
                    hint="convert it to the current diffusers spelling first: "
                    "`loratool convert --to diffusers`",
                )
            tensors[m.keys["down"]] = m.down
            tensors[m.keys["up"]] = m.up
        tensors.update(adapter.passthrough)
        metadata = adapter.metadata or None
        if out.suffix == ".safetensors":
            save_tensors(out, tensors, metadata)
            return out
        with atomic_dir(out, force=True) as tmp:  # the caller checked the output (check_output)
            save_tensors(tmp / self.default_filename, tensors, metadata)
        return out / self.default_filename
