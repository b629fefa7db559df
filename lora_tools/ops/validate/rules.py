"""The rule catalogue of ``loratool validate``: stable IDs, severities, names and summaries.

Every rule has a code (``LT012``), a one-line kebab-case name (``truncated``), a default severity
and a page in docs/rules.md (what it checks, why it matters, an example, how to fix). Codes never
change meaning and are never reused; the hundreds digit is the category:

- ``LT0xx`` file integrity: the safetensors or GGUF container (header only), pickles
- ``LT1xx`` structure: factors, ranks, shapes, alphas, adapter types, keys (header only)
- ``LT2xx`` values: read the tensor data, each byte once (NaN/Inf, zero factors, outliers, hash)
- ``LT3xx`` config and metadata: adapter_config.json, diffusers, kohya and GGUF metadata
- ``LT4xx`` base: every module against a ``--base`` checkpoint
- ``LT5xx`` deployment profiles (``--profile``): what a consumer refuses or serves wrong, one
  family per consumer (``LT50x`` vLLM, ``LT51x`` SGLang, ``LT52x`` TGI, ``LT53x`` llama.cpp,
  ``LT54x`` diffusers, ``LT55x`` ComfyUI, ``LT56x`` PEFT; ``LT59x`` compares consumers)

Severities follow one principle (docs/rules.md, "Severities"): when the consumer (PEFT,
diffusers, ComfyUI, sd-scripts) would refuse the file, or silently drop or misapply weights, the
rule is an error; a file that loads as trained but is probably not what was meant is a warning;
what is only worth knowing is an info. A rule never fails intact files.

Selections name codes, code prefixes (``LT2`` = every value rule), rule names or ``ALL``, the
way ruff's ``--select`` does.

Example:
    >>> from lora_tools.ops.validate.rules import RULES, select_rules
    >>> RULES["LT012"].name, RULES["LT012"].severity
    ('truncated', 'error')
    >>> sorted(select_rules(["LT01"], ["LT013"]))[:3]
    ['LT010', 'LT011', 'LT012']
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lora_tools.errors import UsageError

ERROR = "error"
WARNING = "warning"
INFO = "info"
#: Severities from least to most severe.
SEVERITIES = (INFO, WARNING, ERROR)
SEVERITY_RANK = {name: i for i, name in enumerate(SEVERITIES)}

CATEGORIES = {
    "LT0": "file integrity",
    "LT1": "structure",
    "LT2": "values",
    "LT3": "config and metadata",
    "LT4": "base checkpoint",
    "LT5": "deployment profiles",
}


@dataclass(frozen=True)
class Rule:
    """One check: its stable code, kebab-case name, severity and one-line summary."""

    code: str
    name: str
    severity: str
    summary: str

    @property
    def category(self) -> str:
        return CATEGORIES[self.code[:3]]

    @property
    def anchor(self) -> str:
        """The heading anchor of this rule's section in docs/rules.md (``lt012-truncated``)."""
        return f"{self.code.lower()}-{self.name}"


