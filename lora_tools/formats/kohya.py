"""kohya-ss / sd-scripts LoRA files (and LyCORIS "LoCon", which uses the same keys).

Keys: ``<lora_name>.lora_down.weight`` ``[r, in]`` / ``[r, in, k, k]``, ``.lora_up.weight``
``[out, r]`` / ``[out, r, 1, 1]`` and ``.alpha`` (a scalar of any dtype, shape ``[]`` or ``[1]``).
A missing or zero alpha means alpha = r. ``lora_name`` is a prefix (``lora_unet``, ``lora_te``,
``lora_te1``...) plus the module path with every ``.`` replaced by ``_``: the dotted path cannot be
recovered from the name alone, so ``path`` stays None until resolved against a base checkpoint.

Training metadata (``ss_*``) is kept as is. ``sshs_model_hash`` is the sha256 of the data buffer;
writers that change tensors recompute it and drop ``sshs_legacy_hash``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np

from lora_tools.adapter import CONV, LINEAR, Adapter, LoraModule
from lora_tools.errors import FormatError, UsageError
from lora_tools.formats.base import (
    AdapterFormat,
    AdapterSource,
    ParsedKey,
    add_foreign,
    bias_diff_keys,
    collect_deltas,
    unresolved_error,
)
from lora_tools.io.jsonfile import parse_json
from lora_tools.io.safetensors import (
    ArrayTensor,
    Tensor,
    TensorSpec,
    reference_order,
    save_tensors,
    scalar_value,
)
from lora_tools.naming import KOHYA_PREFIX_RE, kohya_name, split_name

_ROLE_RE = re.compile(
    r"^(?P<stem>[^.]+)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha|diff_b)$"
)
_ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
    "diff_b": "bias_diff",
}


def read_scalar(tensor: Tensor) -> float:
    """The value of a scalar-like tensor (shape ``[]`` or ``[1]``); NaN if not scalar-like."""
    if tensor.numel != 1:
        return float("nan")
    return scalar_value(tensor.tobytes(), tensor.dtype)


def data_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 of the data buffer a reference-ordered file of these tensors would hold."""
    digest = hashlib.sha256()
    specs = reference_order(TensorSpec(k, t.dtype, t.shape) for k, t in tensors.items())
    for spec in specs:
        for chunk in tensors[spec.name].iter_bytes():
            digest.update(chunk)
    return digest.hexdigest()


