"""Every rule family run on one target, by one checker object (split into checks/ next)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lora_tools.adapter import CONV, Adapter, LoraModule
from lora_tools.errors import LoraToolError
from lora_tools.formats import WEIGHT_NAMES, registry
from lora_tools.formats import diffusers_old as diffusers_old_format
from lora_tools.formats import kohya as kohya_format
from lora_tools.formats import peft as peft_format
from lora_tools.formats.base import AdapterFormat, AdapterSource, classify_foreign
from lora_tools.formats.peft import CONFIG_NAME
from lora_tools.io.safetensors import (
    DTYPES,
    PICKLE_SUFFIXES,
    Header,
    SafetensorsFile,
    TensorInfo,
    check_header,
    read_header_bytes,
)
from lora_tools.ops.inspect import robust_outliers
from lora_tools.ops.validate.report import FileReport, Finding, Progress
from lora_tools.ops.validate.rules import ERROR, PROBLEM_RULES, RULES
from lora_tools.ops.validate.scan import TensorScan, gram
from lora_tools.ops.validate.targets import Target

#: Modified z-score (log10 of the update norm) above which a module is an extreme outlier. The
#: inspect view flags at 3.5; validate fails builds, so it only speaks up for a far larger gap
#: (with typical spreads, an order of magnitude away from the median).
OUTLIER_Z = 8.0
#: ...and only when the norm is at least this many times above (or below) the median, so that a
#: file whose modules are all alike (tiny MAD) does not turn small differences into findings.
OUTLIER_MIN_RATIO = 10.0
#: Bytes read per chunk for tensors that are not LoRA factors (embeddings, modules_to_save).
FLOAT_DTYPES = frozenset(
    name for name in DTYPES if name.startswith(("F", "BF")) or name in ("C64",)
)


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


class Checker:
    """Validates one target; findings for disabled rules are never produced."""

    def __init__(
        self,
        target: Target,
        rules: frozenset[str],
        checkpoint: Any | None,
        progress: Progress | None,
        chunk_bytes: int,
    ) -> None:
        self.target = target
        self.rules = rules
        self.checkpoint = checkpoint
        self.progress = progress
        self.chunk_bytes = chunk_bytes
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
                chunk = max(info.nbytes, 1) if role else self.chunk_bytes
                state = TensorScan(info.dtype)
                for raw in scan.iter_raw(info.name, chunk):
                    if digest is not None:
                        digest.update(raw)
                    state.feed(raw)
                    if role is not None and state.finite and want_norms:
                        grams.setdefault(role[0], {})[role[1]] = gram(raw, info, role[1])
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