_CATALOGUE = (
    # -- LT0xx file integrity (the reference safetensors reader rejects all of these but LT014)
    Rule("LT001", "file-too-small", ERROR, "file is shorter than the 8-byte header length field"),
    Rule("LT002", "header-length-overflow", ERROR, "header length field points past end of file"),
    Rule("LT003", "header-too-large", ERROR, "header length field exceeds the 100 MB limit"),
    Rule("LT004", "header-not-utf8", ERROR, "header bytes are not valid UTF-8"),
    Rule("LT005", "header-invalid-json", ERROR, "header is not a JSON object of tensor entries"),
    Rule("LT006", "unknown-dtype", ERROR, "tensor dtype is not a safetensors dtype"),
    Rule("LT007", "invalid-shape", ERROR, "tensor shape is not a list of non-negative integers"),
    Rule("LT008", "invalid-offsets", ERROR, "tensor data_offsets are not [begin, end]"),
    Rule("LT009", "size-mismatch", ERROR, "tensor byte span does not match its shape and dtype"),
    Rule("LT010", "data-gap", ERROR, "bytes between tensors belong to no tensor"),
    Rule("LT011", "data-overlap", ERROR, "two tensors share bytes of the data buffer"),
    Rule("LT012", "truncated", ERROR, "file ends before the last tensor does"),
    Rule("LT013", "trailing-bytes", ERROR, "bytes after the last tensor belong to no tensor"),
    Rule("LT014", "duplicate-key", ERROR, "a key appears twice in the header"),
    Rule("LT015", "non-string-metadata", ERROR, "__metadata__ holds a value that is not a string"),
    Rule("LT016", "pickle-file", ERROR, "pickle-based weights (.bin/.pt/.ckpt) can run code"),
    Rule("LT017", "unreadable-file", ERROR, "path does not exist or cannot be read"),
    Rule("LT018", "no-adapter-weights", ERROR, "folder holds no adapter weights file"),
    Rule("LT019", "gguf-invalid", ERROR, "GGUF file the gguf package cannot parse"),
    # -- LT1xx structure (header only)
    Rule("LT101", "missing-partner", ERROR, "LoRA factor without its partner factor"),
    Rule("LT102", "rank-mismatch", ERROR, "rank of the down factor differs from the up factor"),
    Rule("LT103", "zero-rank", ERROR, "module has rank 0"),
    Rule("LT104", "factor-shape", ERROR, "factor shapes fit no layer kind"),
    Rule("LT105", "alpha-missing", INFO, "kohya module has no alpha (scale 1 is assumed)"),
    Rule("LT106", "alpha-zero", ERROR, "alpha is 0 (loaders disagree on the scale)"),
    Rule("LT107", "alpha-negative", WARNING, "alpha is negative (the update changes sign)"),
    Rule("LT108", "alpha-not-finite", ERROR, "alpha is NaN, infinite or not a number"),
    Rule("LT109", "alpha-not-scalar", ERROR, "alpha tensor holds more than one value"),
    Rule("LT110", "foreign-adapter-type", INFO, "adapter type loratool does not compute"),
    Rule("LT111", "mixed-adapter-types", WARNING, "LoRA modules mixed with other adapter types"),
    Rule("LT112", "unknown-key", ERROR, "tensor key belongs to no module of the format"),
    Rule("LT113", "unknown-format", ERROR, "tensor names match no LoRA naming scheme"),
    Rule("LT114", "no-lora-modules", ERROR, "no complete LoRA module in the file"),
    Rule("LT115", "factor-dtype", ERROR, "LoRA tensor has a non-floating-point dtype"),
    Rule("LT116", "missing-type-tensor", ERROR, "LyCORIS module lacks a tensor its type needs"),
    Rule("LT117", "type-shape-mismatch", ERROR, "LyCORIS module's tensor shapes make no update"),
    Rule("LT118", "lokr-alpha-ignored", INFO, "LoKr alpha stored with both factors whole"),
    Rule("LT119", "lokr-rank-ambiguous", ERROR, "LoKr factors decomposed with different ranks"),
    Rule("LT120", "gguf-unexpected-tensor", ERROR, "GGUF tensor that is no .lora_a / .lora_b"),
    # -- LT2xx values (read the data, each byte once)
    Rule("LT201", "non-finite", ERROR, "tensor holds NaN or infinite values"),
    Rule("LT202", "untrained-adapter", ERROR, "every module's update is exactly zero"),
    Rule("LT203", "zero-factor", WARNING, "module has an all-zero factor (update is zero)"),
    Rule("LT204", "update-norm-outlier", WARNING, "module update norm is an extreme outlier"),
    Rule("LT205", "model-hash-mismatch", ERROR, "sshs_model_hash does not match the data"),
    Rule(
        "LT206", "model-hash-unverified", INFO, "sshs_model_hash follows a convention not checked"
    ),
    # -- LT3xx config and metadata
    Rule("LT301", "config-missing", ERROR, "PEFT keys without adapter_config.json"),
    Rule("LT302", "config-invalid", ERROR, "adapter config is not a valid JSON object"),
    Rule("LT303", "peft-type", ERROR, "peft_type is missing or not LORA"),
    Rule("LT304", "config-rank-mismatch", ERROR, "config r / rank_pattern contradicts the tensors"),
    Rule("LT305", "pattern-unmatched", WARNING, "rank/alpha pattern key matches no module"),
    Rule("LT306", "target-modules-none", ERROR, "target_modules covers none of the modules"),
    Rule("LT307", "target-modules-miss", ERROR, "target_modules does not cover a module"),
    Rule("LT308", "dora-mismatch", ERROR, "use_dora disagrees with the magnitude vectors"),
    Rule("LT309", "network-dim-mismatch", WARNING, "ss_network_dim contradicts the tensors"),
    Rule("LT310", "network-alpha-mismatch", WARNING, "ss_network_alpha contradicts the tensors"),
    Rule("LT311", "gguf-not-adapter", ERROR, "GGUF general.type is not 'adapter'"),
    Rule("LT312", "gguf-not-lora", ERROR, "GGUF adapter.type is not 'lora'"),
    Rule("LT313", "gguf-unknown-architecture", ERROR, "GGUF general.architecture is unknown"),
    Rule("LT314", "gguf-kv-type", ERROR, "GGUF key-value of a type llama.cpp does not read"),
    Rule("LT315", "gguf-alpha-missing", INFO, "GGUF adapter.lora.alpha absent or 0 (scale 1)"),
    # -- LT4xx base checkpoint
    Rule("LT401", "unresolved-module", ERROR, "module resolves to no base weight"),
    Rule("LT402", "ambiguous-module", ERROR, "module resolves to more than one base weight"),
    Rule("LT403", "base-shape-mismatch", ERROR, "module update does not fit the base weight"),
    Rule("LT404", "no-module-matches-base", ERROR, "0 of N modules match the base"),
    Rule("LT405", "dtype-differs", INFO, "adapter dtype differs from the base dtype"),
    Rule("LT406", "gguf-architecture-mismatch", ERROR, "GGUF architecture differs from the base's"),
    # -- LT5xx deployment profiles (--profile; docs/rules.md names each rule's source)
    Rule("LT501", "vllm-not-peft", ERROR, "vLLM loads PEFT folders only"),
    Rule("LT502", "vllm-refused-feature", ERROR, "config uses a feature vLLM refuses"),
    Rule("LT503", "vllm-rank-above-max", ERROR, "rank above vLLM's --max-lora-rank"),
    Rule("LT504", "vllm-refused-tensor", ERROR, "tensor vLLM cannot parse as a LoRA weight"),
    Rule("LT505", "vllm-outside-targets", ERROR, "module outside the server's target modules"),
    Rule("LT506", "vllm-scale-ignored", ERROR, "vLLM version ignores per-module scales"),
    Rule("LT507", "vllm-vocab-mismatch", ERROR, "embedding LoRA vocabulary differs from base"),
    Rule(
        "LT508",
        "vllm-saved-embedding-skipped",
        ERROR,
        "vLLM skips a saved embedding that differs from the base's",
    ),
    Rule("LT511", "sglang-not-peft", ERROR, "SGLang loads PEFT folders only"),
    Rule("LT512", "sglang-refused-feature", ERROR, "config uses a feature SGLang refuses"),
    Rule("LT513", "sglang-rank-above-max", ERROR, "rank above SGLang's --max-lora-rank"),
    Rule(
        "LT514",
        "sglang-outside-targets",
        ERROR,
        "target module outside the server's target modules",
    ),
    Rule("LT515", "sglang-scale-ignored", ERROR, "SGLang ignores per-module scales and rsLoRA"),
    Rule("LT516", "sglang-dropped-tensors", ERROR, "tensors SGLang drops without a word"),
    Rule(
        "LT517",
        "sglang-saved-embedding-skipped",
        ERROR,
        "SGLang skips a saved embedding that differs from the base's",
    ),
    Rule("LT521", "tgi-not-peft", ERROR, "TGI loads PEFT folders with safetensors only"),
    Rule("LT522", "tgi-unused-tensors", ERROR, "tensors TGI logs as unused and drops"),
    Rule("LT523", "tgi-scale-ignored", ERROR, "TGI ignores per-module scales"),
    Rule("LT524", "tgi-partial-layer-type", ERROR, "layer type missing on some decoder layers"),
    Rule("LT525", "tgi-mixed-ranks", ERROR, "ranks differ within one layer type"),
    Rule("LT526", "tgi-init-ignored", ERROR, "base-changing init (PiSSA...) TGI does not apply"),
    Rule(
        "LT527",
        "tgi-saved-embedding-skipped",
        ERROR,
        "TGI skips a saved embedding that differs from the base's",
    ),
    Rule("LT531", "llamacpp-not-peft", ERROR, "convert_lora_to_gguf.py reads PEFT folders only"),
    Rule("LT532", "llamacpp-refused-tensor", ERROR, "tensor convert_lora_to_gguf.py refuses"),
    Rule("LT533", "llamacpp-scale-ignored", ERROR, "llama.cpp ignores alpha_pattern and rsLoRA"),
    Rule("LT534", "llamacpp-tied-lm-head", ERROR, "LoRA on lm_head of a tied-embedding base"),
    Rule("LT535", "llamacpp-init-ignored", ERROR, "base-changing init llama.cpp does not apply"),
    Rule(
        "LT536",
        "llamacpp-saved-embedding-skipped",
        ERROR,
        "llama.cpp skips a saved embedding that differs from the base's",
    ),
    Rule("LT541", "diffusers-not-pipeline-file", ERROR, "diffusers loads pipeline LoRA files only"),
    Rule("LT542", "diffusers-refused-tensor", ERROR, "tensor diffusers' kohya converter refuses"),
    Rule("LT543", "diffusers-dora-dropped", ERROR, "kohya DoRA scales diffusers filters out"),
    Rule("LT544", "diffusers-unconverted-kohya", ERROR, "kohya file diffusers does not convert"),
    Rule("LT545", "diffusers-scale-differs", ERROR, "module diffusers applies at another scale"),
    Rule("LT546", "diffusers-diff-dropped", ERROR, "Flux kohya diff tensors diffusers filters out"),
    Rule(
        "LT547",
        "diffusers-text-encoder-qkv-dropped",
        ERROR,
        "kohya text-encoder q/k/v diffusers does not load",
    ),
    Rule("LT551", "comfyui-not-lora-file", ERROR, "ComfyUI does not load PEFT or MLX files"),
    Rule("LT552", "comfyui-unread-tensor", ERROR, "tensor ComfyUI's load_lora does not read"),
    Rule("LT553", "comfyui-scale-differs", ERROR, "module ComfyUI applies at another scale"),
    Rule(
        "LT554", "comfyui-unmapped-module", ERROR, "diffusers-named module ComfyUI maps to nothing"
    ),
    Rule("LT561", "peft-not-peft", ERROR, "PeftModel.from_pretrained loads PEFT folders only"),
    Rule("LT562", "peft-unknown-key", ERROR, "config key the PEFT version refuses (before 0.14)"),
    Rule("LT563", "peft-key-dropped", ERROR, "config key the PEFT version drops (0.14 on)"),
    # -- LT59x consumers compared
    Rule("LT590", "consumer-scales-differ", INFO, "consumers apply different scales to a module"),
    Rule(
        "LT591",
        "saved-embedding-differs",
        INFO,
        "PEFT loads a saved embedding the servers skip; it differs",
    ),
)

