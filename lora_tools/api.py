"""The Python API: one function per command, taking what the command takes
(``save_adapter`` is :func:`lora_tools.formats.save_adapter`, ``merge`` is
:func:`lora_tools.ops.merge.merge`: both take these inputs and keep this rule already).

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypedDict, TypeVar, Union

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from lora_tools.adapter import Adapter
    from lora_tools.ops.combine import CombineResult
    from lora_tools.ops.convert import ConvertResult
    from lora_tools.ops.extract import ExtractResult
    from lora_tools.ops.inspect import InspectResult
    from lora_tools.ops.push import PushPlan, PushResult
    from lora_tools.ops.rescale import RescaleResult
    from lora_tools.ops.resize import ResizeResult
    from lora_tools.ops.validate.report import Progress as ValidateProgress
    from lora_tools.ops.validate.report import Report

__all__ = [
    "AdapterInput",
    "CombineOptions",
    "ConvertOptions",
    "PathInput",
    "ProgressCallback",
    "PublishOptions",
    "RescaleOptions",
    "ResizeOptions",
    "WriteOptions",
    "combine",
    "convert",
    "extract",
    "inspect",
    "load_adapter",
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


class WriteOptions(TypedDict, total=False):
    """Where an operation's result goes: ``output`` (checked before any work; None keeps the
    result in memory) and ``force`` (replace an existing output, never an input)."""

    output: PathInput | None
    force: bool


class RescaleOptions(WriteOptions, total=False):
    """What :func:`rescale` passes to :func:`lora_tools.ops.rescale.rescale_adapter`."""

    alpha: float | None
    factor: float | None
    normalize: bool
    progress: ProgressCallback | None


class ResizeOptions(WriteOptions, total=False):
    """What :func:`resize` passes to :func:`lora_tools.ops.resize.resize_adapter`."""

    rank: int | None
    #: the dynamic rules (one of them instead of ``rank``)
    energy: float | None
    sv_ratio: float | None
    sv_cumulative: float | None
    #: bounds for the dynamic rules
    min_rank: int | None
    max_rank: int | None
    distribute: str
    dry_run: bool
    progress: ProgressCallback | None


class CombineOptions(WriteOptions, total=False):
    """What :func:`combine` passes to :func:`lora_tools.ops.combine.combine_adapters`."""

    weights: list[float] | None
    method: str
    rank: int | None
    density: float | None
    seed: int
    distribute: str
    progress: ProgressCallback | None


class ConvertOptions(WriteOptions, total=False):
    """What :func:`convert` passes to :func:`lora_tools.ops.convert.convert_adapter` (a Hub id
    as ``base`` is resolved first)."""

    base: PathInput | None
    component: str | None


class PublishOptions(TypedDict, total=False):
    """What :func:`push` passes to :func:`lora_tools.ops.push.publish`."""

    private: bool
    revision: str | None
    create_pr: bool
    message: str | None
    token: str | None


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


_R = TypeVar("_R")


def _transform(
    op: Callable[..., _R],
    items: Sequence[AdapterInput],
    options: Mapping[str, Any],
    *,
    many: bool = False,
    extra_inputs: Sequence[Path] = (),
    **fixed: Any,
) -> _R:
    """Run an algebra operation on the adapters ``items`` name (a list of them when ``many``,
    else the one), its result's adapter written at ``options["output"]`` when given: checked
    against every input before any work, written with hashes and training metadata refreshed
    (the tensors changed)."""
    from lora_tools.ops._algebra import write_adapter

    rest = dict(options)
    output, force = rest.pop("output", None), bool(rest.pop("force", False))
    opened = [_open(item) for item in items]
    inputs = [*(p for _, paths in opened for p in paths), *extra_inputs]
    if output is not None:
        _check_output(output, inputs, force)  # before the work, not only before the write
    sources = [adapter for adapter, _ in opened]
    result = op(sources if many else sources[0], **rest, **fixed)
    adapter = getattr(result, "adapter", None)
    if output is not None and adapter is not None:
        write_adapter(adapter, output, inputs, force=force)  # the CLI's writer
        result = result.with_output(output)  # type: ignore[attr-defined]
    return result


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


def inspect(adapter: AdapterInput, *, stats: bool = False) -> InspectResult:
    """Describe an adapter, as ``loratool inspect --json`` does (``.to_json()``; docs/json.md).

    Args:
        adapter: a path, a Hub id or an Adapter.
        stats: also compute per-module norms and effective ranks (reads tensor values).

    Example:
        >>> inspect("fixtures/peft/llama-lora").rank["max"]                    # doctest: +SKIP
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


