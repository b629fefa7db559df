"""Writing a merge: the weights, the indexes, the side files, the provenance record, the card.

:func:`execute` writes the output: the base folder's layout mirrored under a temporary name
beside OUT, each weight file written header first by the streaming writer, untouched tensors
copied in the kernel without decoding, targeted tensors merged in row blocks by an engine
(:mod:`lora_tools.ops.merge.engine`), the index rewritten (``total_size`` recomputed), every
other file copied, a provenance record and a model card added. The folder is renamed to OUT only
when complete (:func:`lora_tools.io.atomic.atomic_dir`).

Example:
    >>> from lora_tools.ops.merge.plan import AdapterSpec, plan_merge
    >>> plan = plan_merge("fixtures/bases/tiny-llama",
    ...                   [AdapterSpec("fixtures/peft/llama-lora")])      # doctest: +SKIP
    >>> with plan.base:                                                  # doctest: +SKIP
    ...     execute(plan, "/tmp/merged", force=True)["tensors"]["merged"]
    8
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lora_tools import __version__
from lora_tools.adapter import Adapter
from lora_tools.constants import (
    CARD_NAME,
    INDEX_NAMES,
    MERGE_RECORD_KEY,
    MERGE_RECORD_NAME,
    MODEL_CONFIG_NAME,
)
from lora_tools.errors import OutputError
from lora_tools.io.atomic import atomic_dir, require_space
from lora_tools.io.folder import skip_reason
from lora_tools.io.hub import parse_hub_id
from lora_tools.io.jsonfile import read_json_object
from lora_tools.io.safetensors import (
    PICKLE_SUFFIXES,
    SafetensorsFile,
    SafetensorsWriter,
    TensorSpec,
)
from lora_tools.ops.card import CardFacts, is_hub_id, merged_adapters, render_card
from lora_tools.ops.merge.engine import Engine, select_engine
from lora_tools.ops.merge.jobs import FilePlan, ProgressFn, copy_raw
from lora_tools.ops.merge.plan import AdapterReport, MergePlan


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(adapter: Adapter) -> str:
    """The sha256 the provenance record gives an in-memory adapter: of its tensors' bytes.

    The bytes hashed, in this order: for each module of ``adapter.modules`` in its order, its
    ``down`` then ``up`` factor, then its DoRA ``magnitude`` and its lora ``bias`` where it has
    them; then each tensor of ``adapter.passthrough`` in its order. Each tensor contributes its
    raw data as safetensors stores it (little-endian, row-major) and nothing else: no names,
    shapes, dtypes or alphas.

    Example:
        >>> from lora_tools.formats import load_adapter
        >>> tensors_sha256(load_adapter("fixtures/peft/llama-lora"))[:12]
        'f5e74da76be7'
    """
    digest = hashlib.sha256()
    tensors = [
        t
        for m in adapter.modules.values()
        for t in (m.down, m.up, m.magnitude, m.bias)
        if t is not None
    ]
    for tensor in [*tensors, *adapter.passthrough.values()]:
        for chunk in tensor.iter_bytes():
            digest.update(chunk)
    return digest.hexdigest()


def _adapter_record(report: AdapterReport) -> dict[str, Any]:
    """One adapter in the provenance record (see :func:`lora_tools.ops.merge.merge`)."""
    source = report.adapter.source
    record: dict[str, Any] = {
        "spec": report.spec.path,
        "weights_file": str(source) if source else None,
    }
    if report.spec.adapter is None:
        record["sha256"] = sha256_file(Path(source)) if source else None
    else:
        record.update(sha256=tensors_sha256(report.adapter), sha256_of="tensors")
    record.update(
        format=report.adapter.format,
        weight=report.spec.weight,
        modules_merged=len(report.resolution.matches) + len(report.resolution.deltas),
        modules_unmatched=len(report.resolution.unmatched),
    )
    return record


def _provenance(plan: MergePlan, engine: Engine) -> dict[str, Any]:
    record: dict[str, Any] = {
        "tool": "loratool",
        "loratool_version": __version__,
        "operation": "merge",
        "base": {"spec": plan.base_spec, "path": str(plan.base.path), "kind": plan.base.kind},
        "adapters": [_adapter_record(r) for r in plan.adapters],
        "dtype": plan.dtype or "keep",
        "engine": engine.name,
    }
    quantization = quantization_record(plan)
    if quantization is not None:
        record["quantization"] = quantization
    return record


def _base_name(plan: MergePlan) -> str:
    for comp in plan.base.components.values():
        name = (comp.config or {}).get("_name_or_path")
        if isinstance(name, str) and name and not os.path.isabs(name):
            return name
    return plan.base_spec


def _base_hub_id(plan: MergePlan) -> str | None:
    """The base's Hub id: the one merged from, else the one its config names, if any."""
    names = [(plan.base_spec, True)]
    names += [((c.config or {}).get("_name_or_path"), False) for c in plan.base.components.values()]
    for name, given in names:
        if not isinstance(name, str) or not name or os.path.exists(name):
            continue
        parsed = parse_hub_id(name)
        if parsed is not None and (given or parsed[1:] == (None, None)) and is_hub_id(parsed[0]):
            return parsed[0]
    return None


