"""The in-memory adapter model every format reads into and writes from.

A LoRA module applies ``dW = scale * (up @ down)`` to one base weight, where ``down`` (PEFT's
lora_A, kohya's lora_down) is ``[r, in]`` (conv: ``[r, in, *kernel]``), ``up`` (lora_B /
lora_up) is ``[out, r]`` (conv: ``[out, r, 1, ...]``) and ``scale = alpha / r`` (rsLoRA:
``alpha / sqrt(r)``). Embeddings store ``down`` as ``[r, num_embeddings]`` and ``up`` as
``[dim, r]``; their update is the transpose, ``[num_embeddings, dim]``.

Tensors stay lazy (:class:`~lora_tools.io.safetensors.FileTensor`) until an operation needs
their values, so building an :class:`Adapter` from a 1 GB file reads only its header.

Example:
    >>> import numpy as np
    >>> from lora_tools.adapter import LoraModule
    >>> from lora_tools.io.safetensors import ArrayTensor
    >>> m = LoraModule(key="q", down=ArrayTensor(np.ones((2, 3), np.float32)),
    ...                up=ArrayTensor(np.ones((4, 2), np.float32)), alpha=4.0, kind="linear")
    >>> m.rank, m.scale, m.delta_shape
    (2, 2.0, (4, 3))
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.errors import AdapterError, UnsupportedAdapterError
from lora_tools.io.safetensors import Tensor

#: Module-name endings recognised in flattened (kohya) names, longest first.
_KNOWN_TARGETS = sorted(
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

LINEAR = "linear"
CONV = "conv"
EMBEDDING = "embedding"
KINDS = (LINEAR, CONV, EMBEDDING)


@dataclass
class LoraModule:
    """One LoRA module: the factors and scale that update one base weight.

    Attributes:
        key: the module's stem as spelled in the file (lossless round trips keep it).
        down: A / lora_down, ``[r, in]`` or ``[r, in, *kernel]`` (embedding ``[r, num_emb]``).
        up: B / lora_up, ``[out, r]`` or ``[out, r, 1, ...]`` (embedding ``[dim, r]``).
        alpha: the module's alpha; None means "alpha = rank" (scale 1), as kohya reads a
            missing alpha tensor.
        kind: ``linear``, ``conv`` or ``embedding``.
        path: dotted module path inside its component (None until resolved, e.g. kohya names).
        component: pipeline component (``unet``, ``text_encoder``, ``transformer``...), or None.
        rslora: scale is ``alpha / sqrt(r)`` instead of ``alpha / r``.
        magnitude: DoRA magnitude vector, if any.
        bias: lora_B bias (PEFT ``lora_bias=True``), if any.
        alpha_tensor: kohya's stored alpha tensor, kept to write it back byte for byte.
        keys: role (``down``, ``up``, ``alpha``, ``magnitude``, ``bias``) -> tensor key in the file.
    """

    key: str
    down: Tensor
    up: Tensor
    alpha: float | None
    kind: str
    path: str | None = None
    component: str | None = None
    rslora: bool = False
    magnitude: Tensor | None = None
    bias: Tensor | None = None
    alpha_tensor: Tensor | None = None
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def effective_alpha(self) -> float:
        """alpha, with a missing alpha read as the rank."""
        return float(self.rank) if self.alpha is None else float(self.alpha)

    @property
    def scale(self) -> float:
        """The factor the product ``up @ down`` is multiplied by."""
        if self.rank == 0:
            return 0.0
        denom = math.sqrt(self.rank) if self.rslora else self.rank
        return self.effective_alpha / denom

    @property
    def in_features(self) -> int:
        return self.down.shape[1] if len(self.down.shape) > 1 else 0

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.down.shape[2:]) if self.kind == CONV else ()

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module updates (PEFT / torch layout)."""
        if self.kind == EMBEDDING:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def parameter_count(self) -> int:
        extra = sum(t.numel for t in (self.magnitude, self.bias) if t is not None)
        return self.down.numel + self.up.numel + extra

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    @property
    def full_path(self) -> str | None:
        """``component.path`` when both are known, else the path."""
        if self.path is None:
            return None
        return f"{self.component}.{self.path}" if self.component else self.path

    @property
    def target_name(self) -> str:
        """The layer name this module targets: ``q_proj``, ``to_out.0``, ``conv1``...

        From the module path when known; from a flattened kohya name by recognising common
        layer names, else the part after the last ``_<digits>_``.
        """
        if self.path:
            parts = self.path.split(".")
            if parts[-1].isdigit() and len(parts) > 1:
                return ".".join(parts[-2:])
            return parts[-1]
        for known in _KNOWN_TARGETS:
            if self.key.endswith("_" + known) or self.key == known:
                return "to_out.0" if known == "to_out_0" else known
        return re.split(r"_\d+_", self.key)[-1]

    def factors(self, dtype: np.dtype = np.float64) -> tuple[np.ndarray, np.ndarray]:
        """``(U, V)`` as 2-D arrays with ``U @ V * scale`` = the update as a matrix.

        For linear and conv modules the matrix is ``[out, in * prod(kernel)]`` (reshape to
        :attr:`delta_shape`); for embeddings it is ``[dim, num_embeddings]``, the transpose of
        the update.
        """
        up = self.up.numpy().astype(dtype).reshape(self.out_features, self.rank)
        down = self.down.numpy().astype(dtype).reshape(self.rank, -1)
        return up, down

    def finite_factors(
        self, dtype: np.dtype = np.float64, *, consequence: str = "the result would be NaN"
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`factors`, or AdapterError when either holds NaN or Inf."""
        up, down = self.factors(dtype)
        require_finite(up, "up factor (B)", self, consequence)
        require_finite(down, "down factor (A)", self, consequence)
        return up, down

    def delta(self) -> np.ndarray:
        """The dense float64 update in the base weight's layout (small modules and tests only)."""
        up, down = self.factors()
        product = (up @ down) * self.scale
        if self.kind == EMBEDDING:
            return product.T
        return product.reshape(self.delta_shape)


def require_finite(
    values: np.ndarray, what: str, module: LoraModule, consequence: str
) -> np.ndarray:
    """``values``, or AdapterError naming the module and the file when they hold NaN / Inf.

    Operations refuse such factors rather than spread them: PEFT and diffusers merge them
    silently into a non-finite model.
    """
    finite = np.isfinite(values)
    if not finite.all():
        source = getattr(module.down, "file", None)
        raise AdapterError(
            f"module {module.key!r}: the {what} holds {values.size - int(finite.sum())} "
            f"NaN/Inf values; {consequence}",
            path=source.path if source is not None else None,
            hint="run `loratool validate` on the adapter; use an earlier checkpoint",
            kind="non-finite",
        )
    return values


@dataclass
class Adapter:
    """A LoRA adapter as read from one file (plus its config), in any format.

    Attributes:
        format: the naming scheme: ``peft``, ``diffusers``, ``kohya``, ``diffusers-old``, or a
            registered third-party format.
        modules: LoRA modules by key stem, in file order.
        passthrough: tensors kept byte for byte (modules_to_save, embeddings, LyCORIS tensors).
        foreign: adapter types loratool detects but does not compute with, type -> module stems.
        metadata: the file's ``__metadata__``.
        config: the adapter config (PEFT adapter_config.json), or None.
        source: the file the tensors came from.
        config_source: the config file, if any.
    """

    format: str
    modules: dict[str, LoraModule] = field(default_factory=dict)
    passthrough: dict[str, Tensor] = field(default_factory=dict)
    foreign: dict[str, list[str]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    source: Path | None = None
    config_source: Path | None = None
    #: ``foreign`` as sets, so that noting a stem stays O(1) (readers see a key per tensor)
    _foreign_seen: dict[str, set[str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def name(self) -> str:
        return str(self.source) if self.source else "<adapter>"

    @property
    def ranks(self) -> Counter[int]:
        return Counter(m.rank for m in self.modules.values())

    @property
    def variants(self) -> list[str]:
        """Names for what the file holds: LoRA, DoRA, rsLoRA, LoCon, LoHa, ..."""
        out: list[str] = []
        mods = self.modules.values()
        if mods:
            out.append("LoRA")
        if any(m.dora for m in mods):
            out.append("DoRA")
        if any(m.rslora for m in mods):
            out.append("rsLoRA")
        if self.format == "kohya" and any(m.kind == CONV and math.prod(m.kernel) > 1 for m in mods):
            out.append("LoCon")
        out.extend(self.foreign)
        return out

    def require_plain_lora(self, operation: str) -> None:
        """Raise UnsupportedAdapterError if the adapter holds types ``operation`` can't handle."""
        if self.foreign:
            kind, stems = next(iter(self.foreign.items()))
            raise UnsupportedAdapterError(
                f"unsupported adapter type {kind} ({len(stems)} modules, e.g. {stems[0]!r}); "
                f"{operation} is defined for LoRA factors only",
                path=self.source,
                hint="LyCORIS types need LyCORIS' own tools",
                kind="unsupported-type",
            )

    def require_no_dora(self, operation: str) -> None:
        """Raise for DoRA modules where ``operation`` is not defined for them."""
        for m in self.modules.values():
            if m.dora:
                raise UnsupportedAdapterError(
                    f"module {m.key!r} is DoRA; {operation} of DoRA adapters is not defined "
                    "(the magnitude normalisation is not linear in the factors)",
                    path=self.source,
                    hint="merge the DoRA adapter into its base with `loratool merge` instead",
                    kind="unsupported-type",
                )
