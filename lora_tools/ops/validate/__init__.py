"""``validate``: check adapter files for everything that makes them fail, or load as a no-op.

Checks run in layers, each on what the previous one could establish (rules in
:mod:`lora_tools.ops.validate.rules`, documented in docs/rules.md):

1. file integrity (``LT0xx``): every problem :func:`~lora_tools.io.safetensors.check_header`
   finds, all of them, plus pickles, which are never opened;
2. structure (``LT1xx``): factors, ranks, shapes, alphas, adapter types and keys, from the header
   (plus kohya's scalar alpha tensors); tensors named by a container problem are left out here;
3. config and metadata (``LT3xx``): adapter_config.json or diffusers' ``lora_adapter_metadata``
   against the tensors, kohya's ``ss_network_dim`` / ``ss_network_alpha``;
4. values (``LT2xx``): one pass over the data buffer in file order, each byte read once, in
   bounded chunks: NaN/Inf, all-zero factors, update-norm outliers and ``sshs_model_hash``;
5. base (``LT4xx``, with ``base``): every module resolved to exactly one base weight;
6. deployment profiles (``LT5xx``, with ``profiles``): what each named consumer (vLLM, SGLang,
   TGI, llama.cpp, diffusers, ComfyUI, PEFT) refuses or would serve wrong.

Validation never writes anything and never modifies its inputs; torch is never imported.

Modules of this package:

- ``rules``: the rule catalogue (codes, names, severities) and rule selection;
- ``settings``: ``[tool.loratool.validate]`` defaults from pyproject.toml;
- ``targets``: which adapters (weights file + config) the given paths name;
- ``checks``: the rule families, one module each (``integrity``, ``structure``, ``config``,
  ``values``, ``base``), run on one target by ``checks.check_target``;
- ``context``: what the families share while checking one target (findings, enabled rules);
- ``scan``: the value scan's per-chunk arithmetic (NaN/Inf, zeros, Gram matrices);
- ``report``: findings and reports; ``outputs``: JSON, GitHub annotations, SARIF;
- this module: :func:`validate`, the entry point.

Example:
    >>> from lora_tools.ops.validate import validate
    >>> report = validate(["fixtures/broken/truncated.safetensors"])      # doctest: +SKIP
    >>> [f.rule.code for f in report.findings]                            # doctest: +SKIP
    ['LT012']
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

from lora_tools.constants import ADAPTER_CONFIG_NAME
from lora_tools.consumers import parse_profiles
from lora_tools.errors import UsageError
from lora_tools.io.gguf import GgufFile, is_gguf
from lora_tools.io.safetensors import PICKLE_SUFFIXES, gc_paused
from lora_tools.ops.validate.checks import check_target
from lora_tools.ops.validate.checks.profiles import Deployment
from lora_tools.ops.validate.checks.structure import FLOAT_DTYPES
from lora_tools.ops.validate.checks.values import OUTLIER_MIN_RATIO, OUTLIER_Z
from lora_tools.ops.validate.outputs import (
    FALLBACK_DOCS_URL,
    SARIF_SCHEMA,
    artifact_uri,
    rules_doc_url,
    to_github,
    to_json,
    to_sarif,
)
from lora_tools.ops.validate.report import FileReport, Finding, Progress, Report
from lora_tools.ops.validate.rules import RULES, Rule, select_rules, split_selectors
from lora_tools.ops.validate.scan import CHUNK_BYTES
from lora_tools.ops.validate.settings import FAIL_ON, OUTPUT_FORMATS, Settings, load_settings
from lora_tools.ops.validate.targets import Target, discover
from lora_tools.results import SCHEMA_VERSION


def validate(
    paths: Iterable[str | os.PathLike[str]],
    *,
    base: str | os.PathLike[str] | None = None,
    select: Iterable[str] | str | None = None,
    ignore: Iterable[str] | str | None = None,
    progress: Progress | None = None,
    profiles: Iterable[str] | str | None = None,
    max_lora_rank: int | None = None,
    target_modules: Iterable[str] | str | None = None,
) -> Report:
    """Validate adapters; return every finding, file by file.

    Args:
        paths: adapter files or folders (``adapter_config.json`` alone means its folder).
        base: a base checkpoint (file, HF folder, sharded folder, diffusers folder or Hub id)
            to resolve every module against (``LT4xx`` rules); for GGUF adapters also a GGUF
            model.
        select: rule codes, prefixes (``LT2``), names or ``ALL`` (default: all rules).
        ignore: rules to leave out, in the same spelling.
        progress: told how many data bytes the value rules will read, then each chunk.
        profiles: consumers to check against, each ``NAME`` or ``NAME:VERSION`` (``vllm``,
            ``sglang:0.5.23``), as a list or a comma-separated string (``LT5xx`` rules; their
            families run even when ``select`` leaves them out, unless ``ignore`` names them).
        max_lora_rank: the server's ``--max-lora-rank`` (default: the consumer's).
        target_modules: the server's ``--lora-target-modules`` (default: no restriction).

    Returns:
        A :class:`Report`; ``report.failed("error")`` is the exit decision.

    Raises:
        UsageError: a selector names no rule, or a profile or its settings are not valid.
        LoraToolError: ``base`` cannot be opened (the CLI exits 3).

    Example:
        >>> report = validate(["fixtures/peft/llama-lora"])     # doctest: +SKIP
        >>> report.failed()                                       # doctest: +SKIP
        False
    """
    rules = select_rules(select, ignore)
    deployment = _deployment(profiles, max_lora_rank, target_modules)
    if deployment is not None:
        rules |= select_rules(list(deployment.families), ignore)
    checkpoint: Any = None
    targets = discover(paths)
    if base is not None:
        checkpoint = _open_base(base, targets)
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
            # CHUNK_BYTES is looked up here, on the package, so that setting it there tunes
            # the scan (the tests shrink it to exercise chunked reads).
            with gc_paused():  # a finding or a module per tensor: many objects, no cycles
                files.append(
                    check_target(target, rules, checkpoint, progress, CHUNK_BYTES, deployment)
                )
    finally:
        if checkpoint is not None:
            checkpoint.close()
    return Report(files, rules, os.fspath(base) if base is not None else None)


def _open_base(base: str | os.PathLike[str], targets: list[Target]) -> Any:
    """The ``--base`` opened: a base checkpoint, or a GGUF model (which only GGUF adapters
    are checked against: llama.cpp names its tensors).

    Raises:
        UsageError: a GGUF base with an adapter that is no GGUF.
    """
    from lora_tools.io.hub import resolve_input

    path = resolve_input(base, role="base")
    if not is_gguf(path):
        from lora_tools.io.checkpoint import open_checkpoint

        return open_checkpoint(path)
    others = [t.path for t in targets if t.weights is None or not is_gguf(t.weights)]
    if others:
        raise UsageError(
            f"--base {os.fspath(base)} is a GGUF model: it checks llama.cpp GGUF adapters only, "
            f"not {others[0]}",
            hint="validate the other adapters against the Hugging Face base (--base FOLDER)",
        )
    return GgufFile(path)


def _deployment(
    profiles: Iterable[str] | str | None,
    max_lora_rank: int | None,
    target_modules: Iterable[str] | str | None,
) -> Deployment | None:
    chosen = parse_profiles(profiles)
    if not chosen:
        if max_lora_rank is not None or target_modules is not None:
            raise UsageError(
                "--max-lora-rank and --target-modules describe a server: they need --profile",
                hint="add --profile vllm (or sglang, tgi...)",
            )
        return None
    targets = None
    if target_modules is not None:
        targets = tuple(split_selectors(target_modules))
        if not targets:
            raise UsageError("--target-modules is empty", hint="name layers such as q_proj,v_proj")
    return Deployment(chosen, max_lora_rank, targets)


class _Totalled:
    """Report one total for all files to a Progress (each file's scan only advances it)."""

    def __init__(self, inner: Progress, total: int) -> None:
        self.inner = inner
        inner.start(total)

    def start(self, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        self.inner.advance(nbytes)


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "CHUNK_BYTES",
    "FAIL_ON",
    "FALLBACK_DOCS_URL",
    "FLOAT_DTYPES",
    "OUTLIER_MIN_RATIO",
    "OUTLIER_Z",
    "OUTPUT_FORMATS",
    "RULES",
    "SARIF_SCHEMA",
    "SCHEMA_VERSION",
    "FileReport",
    "Finding",
    "Progress",
    "Report",
    "Rule",
    "Settings",
    "Target",
    "artifact_uri",
    "discover",
    "load_settings",
    "rules_doc_url",
    "to_github",
    "to_json",
    "to_sarif",
    "validate",
]
