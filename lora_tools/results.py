"""What every operation returns: a frozen result whose ``to_json()`` is its ``--json`` document.

Every document has the same envelope (docs/json.md, schemas in ``lora_tools/schemas/``):

- ``schema_version``: :data:`SCHEMA_VERSION`, raised when any document changes shape;
- ``loratool_version``: the version that wrote it;
- ``command``: ``inspect``, ``validate``, ``rescale``, ``resize``, ``combine``, ``convert``,
  ``merge`` or ``push``;
- ``inputs``: what was read, ``{"path", "role", "format"?, "sha256"?}`` each;
- ``outputs``: what was written, ``{"path", "kind": "file" | "folder"}`` each (empty for the
  commands that write nothing);

then the command's own fields. The same thing has the same name in every document: a module id
is ``module``, a file is ``path``, ``modules`` is always a list of per-module objects, and
counts are integers in a ``counts`` object.

This module sits below the operations and imports nothing heavy (no numpy).

Example:
    >>> from lora_tools.results import envelope
    >>> sorted(envelope("inspect", [], []))
    ['command', 'inputs', 'loratool_version', 'outputs', 'schema_version']
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from lora_tools import __version__

#: Version of every ``--json`` document's shape (1: inspect and validate only, before the
#: envelope; 2: the envelope, in every command).
SCHEMA_VERSION = 2
#: The fields every document starts with, in this order.
ENVELOPE_FIELDS = ("schema_version", "loratool_version", "command", "inputs", "outputs")
#: The values of ``outputs[].kind``.
OUTPUT_KINDS = ("file", "folder")

R = TypeVar("R", bound="Result")


#: The commands with a ``--json`` document, each with a schema ``lora_tools/schemas/<command>.json``.
COMMANDS = (
    "inspect",
    "validate",
    "rescale",
    "resize",
    "combine",
    "convert",
    "merge",
    "push",
    "extract",
)


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a command's document, or of the ``envelope``.

    Example:
        >>> json_schema("inspect")["$id"]
        'inspect.json'
    """
    import json
    from importlib.resources import files

    if name not in (*COMMANDS, "envelope"):
        raise ValueError(f"no schema named {name!r}: one of envelope, {', '.join(COMMANDS)}")
    return json.loads(files("lora_tools").joinpath("schemas", f"{name}.json").read_text("utf-8"))


def input_ref(
    path: str | os.PathLike[str],
    role: str,
    *,
    format: str | None = None,
    sha256: str | None = None,
) -> dict[str, Any]:
    """One ``inputs`` entry: ``{"path", "role"}``, plus ``format`` / ``sha256`` when known."""
    ref: dict[str, Any] = {"path": os.fspath(path), "role": role}
    if format is not None:
        ref["format"] = format
    if sha256 is not None:
        ref["sha256"] = sha256
    return ref


