"""``validate``: check adapter files for everything that makes them fail, or load as a no-op.

Checks run in layers, each on what the previous one could establish (rules in
:mod:`lora_tools.ops.rules`, documented in docs/rules.md):

1. file integrity (``LT0xx``): every problem :func:`~lora_tools.io.safetensors.check_header`
   finds, all of them, plus pickles, which are never opened;
2. structure (``LT1xx``): factors, ranks, shapes, alphas, adapter types and keys, from the header
   (plus kohya's scalar alpha tensors); tensors named by a container problem are left out here;
3. config and metadata (``LT3xx``): adapter_config.json or diffusers' ``lora_adapter_metadata``
   against the tensors, kohya's ``ss_network_dim`` / ``ss_network_alpha``;
4. values (``LT2xx``): one pass over the data buffer in file order, each byte read once, in
   bounded chunks: NaN/Inf, all-zero factors, update-norm outliers and ``sshs_model_hash``;
5. base (``LT4xx``, with ``base``): every module resolved to exactly one base weight.

Validation never writes anything and never modifies its inputs; torch is never imported.

Example:
    >>> from lora_tools.ops.validate import validate
    >>> report = validate(["fixtures/broken/truncated.safetensors"])      # doctest: +SKIP
    >>> [f.rule.code for f in report.findings]                            # doctest: +SKIP
    ['LT012']
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import numpy as np

from lora_tools import __version__
from lora_tools.adapter import CONV, Adapter, LoraModule
from lora_tools.errors import LoraToolError, UsageError
from lora_tools.formats import WEIGHT_NAMES, registry
from lora_tools.formats import diffusers_old as diffusers_old_format
from lora_tools.formats import kohya as kohya_format
from lora_tools.formats import peft as peft_format
from lora_tools.formats.base import AdapterFormat, AdapterSource, classify_foreign
from lora_tools.io.hub import parse_hub_id, resolve_input
from lora_tools.io.safetensors import (
    DTYPES,
    PICKLE_SUFFIXES,
    Header,
    SafetensorsFile,
    TensorInfo,
    check_header,
    numpy_dtype,
    read_header_bytes,
)
from lora_tools.ops.inspect import robust_outliers
from lora_tools.ops.rules import (
    ERROR,
    INFO,
    PROBLEM_RULES,
    RULES,
    SEVERITIES,
    WARNING,
    Rule,
    at_least,
    select_rules,
    split_selectors,
)

SCHEMA_VERSION = 1
OUTPUT_FORMATS = ("text", "json", "github", "sarif")
FAIL_ON = (ERROR, WARNING)
#: Modified z-score (log10 of the update norm) above which a module is an extreme outlier. The
#: inspect view flags at 3.5; validate fails builds, so it only speaks up for a far larger gap
#: (with typical spreads, an order of magnitude away from the median).
OUTLIER_Z = 8.0
#: ...and only when the norm is at least this many times above (or below) the median, so that a
#: file whose modules are all alike (tiny MAD) does not turn small differences into findings.
OUTLIER_MIN_RATIO = 10.0
#: Bytes read per chunk for tensors that are not LoRA factors (embeddings, modules_to_save).
CHUNK_BYTES = 8 << 20
FLOAT_DTYPES = frozenset(
    name for name in DTYPES if name.startswith(("F", "BF")) or name in ("C64",)
)
#: dtype -> (unsigned view, mask clearing the sign bit, bit pattern of +Inf). With the sign
#: cleared, max(bits) >= Inf means NaN/Inf somewhere and max(bits) == 0 means all zeros: both
#: from one masked max, the cheapest way to look at every value.
_BIT_CHECKS: dict[str, tuple[type, int, int]] = {
    "F16": (np.uint16, 0x7FFF, 0x7C00),
    "BF16": (np.uint16, 0x7FFF, 0x7F80),
    "F32": (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    "F64": (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}
CONFIG_NAME = peft_format.CONFIG_NAME


# ----------------------------------------------------------------------------- report model


@dataclass(frozen=True)
class Finding:
    """One rule violation.

    Attributes:
        rule: the rule violated (code, name, severity).
        path: the file the finding is about (weights, config, or the folder), as given.
        message: what is wrong, naming the module or tensor, expected vs found.
        module: the module or tensor (or config key) concerned, if any.
        expected: what a valid file would hold, if there is one answer.
        found: what this file holds.
        hint: what to do about it.
    """

    rule: Rule
    path: str
    message: str
    module: str | None = None
    expected: str | None = None
    found: str | None = None
    hint: str | None = None

    @property
    def severity(self) -> str:
        return self.rule.severity

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.code,
            "name": self.rule.name,
            "severity": self.severity,
            "path": self.path,
            "module": self.module,
            "message": self.message,
            "expected": self.expected,
            "found": self.found,
            "hint": self.hint,
        }


@dataclass
class FileReport:
    """The findings for one adapter (a weights file, plus its config when it has one)."""

    path: str
    format: str | None = None
    config: str | None = None
    findings: list[Finding] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        found = Counter(f.severity for f in self.findings)
        return {sev: found.get(sev, 0) for sev in reversed(SEVERITIES)}


@dataclass
class Report:
    """Everything one validation run found, file by file."""

    files: list[FileReport]
    rules: frozenset[str]
    base: str | None = None

    @property
    def findings(self) -> list[Finding]:
        return [f for fr in self.files for f in fr.findings]

    def counts(self) -> dict[str, int]:
        found = Counter(f.severity for f in self.findings)
        return {sev: found.get(sev, 0) for sev in reversed(SEVERITIES)}

    def failed(self, fail_on: str = ERROR) -> bool:
        """Whether any finding is at or above ``fail_on`` (``error`` or ``warning``)."""
        return any(at_least(f.severity, fail_on) for f in self.findings)


class Progress(Protocol):
    """Receives how many data bytes the value rules will read, then each chunk read."""

    def start(self, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Defaults for the command line, from ``[tool.loratool.validate]`` in pyproject.toml."""

    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    fail_on: str = ERROR
    output_format: str = "text"
    source: Path | None = None


_SETTING_KEYS = {"select", "ignore", "fail-on", "output-format"}