def _model_card(plan: MergePlan, provenance: dict[str, Any], title: str) -> str:
    """The README.md of a merged folder, rendered as push renders cards (:mod:`lora_tools.ops.card`).

    Its front matter names the base (``base_model``, relation ``finetune``) only when it is a
    Hub id, since the Hub refuses a card whose ``base_model`` is a local path; the text names
    the base as given either way, and the adapters folded in. It is written unmarked: push
    keeps it as the folder's own text and appends its block.
    """
    hub_id = _base_hub_id(plan)
    library = {"diffusers": "diffusers"}.get(plan.base.kind)
    if plan.base.kind == "folder" and any(c.config for c in plan.base.components.values()):
        library = "transformers"
    facts = CardFacts(
        kind="model",
        title=title,
        library_name=library,
        base_model=hub_id,
        base_note=None if hub_id else _base_name(plan),
        tags=["lora", "merge", "loratool"],
        details=merged_adapters(provenance),
    )
    return render_card(None, facts, marked=False)[0]


def _is_weight_artifact(path: Path, written: set[Path]) -> bool:
    """Files the output must not carry over: the weights rewritten, their indexes, and pickled
    weights that a loader could pick up instead of the merged safetensors."""
    if path in written:
        return True
    name = path.name
    if name in INDEX_NAMES or name.endswith(".safetensors.index.json"):
        return True
    if path.suffix.lower() in PICKLE_SUFFIXES or name.endswith(".bin.index.json"):
        return True
    return name.startswith(".")