def output_ref(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One ``outputs`` entry: ``{"path", "kind"}``, ``kind`` read from what is at ``path``."""
    return {"path": os.fspath(path), "kind": "folder" if Path(path).is_dir() else "file"}


def envelope(
    command: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The fields every ``--json`` document starts with."""
    return {
        "schema_version": SCHEMA_VERSION,
        "loratool_version": __version__,
        "command": command,
        "inputs": inputs,
        "outputs": outputs,
    }


class Result:
    """Base of every operation's result: frozen dataclasses with a ``--json`` document.

    A subclass names its ``command`` and implements :meth:`fields` (the command's own fields);
    it overrides :meth:`inputs` / :meth:`outputs` when it read or wrote files.
    """

    __slots__ = ()
    command: ClassVar[str]

    def inputs(self) -> list[dict[str, Any]]:
        """The ``inputs`` entries (see :func:`input_ref`)."""
        return []

    def outputs(self) -> list[dict[str, Any]]:
        """The ``outputs`` entries (see :func:`output_ref`)."""
        return []

    def fields(self) -> dict[str, Any]:
        """The command's own fields, after the envelope."""
        raise NotImplementedError

    def __repr__(self) -> str:
        """What was read and written, and the counts: a line, where the fields (every module,
        a card, a whole config) would be pages (``to_json()`` has them all)."""
        parts = [f"inputs={[ref['path'] for ref in self.inputs()]!r}"]
        outputs = [ref["path"] for ref in self.outputs()]
        if outputs:
            parts.append(f"outputs={outputs!r}")
        counts = self.fields().get("counts")
        if counts:
            parts.append(f"counts={counts!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document: the envelope, then :meth:`fields` (plain JSON values;
        non-finite floats are left to the printer, see ``lora_tools.cli._common.json_safe``)."""
        doc = envelope(self.command, self.inputs(), self.outputs())
        doc.update(self.fields())
        return doc


@dataclass(frozen=True, repr=False)
class WrittenResult(Result):
    """A result whose command writes one output (the algebra commands), once it is written.

    ``output`` is None until the caller wrote the adapter (:meth:`with_output`): the operations
    build adapters in memory; writing them is a separate step.
    """

    source_inputs: tuple[dict[str, Any], ...] = field(default=(), kw_only=True)
    output: str | None = field(default=None, kw_only=True)

    def with_output(self: R, path: str | os.PathLike[str] | None) -> R:
        """This result, saying the adapter was written at ``path`` (None: nothing written)."""
        output = None if path is None else os.fspath(path)
        return dataclasses.replace(self, output=output)  # type: ignore[type-var]

    def inputs(self) -> list[dict[str, Any]]:
        return [dict(ref) for ref in self.source_inputs]

    def outputs(self) -> list[dict[str, Any]]:
        return [] if self.output is None else [output_ref(self.output)]


def adapter_inputs(adapter: Any, role: str = "adapter") -> tuple[dict[str, Any], ...]:
    """``inputs`` entries for a loaded adapter: its weights file (with the format) and its
    config, when it came from files (an in-memory adapter has none)."""
    refs = []
    if getattr(adapter, "source", None) is not None:
        refs.append(input_ref(adapter.source, role, format=adapter.format))
    if getattr(adapter, "config_source", None) is not None:
        refs.append(input_ref(adapter.config_source, "config"))
    return tuple(refs)


@dataclass(frozen=True, repr=False, slots=True)
class MergeResult(Result):
    """What ``merge`` wrote: the merged model at ``output`` and what went into it.

    Built from the summary the merge engine returns (:meth:`from_summary`); the per-adapter
    entries use the names of the ``loratool_merge.json`` record (``spec``, ``weights_file``,
    ``modules_merged``, ``modules_unmatched``).

    Attributes:
        base: the base as given (a path or a Hub id); base_path: the local checkpoint.
        output: the merged file or folder.
        engine / dtype: how it was computed, and the dtype of the float tensors written.
        adapters: one entry per adapter, in merge order (see docs/json.md).
        files: the weight files written, relative to ``output`` (the file itself for a file).
        copied_files / skipped_files: other files of a base folder copied, or left out (why).
        tensors: ``{"total", "merged", "replaced", "copied", "cast"}`` tensor counts (``cast``:
            untouched by the adapters but rounded to another output dtype).
        bytes_read / bytes_written / fsync / seconds: the I/O done and the time it took.
        quantization: for an fp8 base, its scheme and whether the output keeps it
            (``{"scheme", "description", "output", "scales_rewritten", "tensors_dropped"}``);
            None for a float base.
    """

    command: ClassVar[str] = "merge"

    base: str
    output: str
    engine: str
    dtype: str
    adapters: tuple[dict[str, Any], ...]
    files: tuple[str, ...]
    copied_files: tuple[str, ...]
    skipped_files: tuple[dict[str, str], ...]
    tensors: dict[str, int]
    bytes_read: int
    bytes_written: int
    fsync: bool
    seconds: float
    base_path: str | None = None
    quantization: dict[str, Any] | None = None

    @classmethod
    def from_summary(
        cls, summary: dict[str, Any], *, base_path: str | os.PathLike[str] | None = None
    ) -> MergeResult:
        """The result for the summary dict ``ops.merge.execute`` returns (``base_path``: the
        local checkpoint the base resolved to)."""
        adapters = []
        for a in summary["adapters"]:
            unmatched = list(a["unmatched"])
            tensors = list(a.get("unmatched_tensors", ()))
            adapters.append(
                {
                    "spec": a["path"],
                    "weights_file": a["weights_file"],
                    "format": a["format"],
                    "weight": a["weight"],
                    "unmatched": unmatched + tensors,
                    "counts": {
                        "modules": a["modules"],
                        "modules_merged": a["merged"],
                        "modules_unmatched": len(unmatched),
                        "tensors_replaced": a["replaced_tensors"],
                        "tensors_unmatched": len(tensors),
                    },
                }
            )
        return cls(
            base=summary["base"],
            output=summary["output"],
            engine=summary["engine"],
            dtype=summary["dtype"],
            adapters=tuple(adapters),
            files=tuple(summary["files"]),
            copied_files=tuple(summary["copied_files"]),
            skipped_files=tuple(summary["skipped_files"]),
            tensors=dict(summary["tensors"]),
            bytes_read=summary["bytes_read"],
            bytes_written=summary["bytes_written"],
            fsync=summary["fsync"],
            seconds=summary["seconds"],
            base_path=None if base_path is None else os.fspath(base_path),
            quantization=summary.get("quantization"),
        )

    @property
    def unmatched(self) -> int:
        """Adapter modules and full tensors, over all adapters, that matched no base tensor
        (skipped)."""
        return sum(
            a["counts"]["modules_unmatched"] + a["counts"].get("tensors_unmatched", 0)
            for a in self.adapters
        )

    def inputs(self) -> list[dict[str, Any]]:
        refs = [input_ref(self.base_path or self.base, "base")]
        refs += [input_ref(a["weights_file"], "adapter", format=a["format"]) for a in self.adapters]
        return refs

    def outputs(self) -> list[dict[str, Any]]:
        return [output_ref(self.output)]

    def fields(self) -> dict[str, Any]:
        t = self.tensors
        return {
            "base": self.base,
            "engine": self.engine,
            "dtype": self.dtype,
            "counts": {
                "adapters": len(self.adapters),
                "files": len(self.files),
                "tensors": t["total"],
                "tensors_merged": t["merged"],
                "tensors_replaced": t["replaced"],
                "tensors_copied": t["copied"],
                "tensors_cast": t.get("cast", 0),
                # the adapters' full tensors skipped (--allow-unmatched), not the base's
                "tensors_unmatched": sum(
                    a["counts"].get("tensors_unmatched", 0) for a in self.adapters
                ),
            },
            "adapters": [dict(a) for a in self.adapters],
            "files": list(self.files),
            "copied_files": list(self.copied_files),
            "skipped_files": [dict(s) for s in self.skipped_files],
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "fsync": self.fsync,
            "seconds": self.seconds,
            **({"quantization": dict(self.quantization)} if self.quantization else {}),
        }


__all__ = [
    "COMMANDS",
    "ENVELOPE_FIELDS",
    "OUTPUT_KINDS",
    "SCHEMA_VERSION",
    "MergeResult",
    "Result",
    "WrittenResult",
    "adapter_inputs",
    "envelope",
    "input_ref",
    "json_schema",
    "output_ref",
]