def load_settings(start: str | os.PathLike[str] | None = None) -> Settings:
    """Read ``[tool.loratool.validate]`` from the nearest pyproject.toml at or above ``start``.

    Keys: ``select`` and ``ignore`` (a list, or a comma-separated string of codes, prefixes or
    names), ``fail-on`` (``error`` or ``warning``), ``output-format`` (``text``, ``json``,
    ``github`` or ``sarif``). A pyproject.toml without the table gives the defaults.

    Raises:
        UsageError: unparsable TOML, an unknown key or an invalid value (names the file).

    Example:
        >>> load_settings("/").fail_on
        'error'
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            break
    else:
        return Settings()
    try:
        doc = tomllib.loads(candidate.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read settings: {exc}", path=candidate) from None
    table = doc.get("tool", {}).get("loratool", {}).get("validate")
    if table is None:
        return Settings()

    def bad(key: str, value: object, expected: str) -> UsageError:
        return UsageError(
            f"[tool.loratool.validate] {key} = {value!r}: expected {expected}", path=candidate
        )

    if not isinstance(table, dict):
        raise bad("validate", table, "a table")
    unknown = sorted(set(table) - _SETTING_KEYS)
    if unknown:
        raise UsageError(
            f"[tool.loratool.validate] has unknown key(s) {', '.join(unknown)}",
            path=candidate,
            hint=f"known keys: {', '.join(sorted(_SETTING_KEYS))}",
        )
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("select", "ignore"):
        value = table.get(key, [])
        if isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            lists[key] = tuple(split_selectors(value))
            try:
                select_rules(lists[key] or None)
            except UsageError as exc:
                raise UsageError(
                    f"[tool.loratool.validate] {key}: {exc.message}", path=candidate, hint=exc.hint
                ) from None
        else:
            raise bad(key, value, "a list of rule codes")
    fail_on = table.get("fail-on", ERROR)
    if fail_on not in FAIL_ON:
        raise bad("fail-on", fail_on, " or ".join(FAIL_ON))
    output_format = table.get("output-format", "text")
    if output_format not in OUTPUT_FORMATS:
        raise bad("output-format", output_format, ", ".join(OUTPUT_FORMATS))
    return Settings(lists["select"], lists["ignore"], fail_on, output_format, candidate)


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One adapter to validate: a weights file (or a pickle), its config, or a problem path."""

    path: str
    weights: Path | None
    config: Path | None = None
    config_display: str | None = None
    problem: str | None = None  # an LT0xx code when the path itself is the finding
    problem_message: str | None = None

    @property
    def key(self) -> tuple[str, ...]:
        parts = [os.path.realpath(self.weights) if self.weights else self.path]
        parts.append(os.path.realpath(self.config) if self.config else "")
        return tuple(parts)


def _join(display: str, name: str) -> str:
    return os.path.normpath(os.path.join(display, name))


def _folder_targets(display: str, folder: Path) -> list[Target]:
    config = folder / CONFIG_NAME
    cfg = config if config.is_file() else None
    cfg_display = _join(display, CONFIG_NAME) if cfg else None
    standard = [folder / n for n in WEIGHT_NAMES if (folder / n).is_file()]
    files = standard or sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if files:
        targets = []
        for weights in files:
            # The config belongs to PEFT's weights file, or to the folder's only weights file.
            attach = cfg is not None and (weights.name == WEIGHT_NAMES[0] or len(files) == 1)
            targets.append(
                Target(
                    _join(display, weights.name),
                    weights,
                    cfg if attach else None,
                    cfg_display if attach else None,
                )
            )
        return targets
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        return [Target(_join(display, p.name), p, cfg, cfg_display) for p in pickles]
    return [
        Target(
            display,
            None,
            cfg,
            cfg_display,
            problem="LT018",
            problem_message="no adapter weights here (looked for adapter_model.safetensors, "
            "pytorch_lora_weights.safetensors, *.safetensors)",
        )
    ]


def discover(paths: Iterable[str | os.PathLike[str]]) -> list[Target]:
    """The adapters named by ``paths`` (files, folders or Hub ids), each once.

    A folder means its adapter weights (PEFT's or diffusers' file name, else every
    ``*.safetensors`` in it); ``adapter_config.json`` alone means its folder; a weights file
    named ``adapter_model.safetensors`` takes the config beside it. Paths naming the same files
    are validated once.
    """
    out: dict[tuple[str, ...], Target] = {}
    for spec in paths:
        display = os.fspath(spec)
        path = Path(display)
        if not path.exists() and parse_hub_id(display) is not None:
            path = resolve_input(display, role="adapter")  # a local path always wins
        if path.is_dir():
            found = _folder_targets(display, path)
        elif path.is_file() and path.name == CONFIG_NAME:
            found = _folder_targets(os.path.dirname(display) or ".", path.parent)
        elif path.is_file():
            config = path.with_name(CONFIG_NAME)
            attach = path.name == WEIGHT_NAMES[0] and config.is_file()
            found = [
                Target(
                    display,
                    path,
                    config if attach else None,
                    _join(os.path.dirname(display), CONFIG_NAME) if attach else None,
                )
            ]
        else:
            found = [
                Target(
                    display,
                    None,
                    problem="LT017",
                    problem_message="no such file or folder",
                )
            ]
        for target in found:
            out.setdefault(target.key, target)
    # A weights file given alone and again through its folder is one adapter: keep the one
    # that carries the config.
    by_weights: dict[str, Target] = {}
    for target in out.values():
        wkey = os.path.realpath(target.weights) if target.weights else target.path
        kept = by_weights.get(wkey)
        if kept is None or (kept.config is None and target.config is not None):
            by_weights[wkey] = target
    return list(by_weights.values())


# ----------------------------------------------------------------------------- the checker


@dataclass
class _Stem:
    """The tensors of one module stem as the format names them (role -> key)."""

    roles: dict[str, str] = field(default_factory=dict)
    embedding: bool = False