def rescale(adapter: AdapterInput, **options: Unpack[RescaleOptions]) -> RescaleResult:
    """Change alpha without changing the update, or scale the update (exactly one mode).

    Args:
        adapter: a path, a Hub id or an Adapter (not modified).
        **options: (:class:`RescaleOptions`)
            output: where the result goes (:class:`WriteOptions`); None keeps it in memory.
            force: replace an existing output (never an input).
            alpha: new alpha for every module; the update is unchanged.
            factor: multiply every update by this (may be negative); alpha unchanged.
            normalize: make every scale 1 (alpha = r; rsLoRA: alpha = sqrt(r)).
            progress: ``progress(done, total)`` callback.

    Returns:
        The operation's result; ``result.adapter`` is the rescaled adapter.

    Example:
        >>> rescale("fixtures/peft/llama-lora", factor=0.5).adapter           # doctest: +SKIP
        Adapter(format='peft', modules=8, rank=4, source='fixtures/peft/llama-lora/...')
    """
    from lora_tools.ops.rescale import rescale_adapter

    return _transform(rescale_adapter, [adapter], options)


def resize(adapter: AdapterInput, **options: Unpack[ResizeOptions]) -> ResizeResult:
    """Re-rank every module by SVD truncation of its update (exactly one rule).

    Args:
        adapter: a path, a Hub id or an Adapter (not modified).
        **options: (:class:`ResizeOptions`)
            output: where the result goes (:class:`WriteOptions`); None keeps it in memory.
            force: replace an existing output (never an input).
            rank: a fixed rank; modules at or below it are kept.
            energy: the smallest rank keeping this fraction (0-1] of ``||dW||_F^2``.
            sv_ratio: keep singular values >= largest / ``sv_ratio``.
            sv_cumulative: the smallest rank whose singular values sum to this fraction.
            min_rank: lower bound for the dynamic rules.
            max_rank: upper bound for the dynamic rules.
            distribute: ``sqrt`` (sqrt(S) in both factors) or ``up`` (S in up, as sd-scripts).
            dry_run: only plan (``result.adapter`` is None); no ``output`` then.
            progress: ``progress(done, total)`` callback.

    Returns:
        The operation's result (per-module plan, ``result.adapter``).

    Example:
        >>> resize("fixtures/peft/llama-all-linear", rank=2).adapter.ranks    # doctest: +SKIP
        Counter({2: 14})
    """
    from lora_tools.errors import UsageError
    from lora_tools.ops.resize import resize_adapter

    if options.get("dry_run") and options.get("output") is not None:
        raise UsageError("a dry run writes nothing: give output or dry_run=True, not both")
    return _transform(resize_adapter, [adapter], options)


def combine(adapters: Sequence[AdapterInput], **options: Unpack[CombineOptions]) -> CombineResult:
    """Combine adapters into one whose update is ``sum_i w_i * dW_i`` (per layer).

    Args:
        adapters: the inputs (paths, Hub ids, Adapters; not modified); the first gives the
            output's format and names.
        **options: (:class:`CombineOptions`)
            output: where the result goes (:class:`WriteOptions`); None keeps it in memory.
            force: replace an existing output (never an input).
            weights: one weight per input (default 1 each; negative subtracts).
            method: ``concat`` (exact, ranks add up), ``svd`` (truncated to ``rank``), ``ties``.
            rank: the output rank for ``svd`` / ``ties``.
            density: the fraction of entries TIES keeps.
            seed: the random seed of the randomized SVD.
            distribute: ``sqrt`` or ``up``, as in :func:`resize`.
            progress: ``progress(done, total)`` callback.

    Returns:
        The operation's result; ``result.adapter`` is the combined adapter.

    Example:
        >>> combine(["fixtures/peft/llama-lora", "fixtures/peft/llama-lora"],
        ...         weights=[1, -1]).adapter                                   # doctest: +SKIP
        Adapter(format='peft', modules=8, rank=8, source=...)
    """
    from lora_tools.ops.combine import combine_adapters

    return _transform(combine_adapters, adapters, options, many=True)


