"""The Python API: one function per command, taking what the command takes
(``save_adapter`` is :func:`lora_tools.formats.save_adapter`).

Every adapter input may be a local path (a file, a folder, or its ``adapter_config.json``), a
Hub id ``user/name[@revision][:path/in/repo]`` (resolved as the CLI resolves it: a local path of
the same name wins), or an :class:`~lora_tools.adapter.Adapter` already in memory. Each
function returns what its operation returns.

Writers follow the CLI's rule for outputs: an existing output is refused unless
``force=True``, and ``force`` replaces only a file, an empty folder or a folder loratool wrote,
never an input (see :func:`lora_tools.io.atomic.check_output`). Outputs appear whole or not at
all.

Example:
    >>> from lora_tools import load_adapter, rescale
    >>> adapter = load_adapter("fixtures/peft/llama-lora")                   # doctest: +SKIP
    >>> result = rescale(adapter, alpha=16, output="out/llama-a16")         # doctest: +SKIP
    >>> sorted(set(result.new_alphas.values()))                             # doctest: +SKIP
    [16.0]
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, Union

if TYPE_CHECKING:
    from lora_tools.adapter import Adapter
    from lora_tools.ops.combine import CombineResult
    from lora_tools.ops.convert import ConvertResult
    from lora_tools.ops.push import PushResult
    from lora_tools.ops.rescale import RescaleResult
    from lora_tools.ops.resize import ResizeResult
    from lora_tools.ops.validate.report import Progress as ValidateProgress
    from lora_tools.ops.validate.report import Report

__all__ = [
    "AdapterInput",
    "PathInput",
    "ProgressCallback",
    "combine",
    "convert",
    "inspect",
    "load_adapter",
    "merge",
    "push",
    "rescale",
    "resize",
    "validate",
]

#: An adapter as every API function takes it: a path, a Hub id, or an Adapter in memory.
AdapterInput: TypeAlias = Union[str, "os.PathLike[str]", "Adapter"]
#: ``progress(done, total)``, called as an operation advances.
ProgressCallback: TypeAlias = Callable[[int, int], None]
#: A local path or a Hub id.
PathInput: TypeAlias = Union[str, "os.PathLike[str]"]


def _is_adapter(value: object) -> bool:
    from lora_tools.adapter import Adapter

    return isinstance(value, Adapter)


def _local(spec: PathInput, role: str = "adapter") -> Path:
    """A local path for a path or Hub id (a local path wins), as the CLI resolves inputs."""
    from lora_tools.io.hub import resolve_input

    return resolve_input(spec, role=role)


def _open(item: AdapterInput) -> tuple[Adapter, list[Path]]:
    """The adapter ``item`` names, and the paths an output must never replace."""
    from lora_tools.ops._algebra import input_paths

    if _is_adapter(item):
        return item, input_paths(item)  # type: ignore[arg-type,return-value]
    path = _local(item)  # type: ignore[arg-type]
    adapter = _load_local(path)
    return adapter, input_paths(adapter, path)


def _load_local(path: Path, format: str | None = None) -> Adapter:
    from lora_tools.formats import load_adapter as load

    return load(path, format=format)


def _check_output(output: PathInput, inputs: Iterable[Path], force: bool) -> None:
    from lora_tools.io.atomic import check_output

    check_output(output, list(inputs), force=force)


def _write(adapter: Adapter, output: PathInput, force: bool) -> Path:
    """Write an operation's result (hashes and training metadata refreshed: tensors changed)."""
    from lora_tools.formats import save_adapter

    return save_adapter(adapter, output, force=force, refresh_hashes=True)


@contextlib.contextmanager
def _saved(adapter: Adapter) -> Iterator[Path]:
    """A temporary copy of an Adapter in memory, written as :func:`save_adapter` writes it
    (a file for kohya, else a folder); removed on exit."""
    from lora_tools.constants import ADAPTER_CONFIG_NAME
    from lora_tools.formats import save_adapter

    with tempfile.TemporaryDirectory(prefix="loratool-") as tmp:
        name = adapter.source.stem if adapter.source is not None else "adapter"
        weights = save_adapter(
            adapter, Path(tmp, f"{name}.safetensors" if adapter.format == "kohya" else name)
        )
        config = weights.parent / ADAPTER_CONFIG_NAME
        yield weights.parent if config.is_file() else weights