#: Every rule by code, in code order.
RULES: dict[str, Rule] = {rule.code: rule for rule in _CATALOGUE}
_BY_NAME = {rule.name: rule for rule in _CATALOGUE}

#: Problem.kind slugs of the io layer (check_header, read_header_bytes) -> rule code.
PROBLEM_RULES = {
    "file-too-small": "LT001",
    "header-length": "LT002",
    "header-too-large": "LT003",
    "header-utf8": "LT004",
    "header-json": "LT005",
    "dtype": "LT006",
    "shape": "LT007",
    "offsets": "LT008",
    "size-mismatch": "LT009",
    "misaligned": "LT009",
    "gap": "LT010",
    "overlap": "LT011",
    "truncated": "LT012",
    "trailing-bytes": "LT013",
    "duplicate-key": "LT014",
    "metadata-type": "LT015",
    "pickle": "LT016",
    "io": "LT017",
    "missing": "LT017",
    "not-regular": "LT017",
    "no-weights": "LT018",
}


def get_rule(code_or_name: str) -> Rule:
    """A rule by code (``LT012``) or name (``truncated``).

    Raises:
        UsageError: no such rule.
    """
    rule = RULES.get(code_or_name.upper()) or _BY_NAME.get(code_or_name.lower())
    if rule is None:
        raise UsageError(
            f"unknown rule {code_or_name!r}",
            hint="see docs/rules.md, or `loratool validate --help`, for rule codes",
        )
    return rule