def convert(adapter: AdapterInput, to: str, **options: Unpack[ConvertOptions]) -> ConvertResult:
    """Rename an adapter into another naming scheme with every module's scale unchanged.

    Args:
        adapter: a path, a Hub id or an Adapter (not modified).
        to: ``peft``, ``kohya`` or ``diffusers``.
        **options: (:class:`ConvertOptions`)
            output: where the result goes (:class:`WriteOptions`); None keeps it in memory.
            force: replace an existing output (never an input).
            base: a base checkpoint (file, folder or Hub id) to recover module paths from kohya
                names and to check that every module fits.
            component: the pipeline component (``unet``, ``text_encoder``...) a PEFT output
                keeps.

    Returns:
        The operation's result; ``result.adapter`` is in the ``to`` format.

    Example:
        >>> convert("fixtures/peft/sd-unet-conv", "kohya").adapter.format     # doctest: +SKIP
        'kohya'
    """
    from lora_tools.ops.convert import convert_adapter

    base = options.get("base")
    bases = [_local(base, role="base")] if base is not None else []
    resolved = {**options, "base": bases[0] if bases else None}
    return _transform(convert_adapter, [adapter], resolved, extra_inputs=bases, to=to)


def extract(
    base: PathInput,
    finetuned: PathInput,
    *,
    output: PathInput | None = None,
    force: bool = False,
    **options: Any,
) -> ExtractResult:
    """A LoRA from a base checkpoint and its fine-tune (``loratool extract``).

    Args:
        base, finetuned: checkpoints (file, HF folder, diffusers pipeline folder or Hub id).
        output: where the adapter goes (checked before any work); None keeps it in memory.
        force: replace an existing output (never an input).
        **options: :func:`lora_tools.ops.extract.extract`'s: ``rank`` or ``energy``,
            ``min_rank``, ``max_rank``, ``modules``, ``format``, ``keep_diffs``, ``device``,
            ``dtype``, ``exact``, ``seed``, ``progress``.

    Returns:
        The result; ``result.adapter`` is the LoRA, ``result.modules`` each module's rank
        and error.

    Example:
        >>> r = extract("fixtures/bases/tiny-llama", "fixtures/finetuned/tiny-llama-ft",
        ...             rank=3)                                              # doctest: +SKIP
        >>> r.summary()["max_relative_error"] < 0.01                         # doctest: +SKIP
        True
    """
    from lora_tools.ops._algebra import write_adapter
    from lora_tools.ops.extract import extract as extract_op

    paths = [_local(base, role="base"), _local(finetuned, role="base")]
    if output is not None:
        _check_output(output, paths, force)
    result = extract_op(paths[0], paths[1], base_spec=os.fspath(base), **options)
    if output is not None:
        write_adapter(result.adapter, output, paths, force=force)
        result = result.with_output(output)
    return result


def push(
    source: AdapterInput,
    repo_id: str,
    *,
    base_model: str | None = None,
    validate: bool = True,
    dry_run: bool = False,
    **options: Unpack[PublishOptions],
) -> PushResult | PushPlan:
    """Publish an adapter or a merged model folder to the Hub in one commit, with a card.

    Args:
        source: an adapter (path, Hub id or Adapter: an Adapter in memory is uploaded as
            :func:`save_adapter` would write it) or a merged model folder.
        repo_id: ``user/name``.
        base_model: the base's Hub id, overriding what the files record.
        validate: refuse an adapter that ``validate`` finds errors in.
        dry_run: decide what would be pushed (files, sizes, card) and return that plan,
            making no request at all (``push --dry-run``; its ``to_json()`` is what
            ``push --dry-run --json`` prints).
        **options: (:class:`PublishOptions`)
            private: create the repo private (only when this push creates it).
            revision: the branch to commit to (created from main if missing).
            create_pr: open a pull request instead of committing.
            message: the commit title.
            token: a Hub token; None uses ``HF_TOKEN`` or the stored login.

    Returns:
        What the push operation returns (repo, commit and pull request URLs), or with
        ``dry_run`` the :class:`~lora_tools.ops.push.PushPlan`.

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
        validator = default_validator if validate else None
        plan = plan_push(path, repo_id, base_model=base_model, validator=validator)
        return plan if dry_run else publish(plan, **options)