def _copy_other_files(plan: MergePlan, dest: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Copy every non-weight file of the base folder.

    Only plain files are copied (:func:`lora_tools.io.folder.skip_reason`): a link leaving the
    base folder, a FIFO or a device is skipped, so that a merge never copies (and push never
    publishes) what merely a link in the base pointed at.

    Returns:
        The relative paths copied, and ``{"path", "reason"}`` for each entry skipped.
    """
    root = plan.base.path
    written = {root / f.relative for f in plan.files}
    copied: list[str] = []
    skipped: list[dict[str, str]] = []
    for current, dirs, files in os.walk(root):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in [d for d in dirs if (here / d).is_symlink()]:
            dirs.remove(name)  # os.walk would not enter it: say so instead of dropping it
            rel = (here / name).relative_to(root).as_posix()
            skipped.append({"path": rel, "reason": "a symbolic link to a folder (not followed)"})
        for name in sorted(files):
            src = here / name
            rel = src.relative_to(root)
            if name.startswith(".") or _is_weight_artifact(src, written):
                continue
            reason = skip_reason(root, src)
            if reason is not None:
                skipped.append({"path": rel.as_posix(), "reason": reason})
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            copied.append(str(rel))
    return sorted(copied), sorted(skipped, key=lambda item: item["path"])


def _files_written(folder: Path) -> list[str]:
    """Every file under ``folder``, relative and ``/``-separated, for the provenance record."""
    return sorted(
        (Path(current) / name).relative_to(folder).as_posix()
        for current, _dirs, files in os.walk(folder)
        for name in files
    )


def _write_indexes(plan: MergePlan, dest: Path) -> None:
    """Write each index: ``total_size`` recomputed, the tensors dropped (the scales of a
    dequantized fp8 base) left out; a copy of the base's bytes where nothing changed."""
    root = plan.base.path
    sizes: dict[Path, int] = {}
    for f in plan.files:
        sizes[f.source] = sum(job.out_nbytes for job in f.jobs)
    for comp in plan.base.components.values():
        if comp.index_path is None:
            continue
        doc = read_json_object(comp.index_path, kind="checkpoint-json")
        meta = dict(doc.get("metadata") or {})
        total = sum(sizes[p] for p in comp.files)
        dropped = {name for c, name in plan.dropped if c == comp.name}
        target = dest / comp.index_path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        if meta.get("total_size") == total and not dropped:
            shutil.copyfile(comp.index_path, target)
            continue
        meta["total_size"] = total
        doc["metadata"] = meta
        if dropped and isinstance(doc.get("weight_map"), dict):
            doc["weight_map"] = {k: v for k, v in doc["weight_map"].items() if k not in dropped}
        target.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _write_dequantized_configs(plan: MergePlan, dest: Path) -> None:
    """A dequantized fp8 base's config.json without its ``quantization_config``."""
    if not plan.dequantized:
        return
    for name in plan.schemes:
        comp = plan.base.components[name]
        source = comp.root / MODEL_CONFIG_NAME
        if not source.is_file() or "quantization_config" not in (comp.config or {}):
            continue
        doc = read_json_object(source, kind="checkpoint-json")
        doc.pop("quantization_config", None)
        target = dest / source.relative_to(plan.base.path)
        target.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def quantization_record(plan: MergePlan) -> dict[str, Any] | None:
    """What the provenance record and the summary say of a quantized base: its scheme, and
    whether the output keeps it (None for a float base)."""
    if not plan.schemes:
        return None
    schemes = list(plan.schemes.values())
    scales = sum(1 for f in plan.files for j in f.jobs if j.scale_of is not None)
    return {
        "scheme": schemes[0].name,
        "description": schemes[0].describe(),
        "output": plan.dtype or "kept",
        "scales_rewritten": scales,
        "tensors_dropped": len(plan.dropped),
    }


class _Cancelled(Exception):
    """Raised in the copying thread when the merge failed elsewhere."""


def _copy_file(
    reader: SafetensorsFile,
    plan: FilePlan,
    writer: SafetensorsWriter,
    progress: ProgressFn,
    stop: threading.Event,
) -> None:
    """Write a file that no adapter touches: every tensor copied in the kernel, in order."""
    for job in plan.jobs:
        if stop.is_set():
            raise _Cancelled
        copy_raw(reader, job, writer, progress)


def _write_weights(
    plan: MergePlan,
    engine: Engine,
    dest_for: Callable[[FilePlan], Path],
    progress: ProgressFn,
    extra_metadata: dict[str, str] | None = None,
    *,
    durable: bool = False,
) -> None:
    """Write every weight file of the output.

    Files that no adapter touches (the last shard holding only ``lm_head``, a diffusers VAE or
    text encoder the adapter does not target) are copied by a second thread while the engine
    merges the others: they are different files, so their writes do not wait for each other.
    """

    def write(fplan: FilePlan, body: Callable[..., None], *extra: object) -> None:
        specs = [TensorSpec(j.name, j.out_dtype, j.info.shape) for j in fplan.jobs]
        metadata = dict(fplan.metadata or {})
        if extra_metadata:
            metadata.update(extra_metadata)
        reader = SafetensorsFile(fplan.source)
        try:
            with SafetensorsWriter(
                dest_for(fplan),
                specs,
                metadata or None,
                keep_order=True,
                # hand each range to the disk as it is written, so the closing fsync is short
                stream_to_disk=durable,
                durable=durable,
            ) as writer:
                body(reader, fplan, writer, progress, *extra)
        finally:
            reader.close()

    stop = threading.Event()
    untouched = [f for f in plan.files if f.untouched]
    merged = [f for f in plan.files if not f.untouched]
    if not untouched or not merged:
        for fplan in plan.files:
            if fplan.untouched:
                write(fplan, _copy_file, stop)
            else:
                write(fplan, engine.write_file)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="copy") as background:
        copying = background.submit(lambda: [write(f, _copy_file, stop) for f in untouched])
        try:
            for fplan in merged:
                if copying.done():
                    copying.result()  # the copies failed (a corrupt shard): stop here
                write(fplan, engine.write_file)
        except BaseException:
            stop.set()  # the copying thread stops at its next tensor and removes its file
            raise
        copying.result()


