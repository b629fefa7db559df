"""The rule families, one module each, run on one target by :func:`check_target` in layers, each
on what the previous one could establish:

- ``integrity`` (``LT0xx``): the path, pickles, the safetensors container;
- ``structure`` (``LT1xx``): the format, and each module's tensors, from the header;
- ``config`` (``LT3xx``): adapter_config.json and metadata against the tensors;
- ``values`` (``LT2xx``): one streaming pass over the data;
- ``base_model`` (``LT4xx``): every module against the ``--base`` checkpoint;
- ``profiles`` (``LT5xx``): the rules of each ``--profile`` consumer.
- ``consumers`` (``LT59x``): what the consumers that load the file do with its scales, and
  with the base layers PEFT saved in it;
- ``gguf``: the same layers on a llama.cpp LoRA GGUF, from its own facts.

They share one :class:`~lora_tools.ops.validate.context.Context` per target, which holds the
findings and drops those of disabled rules.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lora_tools.errors import LoraToolError
from lora_tools.formats.base import AdapterSource
from lora_tools.io.gguf import is_gguf
from lora_tools.io.safetensors import SafetensorsFile
from lora_tools.ops.validate.checks.base_model import check_base
from lora_tools.ops.validate.checks.config import (
    check_adapter_config,
    check_config_only,
    read_config,
    readable_config,
)
from lora_tools.ops.validate.checks.consumers import (
    check_consumer_scales,
    check_saved_layers,
    compare_saved_layers,
)
from lora_tools.ops.validate.checks.gguf import check_gguf
from lora_tools.ops.validate.checks.integrity import check_container
from lora_tools.ops.validate.checks.profiles import check_profiles
from lora_tools.ops.validate.checks.structure import check_structure, detect_format
from lora_tools.ops.validate.checks.values import check_values
from lora_tools.ops.validate.context import Context
from lora_tools.ops.validate.report import FileReport, Progress
from lora_tools.ops.validate.targets import Target


def check_target(
    target: Target,
    rules: frozenset[str],
    checkpoint: Any | None,
    progress: Progress | None,
    chunk_bytes: int,
    deployment: Any | None = None,
) -> FileReport:
    """Run every enabled rule on one adapter.

    Args:
        target: the adapter (weights file and config) to check.
        rules: the enabled rule codes; findings of other rules are never produced.
        checkpoint: the opened ``--base`` checkpoint, or None (no ``LT4xx`` rules then).
        progress: told about every chunk the value rules read.
        chunk_bytes: the value scan's chunk size for tensors that are not LoRA factors.
        deployment: the ``--profile`` consumers (``LT5xx`` rules), or None.

    Returns:
        The target's findings, and its format when one was detected.
    """
    ctx = Context(
        target,
        rules,
        FileReport(target.path, config=target.config_display),
        checkpoint=checkpoint,
        progress=progress,
        chunk_bytes=chunk_bytes,
        deployment=deployment,
    )
    if target.problem is None and target.weights is not None and is_gguf(target.weights):
        check_gguf(ctx)
        return ctx.report
    container = check_container(ctx)
    if container is None:
        check_config_only(ctx)
        return ctx.report
    fmt = detect_format(ctx, container.names, container.trusted.metadata or {})
    if fmt is None:
        return ctx.report
    ctx.report.format = fmt.name
    weights = target.weights
    assert weights is not None

    config = None
    if target.config is not None and fmt.name in ("peft", "mlx"):
        config = read_config(ctx)
    elif target.config is not None:
        read_config(ctx)  # report a broken config even when it is not used
    with SafetensorsFile(weights, header=container.trusted) as file:
        bad_stems, stems = check_structure(
            ctx,
            fmt,
            container.names,
            container.trusted,
            container.untrusted,
            file,
            readable_config(config),
        )
    # The reader sees neither untrusted tensors nor the modules structure rules rejected, so it
    # reads what loaders would load and never trips over what is already reported.
    excluded = {key for stem in bad_stems for key in stems[stem].roles.values()}
    excluded |= container.untrusted
    reader_header = replace(
        container.trusted,
        tensors={n: i for n, i in container.trusted.tensors.items() if n not in excluded},
    )
    with SafetensorsFile(weights, header=reader_header) as file:
        source = AdapterSource(
            weights=weights,
            file=file,
            config=readable_config(config),
            config_path=target.config,
        )
        try:
            adapter = fmt.read(source)
        except LoraToolError as exc:
            # A config pattern the reader cannot use is a config finding, not a shape one.
            if exc.kind == "config-invalid":
                ctx.add("LT302", exc.message, hint=exc.hint, path=ctx.target.config_display)
            else:
                ctx.add("LT104", exc.message, hint=exc.hint)
            return ctx.report
        check_adapter_config(ctx, fmt, adapter, config)
        if deployment is None:
            # with --profile, each profile's own (versioned) scale rules report its consumer
            check_consumer_scales(ctx, adapter)
        if ctx.runs("LT2"):
            check_values(ctx, adapter, container.trusted, container.clean)
        if checkpoint is not None and ctx.runs("LT4"):
            check_base(ctx, adapter)
        compare_saved_layers(ctx, adapter)
        if deployment is None:
            check_saved_layers(ctx)
        else:
            check_profiles(ctx, adapter, deployment)
    return ctx.report