def load_adapter(source: AdapterInput, *, format: str | None = None) -> Adapter:
    """Read an adapter; only its header is read until tensor values are needed.

    Args:
        source: an adapter file or folder (``adapter_config.json`` means its folder), a Hub id
            ``user/name[@revision][:file]`` (a local path of that name wins), or an Adapter
            (returned as is).
        format: force a format by name (``peft``, ``diffusers``, ``kohya``, ``diffusers-old``)
            instead of detecting it.

    Returns:
        The :class:`~lora_tools.adapter.Adapter`.

    Example:
        >>> load_adapter("fixtures/peft/llama-lora")                         # doctest: +SKIP
        Adapter(format='peft', modules=8, rank=4, source='fixtures/peft/llama-lora/...')
    """
    if _is_adapter(source):
        return source  # type: ignore[return-value]
    return _load_local(_local(source), format)  # type: ignore[arg-type]


def inspect(adapter: AdapterInput, *, stats: bool = False) -> dict[str, Any]:
    """Describe an adapter, as ``loratool inspect --json`` does (docs/inspect-json.md).

    Args:
        adapter: a path, a Hub id or an Adapter.
        stats: also compute per-module norms and effective ranks (reads tensor values).

    Example:
        >>> inspect("fixtures/peft/llama-lora")["rank"]["max"]                 # doctest: +SKIP
        4
    """
    from lora_tools.ops.inspect import inspect_adapter

    target = adapter if _is_adapter(adapter) else _local(adapter)  # type: ignore[arg-type]
    return inspect_adapter(target, stats=stats)  # type: ignore[arg-type]


def validate(
    adapters: AdapterInput | Sequence[AdapterInput],
    *,
    base: PathInput | None = None,
    select: Iterable[str] | str | None = None,
    ignore: Iterable[str] | str | None = None,
    progress: ValidateProgress | None = None,
) -> Report:
    """Check adapters against every rule (docs/rules.md), as ``loratool validate`` does.

    An Adapter in memory is checked as :func:`save_adapter` would write it (in a temporary
    folder, which the findings name).

    Args:
        adapters: one adapter or several (paths, Hub ids, Adapters).
        base: a base checkpoint (file, folder or Hub id) to resolve every module against.
        select: rule codes, prefixes (``LT2``), names or ``ALL`` (default: all rules).
        ignore: rules to leave out, in the same spelling.
        progress: told how many data bytes the value rules will read, then each chunk.

    Returns:
        The report; ``report.failed("error")`` is the CLI's exit decision.

    Example:
        >>> validate("fixtures/peft/llama-lora").failed("error")               # doctest: +SKIP
        False
    """
    from lora_tools.ops.validate import validate as run

    items = (
        [adapters]
        if isinstance(adapters, (str, os.PathLike)) or _is_adapter(adapters)
        else adapters
    )
    with contextlib.ExitStack() as stack:
        # paths and Hub ids go through as given: validate resolves them and names them so
        paths = [
            stack.enter_context(_saved(item)) if _is_adapter(item) else item  # type: ignore[arg-type]
            for item in items
        ]
        return run(paths, base=base, select=select, ignore=ignore, progress=progress)