def execute(
    plan: MergePlan,
    out: str | os.PathLike[str],
    *,
    engine: Engine | None = None,
    force: bool = False,
    fsync: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Write the merged model at ``out`` and return the summary ``--json`` prints.

    A single-file base gives a single file (provenance in its ``__metadata__`` under
    ``loratool_merge``); a folder base gives a folder mirroring it. Nothing appears at ``out``
    unless every byte was written; with ``fsync`` every byte is also on the disk before it
    appears (see :mod:`lora_tools.io.atomic`).
    """
    engine = engine or select_engine("auto")
    out = Path(out)
    done = {"bytes": 0, "tensors": 0}
    lock = threading.Lock()

    def tick(nbytes: int, tensors: int) -> None:  # called from two threads
        with lock:
            done["bytes"] += nbytes
            done["tensors"] += tensors
            if progress is not None:
                progress(nbytes, tensors)

    started = time.perf_counter()
    require_space(
        out.parent,
        plan.total_bytes,
        what=f"the merged model ({len(plan.files)} weight files)",
        output=out,
    )
    provenance = _provenance(plan, engine)
    if plan.output_is_file:
        if out.is_dir():
            raise OutputError(
                "the base is a single file, so the output is a file, but this is a folder",
                path=out,
                hint="give a .safetensors path",
            )
        _write_weights(
            plan,
            engine,
            lambda f: out,
            tick,
            extra_metadata={MERGE_RECORD_KEY: json.dumps(provenance, sort_keys=True)},
            durable=fsync,
        )
        copied: list[str] = []
        skipped: list[dict[str, str]] = []
    else:
        with atomic_dir(out, force=force, durable=fsync) as tmp:
            copied, skipped = _copy_other_files(plan, tmp)
            _write_weights(plan, engine, lambda f: tmp / f.relative, tick, durable=fsync)
            _write_indexes(plan, tmp)
            _write_dequantized_configs(plan, tmp)
            if not (tmp / CARD_NAME).exists():
                card = _model_card(plan, provenance, out.name)
                (tmp / CARD_NAME).write_text(card, encoding="utf-8")
            # the record names every file written, so that --force can tell this folder from
            # one holding anything else (lora_tools.io.atomic.check_replaceable)
            provenance["files"] = _files_written(tmp)
            provenance["skipped_files"] = skipped
            (tmp / MERGE_RECORD_NAME).write_text(
                json.dumps(provenance, indent=2) + "\n", encoding="utf-8"
            )
    seconds = time.perf_counter() - started
    return _summary(plan, out, engine, copied, skipped, done["bytes"], fsync, seconds)


def _summary(
    plan: MergePlan,
    out: Path,
    engine: Engine,
    copied: list[str],
    skipped: list[dict[str, str]],
    bytes_written: int,
    fsync: bool,
    seconds: float,
) -> dict[str, Any]:
    """The summary :func:`execute` returns (what ``loratool merge --json`` prints)."""
    read = sum(
        j.info.nbytes if j.replacement is None else j.replacement.nbytes
        for f in plan.files
        for j in f.jobs
    )
    return {
        "base": plan.base_spec,
        "output": str(out),
        "engine": engine.name,
        "dtype": plan.dtype or "keep",
        "adapters": [
            {
                "path": r.spec.path,
                "weights_file": str(r.adapter.source) if r.adapter.source else None,
                "format": r.adapter.format,
                "weight": r.spec.weight,
                "modules": r.resolution.total,
                "merged": len(r.resolution.matches) + len(r.resolution.deltas),
                "replaced_tensors": len(r.resolution.replacements),
                "unmatched": list(r.resolution.unmatched),
                "unmatched_tensors": [
                    *r.resolution.full.unmatched,
                    *r.resolution.full.heads,
                ],
            }
            for r in plan.adapters
        ],
        "files": [str(f.relative) for f in plan.files],
        "copied_files": copied,
        "skipped_files": skipped,
        "tensors": {
            "total": plan.total_tensors,
            "merged": sum(1 for f in plan.files for j in f.jobs if j.sources),
            "replaced": sum(1 for f in plan.files for j in f.jobs if j.replacement is not None),
            "copied": sum(1 for f in plan.files for j in f.jobs if j.copy_raw),
            # untouched by the adapters, but decoded and rounded to the output dtype (--dtype)
            "cast": sum(
                1
                for f in plan.files
                for j in f.jobs
                if not j.sources and j.replacement is None and not j.copy_raw and j.scale_of is None
            ),
        },
        "quantization": quantization_record(plan),
        "bytes_read": read,
        "bytes_written": bytes_written,
        "fsync": fsync,
        "seconds": round(seconds, 3),
    }