def _expand(selector: str) -> set[str]:
    token = selector.strip()
    if token.upper() == "ALL":
        return set(RULES)
    if token.lower() in _BY_NAME:
        return {_BY_NAME[token.lower()].code}
    prefix = token.upper()
    matched = {code for code in RULES if code.startswith(prefix)}
    if not matched or not prefix.startswith("LT"):
        raise UsageError(
            f"{selector!r} names no rule (expected a code such as LT012, a prefix such as LT2, "
            "a rule name such as truncated, or ALL)",
            hint="docs/rules.md lists every rule",
        )
    return matched


def split_selectors(values: Iterable[str] | str | None) -> list[str]:
    """Flatten ``["LT0,LT1", "LT2"]`` or ``"LT0, LT1"`` into ``["LT0", "LT1", "LT2"]``."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def select_rules(
    select: Iterable[str] | str | None = None, ignore: Iterable[str] | str | None = None
) -> frozenset[str]:
    """The rule codes enabled by ``select`` (default: all) minus ``ignore``.

    Args:
        select: codes, prefixes, names or ``ALL``, as a list or a comma-separated string.
        ignore: the same, removed after selecting.

    Raises:
        UsageError: a selector names no rule.
    """
    chosen: set[str] = set()
    selectors = split_selectors(select) or ["ALL"]
    for selector in selectors:
        chosen |= _expand(selector)
    for selector in split_selectors(ignore):
        chosen -= _expand(selector)
    return frozenset(chosen)


def at_least(severity: str, threshold: str) -> bool:
    """Whether ``severity`` is at or above ``threshold`` (``error`` > ``warning`` > ``info``)."""
    return SEVERITY_RANK[severity] >= SEVERITY_RANK[threshold]