def rescale(
    adapter: AdapterInput,
    *,
    alpha: float | None = None,
    factor: float | None = None,
    normalize: bool = False,
    output: PathInput | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> RescaleResult:
    """Change alpha without changing the update, or scale the update (exactly one mode).

    Args:
        adapter: a path, a Hub id or an Adapter (not modified).
        alpha: new alpha for every module; the update is unchanged.
        factor: multiply every update by this (may be negative); alpha unchanged.
        normalize: make every scale 1 (alpha = r; rsLoRA: alpha = sqrt(r)).
        output: write the result here (checked before any work); None keeps it in memory.
        force: replace an existing output (never an input).
        progress: ``progress(done, total)`` callback.

    Returns:
        The operation's result; ``result.adapter`` is the rescaled adapter.

    Example:
        >>> rescale("fixtures/peft/llama-lora", factor=0.5).adapter           # doctest: +SKIP
        Adapter(format='peft', modules=8, rank=4, source='fixtures/peft/llama-lora/...')
    """
    from lora_tools.ops.rescale import rescale_adapter

    source, inputs = _open(adapter)
    if output is not None:
        _check_output(output, inputs, force)
    result = rescale_adapter(
        source, alpha=alpha, factor=factor, normalize=normalize, progress=progress
    )
    if output is not None:
        _write(result.adapter, output, force)
    return result


def resize(
    adapter: AdapterInput,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
    distribute: str = "sqrt",
    dry_run: bool = False,
    output: PathInput | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> ResizeResult:
    """Re-rank every module by SVD truncation of its update (exactly one rule).

    Args:
        adapter: a path, a Hub id or an Adapter (not modified).
        rank: a fixed rank; modules at or below it are kept.
        energy: the smallest rank keeping this fraction (0-1] of ``||dW||_F^2``.
        sv_ratio: keep singular values >= largest / ``sv_ratio``.
        sv_cumulative: the smallest rank whose singular values sum to this fraction (0-1].
        min_rank: lower bound for the dynamic rules.
        max_rank: upper bound for the dynamic rules.
        distribute: ``sqrt`` (sqrt(S) in both factors) or ``up`` (S in up, as sd-scripts).
        dry_run: only plan (``result.adapter`` is None); no ``output`` then.
        output: write the result here (checked before any work); None keeps it in memory.
        force: replace an existing output (never an input).
        progress: ``progress(done, total)`` callback.

    Returns:
        The operation's result (per-module plan, ``result.adapter``).

    Example:
        >>> resize("fixtures/peft/llama-all-linear", rank=2).adapter.ranks    # doctest: +SKIP
        Counter({2: 14})
    """
    from lora_tools.errors import UsageError
    from lora_tools.ops.resize import check_rule, resize_adapter

    rule = {
        "rank": rank,
        "energy": energy,
        "sv_ratio": sv_ratio,
        "sv_cumulative": sv_cumulative,
        "min_rank": min_rank,
        "max_rank": max_rank,
    }
    check_rule(**rule)
    if dry_run and output is not None:
        raise UsageError("a dry run writes nothing: give output or dry_run=True, not both")
    source, inputs = _open(adapter)
    if output is not None:
        _check_output(output, inputs, force)
    result = resize_adapter(
        source, **rule, distribute=distribute, dry_run=dry_run, progress=progress
    )
    if output is not None:
        assert result.adapter is not None
        _write(result.adapter, output, force)
    return result


def combine(
    adapters: Sequence[AdapterInput],
    *,
    weights: Sequence[float] | None = None,
    method: str = "concat",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    distribute: str = "sqrt",
    output: PathInput | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> CombineResult:
    """Combine adapters into one whose update is ``sum_i w_i * dW_i`` (per layer).

    Args:
        adapters: the inputs (paths, Hub ids, Adapters; not modified); the first gives the
            output's format and names.
        weights: one weight per input (default 1 each; negative subtracts).
        method: ``concat`` (exact, ranks add up), ``svd`` (truncated to ``rank``) or ``ties``.
        rank: the output rank for ``svd`` / ``ties``.
        density: the fraction of entries TIES keeps.
        seed: the random seed of the randomized SVD.
        distribute: ``sqrt`` or ``up``, as in :func:`resize`.
        output: write the result here (checked before any work); None keeps it in memory.
        force: replace an existing output (never an input).
        progress: ``progress(done, total)`` callback.

    Returns:
        The operation's result; ``result.adapter`` is the combined adapter.

    Example:
        >>> combine(["fixtures/peft/llama-lora", "fixtures/peft/llama-lora"],
        ...         weights=[1, -1]).adapter                                   # doctest: +SKIP
        Adapter(format='peft', modules=8, rank=8, source=...)
    """
    from lora_tools.ops.combine import combine_adapters

    opened = [_open(item) for item in adapters]
    if output is not None:
        _check_output(output, [p for _, paths in opened for p in paths], force)
    result = combine_adapters(
        [a for a, _ in opened],
        weights=list(weights) if weights is not None else None,
        method=method,
        rank=rank,
        density=density,
        seed=seed,
        distribute=distribute,
        progress=progress,
    )
    if output is not None:
        _write(result.adapter, output, force)
    return result


def convert(
    adapter: AdapterInput,
    to: str,
    *,
    base: PathInput | None = None,
    component: str | None = None,
    output: PathInput | None = None,
    force: bool = False,
) -> ConvertResult:
    """Rename an adapter into another naming scheme with every module's scale unchanged.

    Args:
        adapter: a path, a Hub id or an Adapter (not modified).
        to: ``peft``, ``kohya`` or ``diffusers``.
        base: a base checkpoint (file, folder or Hub id) to recover module paths from kohya
            names and to check that every module fits.
        component: the pipeline component (``unet``, ``text_encoder``...) a PEFT output keeps.
        output: write the result here (checked before any work); None keeps it in memory.
        force: replace an existing output (never an input).

    Returns:
        The operation's result; ``result.adapter`` is in the ``to`` format.

    Example:
        >>> convert("fixtures/peft/sd-unet-conv", "kohya").adapter.format     # doctest: +SKIP
        'kohya'
    """
    from lora_tools.ops.convert import convert_adapter

    source, inputs = _open(adapter)
    base_path = _local(base, role="base") if base is not None else None
    if output is not None:
        _check_output(output, [*inputs, *([base_path] if base_path else [])], force)
    result = convert_adapter(source, to, base=base_path, component=component)
    if output is not None:
        _write(result.adapter, output, force)
    return result


def merge(
    base: PathInput,
    adapters: Sequence[AdapterInput],
    output: PathInput,
    *,
    weights: Sequence[float] | None = None,
    device: str = "auto",
    dtype: str = "keep",
    force: bool = False,
    fsync: bool = False,
    allow_unmatched: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Merge adapters into a base checkpoint and write the merged model at ``output``.

    Args:
        base: a ``.safetensors`` file, an HF folder (single or sharded), a diffusers folder or
            a Hub id.
        adapters: adapters (paths, Hub ids, Adapters) merged in this order.
        output: a folder for a folder base; for a single-file base a ``.safetensors`` file,
            or a folder to write it into under the base's file name.
        weights: one weight per adapter (default 1 each; negative subtracts).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``keep``, ``bf16``, ``fp16`` or ``fp32`` for the float tensors written.
        force: replace an existing output (never an input).
        fsync: flush everything to the disk before the output appears (survives a power loss).
        allow_unmatched: skip modules that match no base weight instead of failing.
        progress: called with ``(bytes written, tensors finished)`` increments.

    Returns:
        What the merge operation returns (what ``loratool merge --json`` prints).

    Example:
        >>> merge("fixtures/bases/tiny-llama", ["fixtures/peft/llama-lora"],
        ...       "out/merged")["tensors"]["merged"]                         # doctest: +SKIP
        8
    """
    from lora_tools.ops.merge import merge as run

    return run(
        base,
        list(adapters),  # type: ignore[arg-type]
        output,
        weights=list(weights) if weights is not None else None,
        device=device,
        dtype=dtype,
        force=force,
        fsync=fsync,
        allow_unmatched=allow_unmatched,
        progress=progress,
    )


def push(
    source: AdapterInput,
    repo_id: str,
    *,
    base_model: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    message: str | None = None,
    token: str | None = None,
    validate: bool = True,
) -> PushResult:
    """Publish an adapter or a merged model folder to the Hub in one commit, with a card.

    Args:
        source: an adapter (path, Hub id or Adapter: an Adapter in memory is uploaded as
            :func:`save_adapter` would write it) or a merged model folder.
        repo_id: ``user/name``.
        base_model: the base's Hub id, overriding what the files record.
        private: create the repo private (only when this push creates it).
        revision: the branch to commit to (created from main if missing).
        create_pr: open a pull request instead of committing.
        message: the commit title.
        token: a Hub token; None uses ``HF_TOKEN`` or the stored login.
        validate: refuse an adapter that ``validate`` finds errors in.

    Returns:
        What the push operation returns (repo, commit and pull request URLs).

    Example:
        >>> push("out/llama-a16", "me/llama-a16").url                          # doctest: +SKIP
        'https://huggingface.co/me/llama-a16'
    """
    from lora_tools.ops.push import default_validator, plan_push, publish

    on_disk = (
        _saved(source)  # type: ignore[arg-type]
        if _is_adapter(source)
        else contextlib.nullcontext(_local(source))  # type: ignore[arg-type]
    )
    with on_disk as path:
        plan = plan_push(
            path,
            repo_id,
            base_model=base_model,
            validator=default_validator if validate else None,
        )
        return publish(
            plan,
            private=private,
            revision=revision,
            create_pr=create_pr,
            message=message,
            token=token,
        )