def _parse_role(format_name: str, key: str) -> tuple[str, str, bool] | None:
    """``(stem, role, is_embedding)`` for a LoRA tensor key of a built-in format, else None."""
    if format_name in ("peft", "diffusers"):
        m = peft_format._ROLE_RE.match(key)
        if m is None:
            return None
        role = m.group("role")
        return m.group("stem"), peft_format._ROLES[role], role.startswith("lora_embedding")
    if format_name == "kohya":
        m = kohya_format._ROLE_RE.match(key)
        if m is None:
            return None
        return m.group("stem"), kohya_format._ROLES[m.group("role")], False
    if format_name == "diffusers-old":
        parsed = diffusers_old_format.parse_key(key)
        return (parsed[0], parsed[2], False) if parsed else None
    return None


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class _Checker:
    """Validates one target; findings for disabled rules are never produced."""

    def __init__(
        self,
        target: Target,
        rules: frozenset[str],
        checkpoint: Any | None,
        progress: Progress | None,
    ) -> None:
        self.target = target
        self.rules = rules
        self.checkpoint = checkpoint
        self.progress = progress
        self.report = FileReport(target.path, config=target.config_display)
        self.path = target.path
        self._file: SafetensorsFile | None = None  # the weights, over the trusted tensors
        self._no_alpha: list[str] = []
        self._nonfinite_alphas: set[str] = set()  # stems whose NaN alpha LT108 reported

    # -- helpers ------------------------------------------------------------------------------

    def add(
        self,
        code: str,
        message: str,
        *,
        module: str | None = None,
        expected: object = None,
        found: object = None,
        hint: str | None = None,
        path: str | None = None,
    ) -> None:
        if code not in self.rules:
            return
        self.report.findings.append(
            Finding(
                RULES[code],
                path or self.path,
                message,
                module=module,
                expected=None if expected is None else str(expected),
                found=None if found is None else str(found),
                hint=hint,
            )
        )

    def has_errors(self, prefix: str) -> bool:
        return any(
            f.rule.code.startswith(prefix) and f.severity == ERROR for f in self.report.findings
        )

    # -- 1. container -------------------------------------------------------------------------

    def run(self) -> FileReport:
        t = self.target
        if t.problem is not None:
            self.add(t.problem, t.problem_message or "", hint=self._problem_hint(t.problem))
            self._config_only()
            return self.report
        assert t.weights is not None
        if t.weights.suffix.lower() in PICKLE_SUFFIXES:
            self.add(
                "LT016",
                f"{t.weights.name} is a pickle; loading it can run arbitrary code, so loratool "
                "reports it without opening it",
                hint="re-save the adapter as safetensors in a trusted environment "
                "(PEFT: save_pretrained(..., safe_serialization=True))",
            )
            self._config_only()
            return self.report
        try:
            raw, header_bytes, file_bytes = read_header_bytes(t.weights)
        except LoraToolError as exc:
            code = PROBLEM_RULES.get(exc.kind or "", "LT017")
            self.add(code, exc.message, hint=exc.hint)
            self._config_only()
            return self.report
        header, problems = check_header(raw, header_bytes, file_bytes)
        for problem in problems:
            self.add(
                PROBLEM_RULES[problem.kind],
                problem.message,
                module=problem.tensor,
                hint=problem.hint,
            )
        if header is None:
            self._config_only()
            return self.report
        self._after_header(header, problems)
        return self.report

    @staticmethod
    def _problem_hint(code: str) -> str | None:
        if code == "LT018":
            return "pass the adapter file itself, or save the adapter as safetensors"
        return "check the path"

    def _config_only(self) -> None:
        """Checks of the config alone, when the weights could not be read."""
        if self.target.config is None:
            return
        config = self._read_config()
        if config is not None:
            self._check_peft_type(config, self.target.config_display or "")

    def _read_config(self) -> dict[str, Any] | None:
        assert self.target.config is not None
        display = self.target.config_display or str(self.target.config)
        try:
            text = self.target.config.read_text(encoding="utf-8")
            doc = json.loads(text)
        except (OSError, UnicodeDecodeError) as exc:
            self.add("LT302", f"cannot read config: {exc}", path=display)
            return None
        except json.JSONDecodeError as exc:
            self.add(
                "LT302",
                f"config is not valid JSON: {exc}",
                path=display,
                hint="fix or regenerate adapter_config.json (PEFT's save_pretrained writes it)",
            )
            return None
        if not isinstance(doc, dict):
            self.add(
                "LT302",
                f"config is a JSON {type(doc).__name__}, expected an object",
                path=display,
            )
            return None
        return doc

    # -- 2. structure -------------------------------------------------------------------------

    def _after_header(self, header: Header, problems: list[Any]) -> None:
        t = self.target
        assert t.weights is not None
        # Tensors a container problem names cannot be trusted: leave them out of later rules.
        quarantined = {p.tensor for p in problems if p.tensor}
        data_bytes = header.data_bytes
        beyond = {name for name, info in header.tensors.items() if info.end > data_bytes}
        all_names = list(dict.fromkeys([*header.tensors, *quarantined]))
        usable = Header(
            {
                name: info
                for name, info in header.tensors.items()
                if name not in quarantined and name not in beyond
            },
            header.metadata,
            header.header_bytes,
            header.file_bytes,
        )
        metadata = header.metadata or {}

        fmt = self._detect(all_names, metadata)
        if fmt is None:
            return
        self.report.format = fmt.name
        self._file = SafetensorsFile(t.weights, header=usable)
        try:
            self._with_format(fmt, all_names, usable, problems, quarantined | beyond)
        finally:
            self._file.close()

    def _with_format(
        self,
        fmt: AdapterFormat,
        all_names: list[str],
        usable: Header,
        problems: list[Any],
        untrusted: set[str],
    ) -> None:
        t = self.target
        assert t.weights is not None
        bad_stems, stems = self._structure(fmt, all_names, usable, untrusted)

        excluded = {key for stem in bad_stems for key in stems[stem].roles.values()} | untrusted
        reader_header = replace(
            usable,
            tensors={n: i for n, i in usable.tensors.items() if n not in excluded},
        )
        config = None
        if t.config is not None and fmt.name == "peft":
            config = self._read_config()
        elif t.config is not None:
            self._read_config()  # report a broken config even when it is not used
        file = SafetensorsFile(t.weights, header=reader_header)
        try:
            source = AdapterSource(
                weights=t.weights, file=file, config=config, config_path=t.config
            )
            try:
                adapter = fmt.read(source)
            except LoraToolError as exc:
                self.add("LT104", exc.message, hint=exc.hint)
                return
            self._adapter_rules(fmt, adapter, stems, bad_stems, config)
            if any(code.startswith("LT2") for code in self.rules):
                clean = not problems
                self._values(adapter, usable, file, clean)
            if self.checkpoint is not None and any(c.startswith("LT4") for c in self.rules):
                self._base(adapter)
        finally:
            file.close()

    def _detect(self, names: list[str], metadata: dict[str, str]) -> AdapterFormat | None:
        best, best_score = None, 0
        for fmt in registry().values():
            score = fmt.score(names, metadata)
            if score > best_score:
                best, best_score = fmt, score
        if best is None:
            sample = ", ".join(repr(k) for k in names[:3]) or "no tensors at all"
            self.add(
                "LT113",
                f"tensor names match no LoRA naming scheme (peft, diffusers, kohya, "
                f"diffusers-old); first keys: {sample}",
                hint="is this a LoRA adapter? exclude base checkpoints from the hook",
            )
        return best

    def _structure(
        self,
        fmt: AdapterFormat,
        names: list[str],
        header: Header,
        untrusted: set[str],
    ) -> tuple[set[str], dict[str, _Stem]]:
        """Check every module stem's tensors; return the stems that cannot be loaded."""
        stems: dict[str, _Stem] = {}
        foreign: dict[str, set[str]] = {}
        unknown: list[str] = []
        for key in names:
            found = classify_foreign(key)
            if found is not None:
                foreign.setdefault(found[0], set()).add(found[1])
                continue
            parsed = _parse_role(fmt.name, key)
            if parsed is None:
                unknown.append(key)
                continue
            stem, role, embedding = parsed
            entry = stems.setdefault(stem, _Stem())
            entry.roles[role] = key
            entry.embedding = entry.embedding or embedding
        foreign_stems = {s for group in foreign.values() for s in group}
        bad: set[str] = set()
        info = header.tensors
        for stem, entry in stems.items():
            if stem in foreign_stems:
                continue
            if any(key in untrusted for key in entry.roles.values()):
                bad.add(stem)  # already reported by a container rule
                continue
            if not self._check_stem(fmt, stem, entry, info):
                bad.add(stem)
        self._unknown_keys(fmt, unknown)
        if self._no_alpha:
            count = len(self._no_alpha)
            self.add(
                "LT105",
                f"{count} module{'s have' if count > 1 else ' has'} no alpha tensor (e.g. "
                f"{self._no_alpha[0]!r}): kohya-style loaders use alpha = rank (scale 1)",
                module=self._no_alpha[0],
                hint="fine if scale 1 is intended; store .alpha tensors to make it explicit",
            )
        loaded = [s for s in stems if s not in foreign_stems and s not in bad]
        if foreign:
            kinds = ", ".join(f"{kind} ({len(group)} modules)" for kind, group in foreign.items())
            example = next(iter(next(iter(foreign.values()))))
            if loaded:
                self.add(
                    "LT111",
                    f"{len(loaded)} LoRA modules are mixed with {kinds}, e.g. {example!r}; "
                    "tools that handle one type silently drop the other",
                    module=example,
                    hint="split the file by adapter type, or keep it for LyCORIS-aware loaders",
                )
            else:
                self.add(
                    "LT110",
                    f"adapter type {kinds}, e.g. {example!r}: detected, not a plain LoRA; "
                    "loratool's math operations refuse it",
                    module=example,
                )
        elif not loaded and not self.has_errors("LT1") and not self.has_errors("LT0"):
            self.add(
                "LT114",
                f"no complete LoRA module among {len(names)} tensors",
                hint="is this a LoRA adapter?",
            )
        return bad, stems

    def _unknown_keys(self, fmt: AdapterFormat, unknown: list[str]) -> None:
        for key in unknown:
            if fmt.name in ("peft", "diffusers"):
                component, _ = peft_format.split_stem(key)
                if key.startswith(peft_format.PEFT_PREFIX) or component is not None:
                    # Full tensors under the adapter's prefix: modules_to_save and saved
                    # embedding layers, which PEFT loads as replacements.
                    continue
            elif fmt.name not in ("kohya", "diffusers-old"):
                continue
            self.add(
                "LT112",
                f"tensor {key!r} is not a {fmt.name} LoRA tensor (no module of the file uses "
                "it); loaders ignore it silently",
                module=key,
                hint="remove it, or check that the file was converted completely",
            )

    def _check_stem(
        self, fmt: AdapterFormat, stem: str, entry: _Stem, info: dict[str, TensorInfo]
    ) -> bool:
        roles = entry.roles
        down_key, up_key = roles.get("down"), roles.get("up")
        if down_key is None or up_key is None:
            present = ", ".join(sorted(k.removeprefix(stem + ".") for k in roles.values()))
            missing = "up (lora_B / lora_up)" if up_key is None else "down (lora_A / lora_down)"
            if down_key is None and up_key is None:
                missing = "both factors"
            self.add(
                "LT101",
                f"module {stem!r} has {present} but no {missing} factor; loaders skip it "
                "silently or keep a zero-initialised partner",
                module=stem,
                expected="both factors",
                found=present,
                hint="re-export the adapter; the file lost tensors",
            )
            return False
        down, up = info[down_key], info[up_key]
        ok = True
        for role, key in roles.items():
            if role == "alpha":
                continue
            dtype = info[key].dtype
            if dtype not in FLOAT_DTYPES or DTYPES[dtype].numpy is None:
                self.add(
                    "LT115",
                    f"tensor {key!r} has dtype {dtype}; LoRA factors are floating point "
                    "(F32, F16, BF16, F64, F8)",
                    module=stem,
                    expected="a float dtype",
                    found=dtype,
                )
                ok = False
        nd, nu = len(down.shape), len(up.shape)
        if entry.embedding:
            shape_ok = nd == 2 and nu == 2
        elif nd == 2 and nu == 2:
            shape_ok = True
        else:
            shape_ok = nd >= 3 and nu == nd and all(d == 1 for d in up.shape[2:])
        if not shape_ok:
            self.add(
                "LT104",
                f"module {stem!r}: down {_fmt_shape(down.shape)} and up {_fmt_shape(up.shape)} "
                "fit no layer kind (linear [r, in] + [out, r]; conv [r, in, *k] + [out, r, 1...]; "
                "embedding [r, n] + [d, r])",
                module=stem,
                found=f"{_fmt_shape(down.shape)} / {_fmt_shape(up.shape)}",
            )
            return False
        rank_down, rank_up = down.shape[0], up.shape[1]
        if rank_down != rank_up:
            self.add(
                "LT102",
                f"module {stem!r}: down {_fmt_shape(down.shape)} has rank {rank_down} but up "
                f"{_fmt_shape(up.shape)} has rank {rank_up}",
                module=stem,
                expected=f"up.shape[1] == {rank_down}",
                found=str(rank_up),
                hint="the factors come from different adapters or a bad resize; re-export it",
            )
            return False
        if rank_down == 0:
            self.add(
                "LT103",
                f"module {stem!r} has rank 0: its update is empty and its scale alpha / r "
                "divides by zero",
                module=stem,
                hint="drop the module, or re-train it with r >= 1",
            )
            return False
        out = up.shape[0]
        for role, expected in (("magnitude", out), ("bias", out)):
            key = roles.get(role)
            if key is None:
                continue
            shape = info[key].shape
            fits = math.prod(shape) == expected and (
                len(shape) == 1 or (role == "magnitude" and sum(d != 1 for d in shape) <= 1)
            )
            if not fits:
                self.add(
                    "LT104",
                    f"module {stem!r}: {role} {_fmt_shape(shape)} does not match the "
                    f"{expected} outputs of up {_fmt_shape(up.shape)}",
                    module=stem,
                    expected=f"[{expected}]",
                    found=_fmt_shape(shape),
                )
                ok = False
        if fmt.name == "kohya" and ok:
            ok = self._check_kohya_alpha(stem, roles.get("alpha"), info)
        return ok

    def _check_kohya_alpha(self, stem: str, key: str | None, info: dict[str, TensorInfo]) -> bool:
        if key is None:
            self._no_alpha.append(stem)
            return True
        tinfo = info[key]
        if tinfo.numel != 1:
            self.add(
                "LT109",
                f"alpha {key!r} has shape {_fmt_shape(tinfo.shape)}; alpha is one number "
                "(shape [] or [1])",
                module=stem,
                expected="[] or [1]",
                found=_fmt_shape(tinfo.shape),
            )
            return False
        if DTYPES[tinfo.dtype].numpy is None or tinfo.dtype == "BOOL":
            self.add(
                "LT115",
                f"alpha {key!r} has dtype {tinfo.dtype}, which holds no usable number",
                module=stem,
                found=tinfo.dtype,
            )
            return False
        assert self._file is not None
        value = float(np.asarray(self._file.read(key), dtype=np.float64).reshape(()))
        return self._check_alpha_value(stem, value, f"alpha tensor {key!r}")

    def _check_alpha_value(
        self, module: str, value: float, what: str, path: str | None = None
    ) -> bool:
        if not math.isfinite(value):
            self._nonfinite_alphas.add(module)
            self.add(
                "LT108",
                f"{what} of {module!r} is {value}; every scale alpha / r becomes {value}",
                module=module,
                expected="a finite number",
                found=str(value),
                path=path,
            )
            return False
        if value == 0:
            self.add(
                "LT106",
                f"{what} of {module!r} is 0: kohya-style loaders read it as alpha = rank "
                "(scale 1), PEFT-style loaders as scale 0 (no effect)",
                module=module,
                found="0",
                hint="store the intended alpha (usually the rank, or the training alpha)",
                path=path,
            )
        elif value < 0:
            self.add(
                "LT107",
                f"{what} of {module!r} is {_num(value)}: the update is applied with its sign "
                "flipped",
                module=module,
                found=_num(value),
                hint="negative alphas are almost always a conversion bug",
                path=path,
            )
        return True

    # -- 3. config and metadata ---------------------------------------------------------------

    def _adapter_rules(
        self,
        fmt: AdapterFormat,
        adapter: Adapter,
        stems: dict[str, _Stem],
        bad_stems: set[str],
        config: dict[str, Any] | None,
    ) -> None:
        modules = list(adapter.modules.values())
        if fmt.name == "peft":
            # Only PEFT's own layout promises a config; a bare renamed file carries none.
            weights = self.target.weights
            if (
                self.target.config is None
                and weights is not None
                and weights.name == WEIGHT_NAMES[0]
            ):
                self.add(
                    "LT301",
                    f"PEFT keys ({len(modules)} modules) but no {CONFIG_NAME} beside the "
                    "weights: PEFT cannot load the adapter, and r / lora_alpha are unknown "
                    "(scale 1 assumed)",
                    hint=f"add the {CONFIG_NAME} the adapter was trained with",
                )
            elif config is not None:
                display = self.target.config_display or str(self.target.config)
                self._check_peft_type(config, display)
                self._check_config(config, modules, display, bad_stems)
        elif fmt.name == "diffusers":
            self._check_diffusers_metadata(adapter, modules)
        elif fmt.name == "kohya":
            self._check_kohya_metadata(adapter, modules)

    def _check_peft_type(self, config: dict[str, Any], display: str) -> None:
        peft_type = config.get("peft_type")
        if peft_type != "LORA":
            self.add(
                "LT303",
                f"peft_type is {peft_type!r}, expected 'LORA'"
                + ("; PEFT cannot load a config without it" if peft_type is None else ""),
                module="peft_type",
                expected="LORA",
                found=repr(peft_type),
                path=display,
                hint="loratool handles LoRA adapters only"
                if peft_type is not None
                else 'add "peft_type": "LORA"',
            )

    def _check_config(
        self,
        config: dict[str, Any],
        modules: list[LoraModule],
        display: str,
        bad_stems: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        """r / lora_alpha / patterns / target_modules / use_dora of one config vs its modules."""
        paths = [m.path or m.key for m in modules]
        r = config.get("r")
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
            if not isinstance(pattern, dict):
                self.add(
                    "LT302",
                    f"{name} is a {type(pattern).__name__}, expected an object",
                    module=name,
                    path=display,
                )
                continue
            for key in pattern:
                try:
                    regex = re.compile(rf"(.*\.)?({key})$")
                except re.error as exc:
                    self.add(
                        "LT305",
                        f"{name} key {key!r} is not a valid regular expression ({exc}); PEFT "
                        "skips it",
                        module=f"{name}[{key!r}]",
                        path=display,
                    )
                    continue
                if paths and not any(regex.match(p) for p in paths):
                    self.add(
                        "LT305",
                        f"{name} key {key!r} matches none of the {len(paths)} modules; PEFT "
                        "ignores it silently, so its value applies nowhere",
                        module=f"{name}[{key!r}]",
                        path=display,
                        hint="PEFT matches keys as (.*\\.)?(KEY)$ against module paths such as "
                        f"{paths[0]!r}",
                    )
        if not isinstance(rank_pattern, dict):
            rank_pattern = {}
        if not isinstance(alpha_pattern, dict):
            alpha_pattern = {}

        if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
            self.add(
                "LT304",
                f"r is {r!r}, expected a positive integer",
                module="r",
                expected="a positive integer",
                found=repr(r),
                path=display,
            )
            r = None
        for m in modules:
            key = peft_format.pattern_key(rank_pattern, m.path or "")
            expected = rank_pattern[key] if key is not None else r
            if expected is None or expected == m.rank:
                continue
            source = f"rank_pattern[{key!r}]" if key is not None else "r"
            self.add(
                "LT304",
                f"module {m.key!r} has rank {m.rank} (down {_fmt_shape(m.down.shape)}) but the "
                f"config's {source} says {expected}; PEFT refuses to load it (size mismatch)",
                module=m.key,
                expected=str(expected),
                found=str(m.rank),
                path=display,
                hint=f"set {source} to {m.rank}",
            )

        alpha = config.get("lora_alpha", r)
        checks = [("lora_alpha", alpha)] + [
            (f"alpha_pattern[{k!r}]", v) for k, v in alpha_pattern.items()
        ]
        for name, value in checks:
            if value is None:
                continue
            try:
                number = float(value) if not isinstance(value, bool) else float("nan")
            except (TypeError, ValueError):
                number = float("nan")
            self._check_alpha_value(name, number, "config value", path=display)

        self._check_targets(config, modules, display)
        self._check_dora(config, modules, display)

    def _check_targets(
        self, config: dict[str, Any], modules: list[LoraModule], display: str
    ) -> None:
        targets = config.get("target_modules")
        if targets is None or not modules:
            return
        if isinstance(targets, str):
            if targets.lower() == "all-linear":
                return  # PEFT resolves it at creation; any linear layer qualifies

            def covered(path: str) -> bool:
                try:
                    return re.fullmatch(targets, path) is not None
                except re.error:
                    return False
        elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):

            def covered(path: str) -> bool:
                return any(path == t or path.endswith("." + t) for t in targets)
        else:
            self.add(
                "LT302",
                f"target_modules is {targets!r}, expected a list of names or a regex string",
                module="target_modules",
                path=display,
            )
            return
        missing = [m for m in modules if not covered(m.path or m.key)]
        shown = targets if isinstance(targets, str) else ", ".join(targets)
        if len(missing) == len(modules):
            self.add(
                "LT306",
                f"target_modules ({shown}) covers none of the {len(modules)} saved modules "
                f"(e.g. {modules[0].path!r}); PEFT creates other layers and ignores every "
                "saved tensor",
                module="target_modules",
                expected=f"names matching e.g. {modules[0].target_name!r}",
                found=shown,
                path=display,
                hint="set target_modules to the layers the adapter was trained on",
            )
            return
        for m in missing:
            self.add(
                "LT307",
                f"module {m.key!r} ({m.path}) is not covered by target_modules ({shown}); "
                "PEFT creates no layer for it and drops its tensors silently",
                module=m.key,
                path=display,
                hint=f"add {m.target_name!r} to target_modules",
            )

    def _check_dora(self, config: dict[str, Any], modules: list[LoraModule], display: str) -> None:
        if not modules:
            return
        use_dora = bool(config.get("use_dora", False))
        with_magnitude = [m for m in modules if m.dora]
        if use_dora and not with_magnitude:
            self.add(
                "LT308",
                f"use_dora is true but none of the {len(modules)} modules has a "
                "lora_magnitude_vector; PEFT would initialise magnitudes from the base",
                module="use_dora",
                expected="lora_magnitude_vector per module",
                found="none",
                path=display,
                hint="set use_dora to false, or save the DoRA adapter again",
            )
        elif not use_dora and with_magnitude:
            self.add(
                "LT308",
                f"{len(with_magnitude)} modules carry lora_magnitude_vector but use_dora is "
                "false; PEFT loads them as plain LoRA and drops the magnitudes silently",
                module="use_dora",
                expected="use_dora: true",
                found="false",
                path=display,
                hint="set use_dora to true",
            )

    def _check_diffusers_metadata(self, adapter: Adapter, modules: list[LoraModule]) -> None:
        raw = adapter.metadata.get(peft_format.DIFFUSERS_METADATA_KEY)
        if raw is None:
            return
        try:
            flat = json.loads(raw)
        except json.JSONDecodeError as exc:
            flat = None
            problem = f"is not valid JSON ({exc})"
        else:
            problem = "is not a JSON object"
        if not isinstance(flat, dict):
            self.add(
                "LT302",
                f"__metadata__[{peft_format.DIFFUSERS_METADATA_KEY!r}] {problem}; diffusers "
                "falls back to guessing rank and alpha",
                module=f"__metadata__[{peft_format.DIFFUSERS_METADATA_KEY!r}]",
            )
            return
        configs = peft_format.diffusers_component_configs(adapter.metadata)
        by_component: dict[str, list[LoraModule]] = {}
        for m in modules:
            by_component.setdefault(m.component or "", []).append(m)
        for component, config in configs.items():
            members = by_component.get(component, [])
            if not members:
                continue
            self._check_config(config, members, self.path)

    def _check_kohya_metadata(self, adapter: Adapter, modules: list[LoraModule]) -> None:
        if not modules:
            return
        meta = adapter.metadata
        try:
            args = json.loads(meta.get("ss_network_args") or "{}")
        except json.JSONDecodeError:
            args = {}
        if not isinstance(args, dict):
            args = {}
        # kohya trains 3x3 (and larger) convolutions with conv_dim / conv_alpha, everything else
        # (linear layers and 1x1 convolutions) with network_dim / network_alpha.
        wide = [m for m in modules if m.kind == CONV and math.prod(m.kernel) > 1]
        narrow = [m for m in modules if m not in wide]
        groups = (
            (narrow, meta.get("ss_network_dim"), meta.get("ss_network_alpha"), "ss_network"),
            (wide, args.get("conv_dim"), args.get("conv_alpha"), "ss_network_args conv"),
        )
        for members, dim, alpha, label in groups:
            if not members:
                continue
            dim_value = _parse_number(dim)
            if dim_value is not None:
                # Per-block and per-type dims (block_dims, type_dims) legitimately vary, with
                # the metadata naming the default: only a value no module has is stale.
                ranks = Counter(m.rank for m in members)
                if all(m.rank != dim_value for m in members):
                    self.add(
                        "LT309",
                        f"{label}_dim says {_num(dim_value)} but none of the {len(members)} "
                        f"modules has that rank ({_hist(ranks)})",
                        module=members[0].key,
                        expected=_num(dim_value),
                        found=_hist(ranks),
                        hint="the metadata is stale (resized or merged file); update it, or "
                        "set it to Dynamic",
                    )
            alpha_value = _parse_number(alpha)
            # Stored alphas may be fp16-rounded: compare with a relative tolerance.
            if alpha_value is not None and not any(
                math.isclose(m.effective_alpha, alpha_value, rel_tol=1e-3, abs_tol=1e-6)
                for m in members
            ):
                alphas = Counter(_num(m.effective_alpha) for m in members)
                self.add(
                    "LT310",
                    f"{label}_alpha says {_num(alpha_value)} but none of the {len(members)} "
                    f"modules has that alpha ({_hist(alphas)})",
                    module=members[0].key,
                    expected=_num(alpha_value),
                    found=_hist(alphas),
                    hint="the metadata is stale (rescaled or merged file); update it",
                )

    # -- 4. values ----------------------------------------------------------------------------

    def _values(self, adapter: Adapter, header: Header, file: SafetensorsFile, clean: bool) -> None:
        """One pass over the data in file order: each byte read once, in bounded chunks."""
        factor_role: dict[str, tuple[str, str]] = {}
        for stem, m in adapter.modules.items():
            factor_role[m.keys.get("down", "")] = (stem, "down")
            factor_role[m.keys.get("up", "")] = (stem, "up")
        expected_hash = adapter.metadata.get("sshs_model_hash") if "LT205" in self.rules else None
        digest = hashlib.sha256() if expected_hash and clean else None

        grams: dict[str, dict[str, np.ndarray]] = {}
        # The Grams are the only O(size * rank) work of the pass: skip them unless LT204 runs.
        want_norms = "LT204" in self.rules
        zero: dict[str, list[str]] = {}
        non_finite: set[str] = set()
        scan = SafetensorsFile(file.path, header=header)
        total = sum(info.nbytes for info in header.tensors.values())
        if self.progress is not None:
            self.progress.start(total)
        try:
            for info in sorted(header.tensors.values(), key=lambda i: i.begin):
                role = factor_role.get(info.name)
                stem_of_alpha = info.name.removesuffix(".alpha")
                already = stem_of_alpha != info.name and stem_of_alpha in self._nonfinite_alphas
                chunk = max(info.nbytes, 1) if role else CHUNK_BYTES
                state = _TensorScan(info.dtype)
                for raw in scan.iter_raw(info.name, chunk):
                    if digest is not None:
                        digest.update(raw)
                    state.feed(raw)
                    if role is not None and state.finite and want_norms:
                        grams.setdefault(role[0], {})[role[1]] = _gram(raw, info, role[1])
                    if self.progress is not None:
                        self.progress.advance(len(raw))
                if (state.nan or state.inf) and not already:
                    non_finite.add(info.name)
                    self.add(
                        "LT201",
                        f"tensor {info.name!r} holds {state.describe()} of {info.numel} values; "
                        "merging it makes the base weights non-finite",
                        module=role[0] if role else info.name,
                        expected="finite values",
                        found=state.describe(),
                        hint="the training diverged or the file is corrupt; use an earlier "
                        "checkpoint",
                    )
                if role is not None and state.all_zero and info.numel:
                    zero.setdefault(role[0], []).append(role[1])
        finally:
            scan.close()

        self._zero_rules(adapter, zero)
        self._outliers(adapter, grams, zero, non_finite)
        if digest is not None and expected_hash is not None:
            actual = digest.hexdigest()
            if actual != expected_hash.lower():
                self.add(
                    "LT205",
                    f"sshs_model_hash is {expected_hash} but the data buffer hashes to {actual}: "
                    "the tensors changed after the hash was written, or the file is corrupt",
                    module="__metadata__[sshs_model_hash]",
                    expected=actual,
                    found=expected_hash,
                    hint="re-save with a tool that refreshes the hash (loratool does), or drop "
                    "sshs_model_hash and sshs_legacy_hash",
                )

    def _zero_rules(self, adapter: Adapter, zero: dict[str, list[str]]) -> None:
        modules = adapter.modules
        if not zero:
            return
        names = {"down": "down (lora_A)", "up": "up (lora_B)"}
        if len(zero) == len(modules):
            roles = Counter(r for rs in zero.values() for r in rs)
            which = " and ".join(f"{names[r]} x{n}" for r, n in roles.items())
            self.add(
                "LT202",
                f"every one of the {len(modules)} modules has an all-zero factor ({which}): the "
                "update is exactly zero, as saved right after initialisation, before training",
                expected="trained (non-zero) factors",
                found=f"{len(zero)} of {len(modules)} modules zero",
                hint="save the adapter after training; PEFT initialises lora_B to zero",
            )
            return
        for stem, roles in zero.items():
            self.add(
                "LT203",
                f"module {stem!r} has an all-zero {' and '.join(names[r] for r in roles)}: its "
                "update is exactly zero",
                module=stem,
                hint="this module learned nothing; drop it or check the training setup",
            )

    def _outliers(
        self,
        adapter: Adapter,
        grams: dict[str, dict[str, np.ndarray]],
        zero: dict[str, list[str]],
        non_finite: set[str],
    ) -> None:
        stems, norms = [], []
        for stem, m in adapter.modules.items():
            pair = grams.get(stem, {})
            if stem in zero or len(pair) != 2 or any(k in non_finite for k in m.keys.values()):
                continue
            scale = m.scale
            value = float(np.sum(pair["up"] * pair["down"])) * scale * scale
            if not math.isfinite(value):
                continue
            stems.append(stem)
            norms.append(math.sqrt(max(value, 0.0)))
        flags = robust_outliers(norms, threshold=OUTLIER_Z)
        positive = [n for n in norms if n > 0]
        median = float(np.median(positive)) if positive else 0.0
        for stem, norm, flag in zip(stems, norms, flags, strict=True):
            ratio = norm / median if median else float("inf")
            if not flag or 1 / OUTLIER_MIN_RATIO < ratio < OUTLIER_MIN_RATIO:
                continue
            self.add(
                "LT204",
                f"module {stem!r} has update norm ||dW||_F = {norm:.4g}, {ratio:.3g}x the "
                f"median {median:.4g} of the file's {len(norms)} modules",
                module=stem,
                expected=f"about {median:.4g}",
                found=f"{norm:.4g}",
                hint="a diverged module or a wrong alpha; inspect it with `loratool inspect "
                "--stats`",
            )

    # -- 5. base ------------------------------------------------------------------------------

    def _base(self, adapter: Adapter) -> None:
        from lora_tools.resolve import resolve

        if not adapter.modules:
            return
        res = resolve(adapter, self.checkpoint)
        base = str(self.checkpoint.path)
        for key in res.unmatched:
            m = adapter.modules[key]
            where = f" ({m.full_path})" if m.full_path and m.full_path != key else ""
            self.add(
                "LT401",
                f"module {key!r}{where} resolves to no weight of the base {base}: loaders "
                "skip it silently",
                module=key,
                expected="one base weight",
                found="none",
                hint="is this adapter made for this base model?",
            )
        for key, candidates in res.ambiguous.items():
            self.add(
                "LT402",
                f"module {key!r} matches {len(candidates)} base weights: "
                f"{', '.join(candidates[:3])}",
                module=key,
                expected="one base weight",
                found=", ".join(candidates),
                hint="use an adapter format with component prefixes (PEFT / diffusers)",
            )
        for key, message in res.shape_errors.items():
            self.add("LT403", message, module=key, hint="is this the right base model?")
        if res.total and len(res.unmatched) == res.total:
            self.add(
                "LT404",
                f"0 of {res.total} modules match this base ({base}): the adapter would load "
                "with no effect",
                expected=f"{res.total} matching modules",
                found="0",
                hint="the adapter was made for another model; check base_model_name_or_path",
            )
        pairs = Counter()
        for match in res.matches.values():
            dtype = match.module.up.dtype
            if dtype != match.target.info.dtype:
                pairs[(dtype, match.target.info.dtype)] += 1
        for (ours, theirs), count in pairs.items():
            self.add(
                "LT405",
                f"{count} modules are {ours} while their base weights are {theirs}; merges "
                f"compute in float32 and round to {theirs}",
                expected=theirs,
                found=ours,
            )