class KohyaFormat(AdapterFormat):
    """kohya-ss / sd-scripts LoRA and LoCon files."""

    name = "kohya"
    description = "kohya-ss / sd-scripts (lora_unet_* / lora_te*_ with lora_down / lora_up / alpha)"
    default_filename = "lora.safetensors"
    #: The key grammar (``parse_key``): stem and role suffix, and the role each suffix names.
    role_re: ClassVar[re.Pattern[str]] = _ROLE_RE
    roles: ClassVar[dict[str, str]] = _ROLES

    def claims(self, key: str) -> bool:
        return bool(KOHYA_PREFIX_RE.match(key)) or ".lora_down." in key or ".lora_up." in key

    def parse_key(self, key: str) -> ParsedKey | None:
        """``<lora_name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` -> (name, role);
        ``.diff_b`` (a bias difference, :func:`~lora_tools.formats.base.bias_diff_keys`) too.

        Example:
            >>> KohyaFormat().parse_key("lora_te_text_model_q_proj.lora_up.weight")
            ParsedKey(stem='lora_te_text_model_q_proj', role='up', embedding=False)
        """
        m = self.role_re.match(key)
        if m is None:
            return None
        return ParsedKey(m.group("stem"), self.roles[m.group("role")])

    def read(self, source: AdapterSource) -> Adapter:
        adapter = Adapter(
            format=self.name, metadata=source.metadata, source=source.weights, config=None
        )
        parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
        bias_diffs = bias_diff_keys(source.keys, self)
        for key in source.keys:
            tensor = source.file.tensor(key)
            if key not in bias_diffs and add_foreign(adapter, key, tensor):
                continue
            parsed = self.parse_key(key)
            if parsed is None:
                adapter.passthrough[key] = tensor
                continue
            parts.setdefault(parsed.stem, {})[parsed.role] = (key, tensor)

        foreign_stems = {s for stems in adapter.foreign.values() for s in stems}
        for stem, roles in parts.items():
            if stem in foreign_stems or "down" not in roles or "up" not in roles:
                # LyCORIS modules keep their alpha; lone factors are kept for validate to report.
                for key, tensor in roles.values():
                    adapter.passthrough[key] = tensor
                continue
            (down_key, down), (up_key, up) = roles["down"], roles["up"]
            if len(down.shape) < 2 or len(up.shape) < 2:
                for key, tensor in roles.values():
                    adapter.passthrough[key] = tensor
                continue
            component, path = self.locate(stem)
            keys = {"down": down_key, "up": up_key}
            alpha: float | None = None
            alpha_tensor = None
            if "alpha" in roles:
                keys["alpha"], alpha_tensor = roles["alpha"]
                value = read_scalar(alpha_tensor)
                alpha = None if value == 0 else value
            adapter.modules[stem] = LoraModule(
                key=stem,
                down=down,
                up=up,
                alpha=alpha,
                kind=CONV if len(down.shape) > 2 else LINEAR,
                path=path,
                component=component,
                alpha_tensor=alpha_tensor,
                keys=keys,
            )
            if "bias_diff" in roles:
                keys["bias_diff"], adapter.modules[stem].bias_diff = roles["bias_diff"]
        collect_deltas(adapter, self, self.locate)
        return adapter

    def locate(self, stem: str) -> tuple[str | None, str | None]:
        """``(component, dotted path)`` of a module stem; kohya names lose the path's dots, so
        the path is None until resolved against a base."""
        return split_name(stem)[0], None

    def stem_for(self, module: LoraModule) -> str:
        """The stem a module without keys from this format is written under."""
        return kohya_name(module.component, module.path or module.key)

    def tensors_for(self, adapter: Adapter) -> dict[str, Tensor]:
        missing = [m.key for m in adapter.modules.values() if m.path is None and not m.keys]
        if missing:
            raise unresolved_error(adapter, self.name, missing)
        out: dict[str, Tensor] = {}
        for m in adapter.modules.values():
            if m.dora or m.bias is not None:
                raise UsageError(
                    f"module {m.key!r} has a DoRA magnitude or a LoRA bias, which "
                    f"{self.name} files cannot hold",
                    path=adapter.source,
                    hint="keep this adapter in PEFT or diffusers format",
                )
            if m.rows is not None:
                raise UsageError(
                    f"module {m.key!r} updates rows {m.rows[0]}:{m.rows[1]} of its base "
                    f"weight only, which {self.name} names cannot say",
                    path=adapter.source,
                    hint="keep this adapter in its own format",
                )
            stem = m.key if m.keys else self.stem_for(m)
            out[m.keys.get("down", f"{stem}.lora_down.weight")] = m.down
            out[m.keys.get("up", f"{stem}.lora_up.weight")] = m.up
            if m.bias_diff is not None:
                out[m.keys.get("bias_diff", f"{stem}.diff_b")] = m.bias_diff
            alpha_tensor = self._alpha_tensor(m)
            if alpha_tensor is not None:
                out[m.keys.get("alpha", f"{stem}.alpha")] = alpha_tensor
        out.update(adapter.passthrough)
        return out

    @staticmethod
    def _alpha_tensor(m: LoraModule) -> Tensor | None:
        """The alpha tensor to write: the stored one while it still holds the module's alpha.

        kohya has no rsLoRA, so an rsLoRA module is written with the alpha that gives the same
        scale under alpha / r. A changed alpha is stored in the old tensor's shape, as float32.
        """
        alpha = m.scale * m.rank if m.rslora else m.alpha
        if m.alpha_tensor is not None:
            stored = read_scalar(m.alpha_tensor)
            if (alpha is None and stored == 0) or alpha == stored:
                return m.alpha_tensor
            value = np.array(m.rank if alpha is None else alpha, np.float64)
            return ArrayTensor(value.reshape(m.alpha_tensor.shape), "F32")
        if alpha is None:
            return None
        return ArrayTensor(np.array(alpha, np.float64), "F32")

    def write(self, adapter: Adapter, out: Path, *, refresh_hashes: bool = False) -> Path:
        if out.suffix != ".safetensors":
            raise UsageError(
                f"{self.name} adapters are single files",
                path=out,
                hint="give a .safetensors output path",
            )
        tensors = self.tensors_for(adapter)
        metadata = dict(adapter.metadata)
        if refresh_hashes:
            update_training_metadata(metadata, list(adapter.modules.values()))
            if "sshs_model_hash" in metadata or "sshs_legacy_hash" in metadata:
                metadata["sshs_model_hash"] = data_sha256(tensors)
                metadata.pop("sshs_legacy_hash", None)
        save_tensors(out, tensors, metadata or None)
        return out


def update_training_metadata(metadata: dict[str, str], modules: list[LoraModule]) -> None:
    """Make ``ss_network_dim`` / ``ss_network_alpha`` (linear and 1x1 layers) and
    ``ss_network_args`` ``conv_dim`` / ``conv_alpha`` (3x3 and larger convolutions, sd-scripts'
    split) describe ``modules`` again: one value, or ``Dynamic`` where they differ."""
    wide = [m for m in modules if m.kind == CONV and math.prod(m.kernel) > 1]
    narrow = [m for m in modules if m not in wide]
    if narrow:
        if "ss_network_dim" in metadata:
            metadata["ss_network_dim"] = _describe([m.rank for m in narrow])
        if "ss_network_alpha" in metadata:
            metadata["ss_network_alpha"] = _describe([m.effective_alpha for m in narrow])
    raw = metadata.get("ss_network_args")
    if not wide or not raw:
        return
    try:
        args = parse_json(raw, what="ss_network_args")
    except FormatError:
        return
    if not isinstance(args, dict) or not ({"conv_dim", "conv_alpha"} & set(args)):
        return
    if "conv_dim" in args:
        args["conv_dim"] = _describe([m.rank for m in wide])
    if "conv_alpha" in args:
        args["conv_alpha"] = _describe([m.effective_alpha for m in wide])
    metadata["ss_network_args"] = json.dumps(args)


def _describe(values: list[float]) -> str:
    """One value as sd-scripts writes it (``4``, ``0.5``), or ``Dynamic``."""
    distinct = Counter(values)
    if len(distinct) != 1:
        return "Dynamic"
    value = float(next(iter(distinct)))
    return str(int(value)) if math.isfinite(value) and value.is_integer() else repr(value)
