"""What every adapter format implements, and the pieces the built-in formats share."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from lora_tools.adapter import Adapter
from lora_tools.deltas import DeltaError, build, role_of
from lora_tools.errors import AdapterError, UsageError
from lora_tools.io.jsonfile import read_json_object
from lora_tools.io.safetensors import SafetensorsFile, Tensor

#: Tensor-name suffixes of LyCORIS and other adapter types loratool detects but never computes
#: with, mapped to the type's name.
FOREIGN_SUFFIXES: dict[str, str] = {
    "hada_w1_a": "LoHa",
    "hada_w1_b": "LoHa",
    "hada_w2_a": "LoHa",
    "hada_w2_b": "LoHa",
    "hada_t1": "LoHa",
    "hada_t2": "LoHa",
    "lokr_w1": "LoKr",
    "lokr_w1_a": "LoKr",
    "lokr_w1_b": "LoKr",
    "lokr_w2": "LoKr",
    "lokr_w2_a": "LoKr",
    "lokr_w2_b": "LoKr",
    "lokr_t2": "LoKr",
    "lora_mid.weight": "Tucker LoCon",
    "on_input": "IA3",
    "diff": "full diff",
    "diff_b": "full diff",
    "w_norm": "norm",
    "b_norm": "norm",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "rescale": "OFT",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "dora_scale": "kohya DoRA",
    "ia3_l": "IA3",
    "oft_r": "OFT",
    "boft_R": "BOFT",
    "vera_lambda_b": "VeRA",
    "vera_lambda_d": "VeRA",
    # BFL's Flux Control LoRAs carry full RMS-norm scales (``...norm.query_norm.scale``) that
    # diffusers loads as replacement weights: no LoRA, and no merge may skip them silently.
    "query_norm.scale": "full norm weights",
    "key_norm.scale": "full norm weights",
    # PEFT's spellings of its other types (the tuners' adapter_layer_names, peft 0.21)
    "oft_R": "OFT",
    "oft_embedding_R": "OFT",
    "boft_s": "BOFT",
    "fourierft_spectrum": "FourierFT",
    "lora_E": "AdaLoRA",
    "hra_u": "HRA",
    "c3a_kernel": "C3A",
    "shira_weight": "SHiRA",
    "miss_block": "MiSS",
    "road_theta": "RoAd",
    "road_alpha": "RoAd",
    "waveft_spectrum": "WaveFT",
    "randlora_lambda": "RandLoRA",
    "randlora_gamma": "RandLoRA",
    "vblora_logits_A": "VB-LoRA",
    "vblora_logits_B": "VB-LoRA",
    "delora_A": "DeLoRA",
    "delora_B": "DeLoRA",
    "delora_lambda": "DeLoRA",
    "gralora_A": "GraLoRA",
    "gralora_B": "GraLoRA",
}
#: Tensors PEFT saves once for the whole model (``base_model.<name>``, with
#: ``save_projection=True``): the frozen random matrices every module of the type shares.
SHARED_FOREIGN: dict[str, str] = {
    "vera_A": "VeRA",
    "vera_B": "VeRA",
    "randlora_A": "RandLoRA",
    "randlora_B": "RandLoRA",
    "vblora_vector_bank": "VB-LoRA",
}
_SHARED_RE = re.compile(
    r"^base_model\.(?P<name>" + "|".join(map(re.escape, SHARED_FOREIGN)) + r")(?:\.[A-Za-z0-9_]+)?$"
)
_FOREIGN_RE = re.compile(
    r"^(?P<stem>.+?)\.(?P<suffix>"
    + "|".join(re.escape(s) for s in sorted(FOREIGN_SUFFIXES, key=len, reverse=True))
    + r")(?:\.[A-Za-z0-9_]+)?$"
)


def classify_foreign(key: str) -> tuple[str, str] | None:
    """``(type, module stem)`` if the key belongs to a LyCORIS / non-LoRA adapter type."""
    m = _FOREIGN_RE.match(key)
    if m is None:
        return None
    return FOREIGN_SUFFIXES[m.group("suffix")], m.group("stem")


#: ComfyUI's bias difference (comfy/lora.py ``load_lora``: ``<stem>.diff_b`` is added to the
#: base layer's bias as a ``diff`` patch, whatever else the stem holds).
BIAS_DIFF_SUFFIX = ".diff_b"


def bias_diff_keys(keys: Iterable[str], fmt: AdapterFormat) -> set[str]:
    """The ``.diff_b`` keys of LoRA modules: stems that ``fmt`` reads both factors for and
    that hold no full ``.diff``. Such a module is LoRA plus a bias difference
    (:attr:`LoraModule.bias_diff`); a ``.diff_b`` without factors is a "full diff" module.

    Example:
        >>> from lora_tools.formats import get_format
        >>> keys = ["lora_unet_m.lora_down.weight", "lora_unet_m.lora_up.weight",
        ...         "lora_unet_m.diff_b", "lora_unet_n.diff", "lora_unet_n.diff_b"]
        >>> sorted(bias_diff_keys(keys, get_format("kohya")))
        ['lora_unet_m.diff_b']
    """
    keys = list(keys)
    roles: dict[str, set[str]] = {}
    for key in keys:
        parsed = fmt.parse_key(key)
        if parsed is not None:
            roles.setdefault(parsed.stem, set()).add(parsed.role)
    full = {k.removesuffix(".diff") for k in keys if k.endswith(".diff")}
    return {
        k
        for k in keys
        if k.endswith(BIAS_DIFF_SUFFIX)
        and {"down", "up"} <= roles.get(k.removesuffix(BIAS_DIFF_SUFFIX), set())
        and k.removesuffix(BIAS_DIFF_SUFFIX) not in full
    }


def shared_foreign(key: str) -> str | None:
    """The type of a tensor PEFT shares between every module of it (``base_model.vera_A``)."""
    m = _SHARED_RE.match(key)
    return SHARED_FOREIGN[m.group("name")] if m else None


def add_foreign(adapter: Adapter, key: str, tensor: Tensor) -> bool:
    """Keep a foreign tensor as pass-through and note its type; False if the key isn't one.

    A shared tensor (:func:`shared_foreign`) is kept as pass-through and belongs to no module.
    """
    if shared_foreign(key) is not None:
        adapter.passthrough[key] = tensor
        return True
    found = classify_foreign(key)
    if found is None:
        return False
    note_foreign(adapter, found[0], found[1], key, tensor)
    return True


def note_foreign(adapter: Adapter, kind: str, stem: str, key: str, tensor: Tensor) -> None:
    """Keep ``tensor`` as pass-through, as a tensor of module ``stem`` of adapter type ``kind``."""
    seen = adapter._foreign_seen.setdefault(kind, set())
    if stem not in seen:  # a set: a list's `in` made reading n LyCORIS modules O(n^2)
        seen.add(stem)
        adapter.foreign.setdefault(kind, []).append(stem)
    adapter.passthrough[key] = tensor


def collect_deltas(
    adapter: Adapter,
    fmt: AdapterFormat,
    locate: Callable[[str], tuple[str | None, str | None]],
) -> None:
    """Read the foreign modules whose type loratool computes as :class:`DeltaModule` s
    (``adapter.deltas``); their tensors stay in ``adapter.passthrough``.

    A module's tensors are found by stem: the foreign suffix (:func:`classify_foreign`), the
    format's own LoRA roles (a Tucker LoCon's ``lora_up``, its ``alpha``), or for kohya names,
    which hold no dot, the key's first part. A module whose tensors make no update of its type
    stays foreign only (``loratool validate`` reports it).
    """
    stems = {stem for found in adapter.foreign.values() for stem in found}
    if not stems:
        return
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, tensor in adapter.passthrough.items():
        found = classify_foreign(key)
        parsed = None if found is not None else fmt.parse_key(key)
        stem = found[1] if found else parsed.stem if parsed else key.partition(".")[0]
        if stem in stems:
            parts.setdefault(stem, {})[role_of(key[len(stem) + 1 :])] = (key, tensor)
    for stem, found in parts.items():
        component, path = locate(stem)
        module = build(stem, found, path=path, component=component)
        if module is None:
            continue
        try:
            module.update_dims  # noqa: B018 - the shape check
        except DeltaError:
            continue
        adapter.deltas[stem] = module


def complete_modules(
    fmt: AdapterFormat, source: AdapterSource, adapter: Adapter
) -> Iterator[tuple[str, dict[str, tuple[str, Tensor]]]]:
    """``(stem, role -> (key, tensor))`` for each module of ``source`` with both factors, by
    ``fmt.parse_key``; every other tensor (no LoRA key, or a factor without its partner, which
    validate reports) is kept in ``adapter.passthrough``."""
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key in source.keys:
        tensor = source.file.tensor(key)
        parsed = fmt.parse_key(key)
        if parsed is None:
            adapter.passthrough[key] = tensor
        else:
            parts.setdefault(parsed.stem, {})[parsed.role] = (key, tensor)
    for stem, roles in parts.items():
        if "down" in roles and "up" in roles:
            yield stem, roles
        else:
            adapter.passthrough.update(roles.values())


class ParsedKey(NamedTuple):
    """A LoRA tensor key split the way its format names tensors.

    Attributes:
        stem: the module's name in the file (the key without the role suffix); the tensors of
            one module share it.
        role: ``down``, ``up``, ``alpha``, ``magnitude`` (DoRA), ``bias`` (lora_bias) or
            ``bias_diff`` (ComfyUI's ``.diff_b``).
        embedding: the key is an embedding factor (PEFT's ``lora_embedding_A`` / ``_B``).
    """

    stem: str
    role: str
    embedding: bool = False


@dataclass
class AdapterSource:
    """The files an adapter is read from: its weights, and its config when there is one."""

    weights: Path
    file: SafetensorsFile
    config: dict[str, Any] | None = None
    config_path: Path | None = None

    @property
    def keys(self) -> list[str]:
        return self.file.keys()

    @property
    def metadata(self) -> dict[str, str]:
        return self.file.metadata

    def new_adapter(self, format: str) -> Adapter:
        """An empty :class:`Adapter` of ``format`` that records these files as its sources."""
        return Adapter(
            format=format,
            metadata=self.metadata,
            config=self.config,
            source=self.weights,
            config_source=self.config_path,
        )


def read_json_config(path: Path) -> dict[str, Any]:
    """Parse an adapter config (adapter_config.json) into a dict, or raise FormatError."""
    return read_json_object(path, kind="config-json")


class AdapterFormat:
    """A naming scheme for LoRA tensors. Subclass it and register it to add a format.

    Third-party formats register through the ``lora_tools.formats`` entry-point group; the entry
    point names a subclass (or an instance) of this class.
    """

    #: Short stable name, used by ``--to`` and in JSON output.
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: File name used when the output path is a folder.
    default_filename: ClassVar[str] = "adapter.safetensors"

    def claims(self, key: str) -> bool:
        """Whether a tensor key is spelled the way this format spells LoRA tensors."""
        raise NotImplementedError

    def parse_key(self, key: str) -> ParsedKey | None:
        """Split a LoRA tensor key into module stem and role; None for any other key.

        The built-in readers group tensors into modules with this, and ``loratool validate``
        checks each module's tensors with it, so the two always agree on what a module is. A
        format that does not override it gets no per-module structure rules in validate.

        Args:
            key: a tensor name from the file.

        Returns:
            ``ParsedKey(stem, role, embedding)``, or None when the key is no LoRA tensor of
            this format (foreign types, full tensors such as modules_to_save).

        Example:
            >>> from lora_tools.formats import get_format
            >>> get_format("peft").parse_key("base_model.model.q_proj.lora_A.weight")
            ParsedKey(stem='base_model.model.q_proj', role='down', embedding=False)
            >>> get_format("kohya").parse_key("lora_unet_a_b.alpha").role
            'alpha'
        """
        return None

    def canonical_shape(self, role: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape a ``role`` tensor stored as ``shape`` has in PEFT's orientation (down
        ``[r, in]``, up ``[out, r]``): the same shape, except for formats that store factors
        otherwise (mlx-lm: transposed). ``loratool validate`` checks shapes through it."""
        return shape

    def foreign_kind(
        self,
        stem: str,
        shapes: dict[str, tuple[int, ...]],
        config: dict[str, Any] | None = None,
    ) -> str | None:
        """The adapter type of a module whose LoRA-named tensors (role -> shape) are of a kind
        loratool does not compute with (mlx-lm's mixture-of-experts LoRA, a PEFT LoRA variant
        its ``config`` turns on), else None. The reader and ``loratool validate`` both ask it."""
        return None

    def score(self, keys: list[str], metadata: dict[str, str]) -> int:
        """How many keys this format claims (the format with the highest score reads the file)."""
        return sum(1 for k in keys if self.claims(k))

    def read(self, source: AdapterSource) -> Adapter:
        raise NotImplementedError

    def write(self, adapter: Adapter, out: Path, *, refresh_hashes: bool = False) -> Path:
        """Write ``adapter`` at ``out`` (file or folder, as the format needs); return the
        weights file written. ``refresh_hashes``: tensors changed, so recompute content hashes
        kept in metadata.
        """
        raise NotImplementedError


def unresolved_error(adapter: Adapter, target: str, missing: list[str]) -> UsageError:
    return UsageError(
        f"{len(missing)} modules have no known module path (e.g. {missing[0]!r}); "
        f"{target} names need the dotted path",
        path=adapter.source,
        hint="resolve the kohya names against the base checkpoint's keys first: "
        f"`loratool convert --to {target} --base BASE`",
        kind="needs-module-paths",
    )


def raise_unknown(source: AdapterSource) -> None:
    """Raise for a file no format claims: UnsupportedAdapterError naming the type when its
    PEFT config says one (a type whose tensor names loratool does not know), else
    UnknownFormatError."""
    from lora_tools.errors import UnknownFormatError, UnsupportedAdapterError

    sample = ", ".join(repr(k) for k in source.keys[:4]) or "no tensors at all"
    peft_type = (source.config or {}).get("peft_type")
    if isinstance(peft_type, str) and peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"unsupported adapter type {peft_type} (adapter_config.json peft_type), whose "
            f"tensors loratool does not know: {sample}",
            path=source.weights,
            hint="PEFT merges its own types (PeftModel.merge_and_unload)",
            kind="unsupported-type",
        )
    raise UnknownFormatError(
        f"tensor names match no known LoRA naming scheme (peft, diffusers, kohya, "
        f"comfyui, xlabs, mlx); "
        f"first keys: {sample}",
        path=source.weights,
        hint="is this a LoRA adapter? a full model checkpoint is a base, not an adapter",
        kind="unknown-format",
    )


def ensure(condition: bool, message: str, source: AdapterSource, kind: str) -> None:
    if not condition:
        raise AdapterError(message, path=source.weights, kind=kind)
