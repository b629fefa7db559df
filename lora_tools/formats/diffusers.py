"""diffusers LoRA files: PEFT-style keys prefixed by the pipeline component (``unet.``,
``transformer.``, ``text_encoder.``...), as ``save_lora_weights`` writes them into
``pytorch_lora_weights.safetensors``; each component's LoraConfig is in the
``lora_adapter_metadata`` metadata entry. The reader and the key grammar are PEFT's
(:mod:`lora_tools.formats.peft`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_tools.adapter import Adapter, LoraModule
from lora_tools.constants import DIFFUSERS_WEIGHTS_NAME
from lora_tools.formats.peft import DIFFUSERS_METADATA_KEY, PeftFormat, diffusers_metadata_for
from lora_tools.io.atomic import atomic_dir
from lora_tools.io.safetensors import save_tensors
from lora_tools.naming import split_stem


class DiffusersFormat(PeftFormat):
    """PEFT-style keys with a pipeline component prefix, as diffusers' save_lora_weights writes."""

    name = "diffusers"
    description = "diffusers (pytorch_lora_weights.safetensors, component-prefixed PEFT keys)"
    default_filename = DIFFUSERS_WEIGHTS_NAME

    def _prefixed(self, stem: str) -> bool:
        return split_stem(stem)[0] is not None

    def stem_for(self, module: LoraModule) -> str:
        if module.path is None:
            raise ValueError(module.key)
        return f"{module.component or 'transformer'}.{module.path}"

    def write(self, adapter: Adapter, out: Path, *, refresh_hashes: bool = False) -> Path:
        tensors = self.tensors_for(adapter)
        metadata = dict(adapter.metadata) or {"format": "pt"}
        metadata[DIFFUSERS_METADATA_KEY] = json.dumps(
            diffusers_metadata_for(adapter), indent=2, sort_keys=True
        )
        target = out if out.suffix == ".safetensors" else out / self.default_filename
        if target is out:
            save_tensors(out, tensors, metadata)
            return out
        with atomic_dir(out, force=True) as tmp:
            save_tensors(tmp / self.default_filename, tensors, metadata)
        return target