def _hist(counter: Counter) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counter.items(), key=lambda kv: str(kv[0])))


def _parse_number(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None  # "Dynamic" and friends: nothing to compare
    return number if math.isfinite(number) else None


class _TensorScan:
    """NaN/Inf counts and the all-zero flag of one tensor, fed chunk by chunk."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.nan = 0
        self.inf = 0
        self.all_zero = True
        self.finite = True

    def feed(self, raw: memoryview) -> None:
        check = _BIT_CHECKS.get(self.dtype)
        if check is not None:
            view_type, mask, inf_bits = check
            bits = np.frombuffer(raw, dtype=view_type) & view_type(mask)
            top = int(bits.max()) if bits.size else 0
            if top:
                self.all_zero = False
            if top >= inf_bits:
                self.finite = False
                self.nan += int(np.count_nonzero(bits > inf_bits))
                self.inf += int(np.count_nonzero(bits == inf_bits))
            return
        np_dtype = DTYPES[self.dtype].numpy
        if np_dtype is None:  # sub-byte floats: no NaN encoding to look for
            self.all_zero = self.all_zero and not any(raw)
            return
        values = np.frombuffer(raw, dtype=np_dtype)
        if np_dtype.kind == "c":
            values = values.view(np.float32)
        if values.size and np.any(values != 0):
            self.all_zero = False
        if np_dtype.kind in "fc" and values.size:
            as_float = values.astype(np.float32)
            nan = int(np.count_nonzero(np.isnan(as_float)))
            inf = int(np.count_nonzero(np.isinf(as_float)))
            if nan or inf:
                self.finite = False
                self.nan += nan
                self.inf += inf

    def describe(self) -> str:
        parts = []
        if self.nan:
            parts.append(f"{self.nan} NaN")
        if self.inf:
            parts.append(f"{self.inf} Inf")
        return " and ".join(parts)


def _gram(raw: memoryview, info: TensorInfo, role: str) -> np.ndarray:
    """The ``r x r`` Gram matrix of a factor: ``U^T U`` for up, ``V V^T`` for down.

    ``||s U V||_F^2 = s^2 trace(U^T U V V^T)``, so the two Grams give the update norm without
    forming it; float32 products (float64 for F64 data) are plenty for an outlier test.
    """
    values = np.frombuffer(raw, dtype=numpy_dtype(info.dtype))
    work = values if values.dtype in (np.float32, np.float64) else values.astype(np.float32)
    mat = work.reshape(info.shape[0], -1)
    with np.errstate(over="ignore", invalid="ignore"):
        gram = mat.T @ mat if role == "up" else mat @ mat.T
    if not np.all(np.isfinite(gram)):
        # Finite values beyond float32's square range: redo in float64 (rare, and exactly the
        # modules the outlier rule is for).
        mat = mat.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            gram = mat.T @ mat if role == "up" else mat @ mat.T
    return gram.astype(np.float64)


# ----------------------------------------------------------------------------- entry point


def validate(
    paths: Iterable[str | os.PathLike[str]],
    *,
    base: str | os.PathLike[str] | None = None,
    select: Iterable[str] | str | None = None,
    ignore: Iterable[str] | str | None = None,
    progress: Progress | None = None,
) -> Report:
    """Validate adapters; return every finding, file by file.

    Args:
        paths: adapter files or folders (``adapter_config.json`` alone means its folder).
        base: a base checkpoint (file, HF folder, sharded folder, diffusers folder or Hub id)
            to resolve every module against (``LT4xx`` rules).
        select: rule codes, prefixes (``LT2``), names or ``ALL`` (default: all rules).
        ignore: rules to leave out, in the same spelling.
        progress: told how many data bytes the value rules will read, then each chunk.

    Returns:
        A :class:`Report`; ``report.failed("error")`` is the exit decision.

    Raises:
        UsageError: a selector names no rule.
        LoraToolError: ``base`` cannot be opened (the CLI exits 3).

    Example:
        >>> report = validate(["fixtures/peft/llama-lora"])     # doctest: +SKIP
        >>> report.failed()                                       # doctest: +SKIP
        False
    """
    rules = select_rules(select, ignore)
    checkpoint = None
    if base is not None:
        from lora_tools.io.checkpoint import open_checkpoint
        from lora_tools.io.hub import resolve_input

        checkpoint = open_checkpoint(resolve_input(base, role="base"))
    targets = discover(paths)
    if progress is not None and any(code.startswith("LT2") for code in rules):
        total = 0
        for t in targets:
            if t.weights is not None and t.weights.suffix.lower() not in PICKLE_SUFFIXES:
                with contextlib.suppress(OSError):
                    total += t.weights.stat().st_size
        progress = _Totalled(progress, total)
    files = []
    try:
        for target in targets:
            files.append(_Checker(target, rules, checkpoint, progress).run())
    finally:
        if checkpoint is not None:
            checkpoint.close()
    return Report(files, rules, os.fspath(base) if base is not None else None)


class _Totalled:
    """Report one total for all files to a Progress (each file's scan only advances it)."""

    def __init__(self, inner: Progress, total: int) -> None:
        self.inner = inner
        inner.start(total)

    def start(self, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        self.inner.advance(nbytes)


# ----------------------------------------------------------------------------- outputs


def to_json(report: Report, fail_on: str = ERROR) -> dict[str, Any]:
    """The ``--output-format json`` document (schema in docs/rules.md, ``schema_version`` 1)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "loratool", "version": __version__},
        "base": report.base,
        "fail_on": fail_on,
        "failed": report.failed(fail_on),
        "summary": {"files": len(report.files), **report.counts()},
        "files": [
            {
                "path": fr.path,
                "config": fr.config,
                "format": fr.format,
                "counts": fr.counts(),
                "findings": [f.to_dict() for f in fr.findings],
            }
            for fr in report.files
        ],
    }


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


_GITHUB_LEVEL = {ERROR: "error", WARNING: "warning", INFO: "notice"}


def to_github(report: Report) -> list[str]:
    """GitHub Actions workflow commands, one line per finding.

    Example line: ``::error file=a.safetensors,title=LT012 truncated::a.safetensors: ...``
    """
    lines = []
    for f in report.findings:
        title = f"{f.rule.code} {f.rule.name}"
        text = f.message + (f" (hint: {f.hint})" if f.hint else "")
        lines.append(
            f"::{_GITHUB_LEVEL[f.severity]} file={_escape_property(f.path)},"
            f"title={_escape_property(title)}::{_escape_data(text)}"
        )
    return lines


_SARIF_LEVEL = {ERROR: "error", WARNING: "warning", INFO: "note"}
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def artifact_uri(path: str) -> str:
    """A SARIF artifact URI: relative paths as forward-slash URI references, absolute as file:."""
    p = Path(path)
    if p.is_absolute():
        return p.as_uri()
    return quote(p.as_posix())


def to_sarif(report: Report, docs_url: str | None = None) -> dict[str, Any]:
    """A SARIF 2.1.0 log that GitHub code scanning accepts (one run, every rule described).

    Args:
        report: the validation report.
        docs_url: where docs/rules.md is published; rule anchors are appended to it. Defaults to
            the package's documentation URL (see :func:`rules_doc_url`).
    """
    docs = docs_url or rules_doc_url()
    codes = sorted(report.rules | {f.rule.code for f in report.findings})
    index = {code: i for i, code in enumerate(codes)}
    rules = []
    for code in codes:
        rule = RULES[code]
        rules.append(
            {
                "id": rule.code,
                "name": rule.name,
                "shortDescription": {"text": rule.summary},
                "fullDescription": {"text": f"{rule.summary} ({rule.category} rule)"},
                "helpUri": f"{docs}#{rule.anchor}",
                "help": {
                    "text": f"{rule.code} {rule.name}: {rule.summary}. See {docs}#{rule.anchor}",
                    "markdown": f"**{rule.code} {rule.name}**: {rule.summary}. "
                    f"[Documentation]({docs}#{rule.anchor})",
                },
                "defaultConfiguration": {"level": _SARIF_LEVEL[rule.severity]},
                "properties": {"category": rule.category, "tags": [rule.category]},
            }
        )
    results = []
    for f in report.findings:
        text = f.message + (f" (hint: {f.hint})" if f.hint else "")
        result: dict[str, Any] = {
            "ruleId": f.rule.code,
            "ruleIndex": index[f.rule.code],
            "level": _SARIF_LEVEL[f.severity],
            "message": {"text": text},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": artifact_uri(f.path)},
                        "region": {"startLine": 1},
                    }
                }
            ],
        }
        if f.module:
            result["locations"][0]["logicalLocations"] = [{"name": f.module, "kind": "member"}]
        props = {k: v for k, v in (("expected", f.expected), ("found", f.found)) if v is not None}
        if props:
            result["properties"] = props
        results.append(result)
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "loratool",
                        "version": __version__,
                        "semanticVersion": __version__,
                        "informationUri": docs.split("#")[0],
                        "rules": rules,
                    }
                },
                "results": results,
                "columnKind": "unicodeCodePoints",
            }
        ],
    }


#: Used when the installed package's metadata names no documentation URL.
FALLBACK_DOCS_URL = "https://pypi.org/project/loratool/"


def rules_doc_url() -> str:
    """The published docs/rules.md: the package's ``Documentation`` project URL, if any."""
    try:
        from importlib.metadata import PackageNotFoundError, metadata

        urls = metadata("loratool").get_all("Project-URL") or []
    except PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("documentation", "rules"):
            return url.strip()
    return FALLBACK_DOCS_URL


__all__ = [
    "FileReport",
    "Finding",
    "Progress",
    "Report",
    "Settings",
    "Target",
    "discover",
    "load_settings",
    "to_github",
    "to_json",
    "to_sarif",
    "validate",
]
