"""Base checkpoints: a single .safetensors file, an HF folder (single file or sharded with an
index), or a diffusers pipeline folder whose components (unet/, transformer/, text_encoder/...)
each hold their own weights.

:func:`open_checkpoint` checks every weight file's header once, and that a sharded folder's
index agrees with its shards (:meth:`Component.verify`): ``merge`` and ``validate --base`` open
bases through it, so they accept and refuse the same checkpoints. Afterwards a key is looked
up in the index's weight_map.

Example:
    >>> from lora_tools.io.checkpoint import open_checkpoint
    >>> ckpt = open_checkpoint("fixtures/bases/tiny-llama-sharded")          # doctest: +SKIP
    >>> comp = ckpt.components[""]                                          # doctest: +SKIP
    >>> comp.file_for("model.layers.0.self_attn.q_proj.weight").name         # doctest: +SKIP
    'model-00001-of-00003.safetensors'
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tools.constants import INDEX_NAMES, MODEL_CONFIG_NAME, PIPELINE_INDEX_NAME
from lora_tools.errors import FormatError, UnsafeFileError
from lora_tools.io.jsonfile import read_json_object
from lora_tools.io.safetensors import PICKLE_SUFFIXES, SafetensorsFile, TensorInfo

#: Index file names, most specific first.
#: Pipeline components a diffusers folder may hold weights in.
DIFFUSERS_COMPONENTS = (
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "vae",
    "prior",
    "decoder",
    "controlnet",
)


@dataclass
class Component:
    """The weights of one model: one file, or shards with an index.

    Attributes:
        name: ``""`` for a plain checkpoint, else the diffusers component (``unet``...).
        root: the folder the weight files are in.
        files: weight files in index order (a single file: one entry).
        index_path: the ``*.safetensors.index.json`` if sharded.
        config: the component's config.json, if any.
    """

    name: str
    root: Path
    files: list[Path]
    index_path: Path | None = None
    config: dict[str, Any] | None = None
    _weight_map: dict[str, str] | None = None
    _open: dict[Path, SafetensorsFile] = field(default_factory=dict)

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    def open(self, path: Path) -> SafetensorsFile:
        """The (cached) reader for one of this component's files."""
        reader = self._open.get(path)
        if reader is None:
            reader = SafetensorsFile(path)
            self._open[path] = reader
        return reader

    @property
    def weight_map(self) -> dict[str, str]:
        """key -> file name. From the index when sharded; else from the single file's header."""
        if self._weight_map is None:
            self._weight_map = {}
            for path in self.files:
                for key in self.open(path):
                    if key in self._weight_map:
                        raise FormatError(
                            f"tensor {key!r} is in both {self._weight_map[key]} and {path.name}",
                            path=self.root,
                            kind="checkpoint-duplicate",
                        )
                    self._weight_map[key] = path.name
        return self._weight_map

    def verify(self) -> None:
        """Check that every weight file is a safetensors file and that the files agree with
        the index: each tensor in exactly one file, the one the index names.

        A tensor in two shards, or an index that names a tensor's file wrongly, is a
        checkpoint loaders read differently (transformers loads whatever each shard holds,
        tools that follow the index read one copy); loratool refuses it rather than guess.

        Raises:
            FormatError: a file is not safetensors, or a file and the index disagree.
            UnsafeFileError: a file is a pickle.
        """
        try:
            self._verify()
        finally:
            self.close()  # later lookups open only the shard they need

    def _verify(self) -> None:
        holders: dict[str, str] = {}
        for path in self.files:
            try:
                reader = self.open(path)  # opening checks the header
            except FormatError as exc:
                if self.index_path is None:
                    raise
                raise type(exc)(  # an UnsafeFileError (a pickle) stays one
                    f"the index names {path.name} as a shard, but it is not a safetensors "
                    f"file: {exc.message}",
                    path=self.index_path,
                    hint="the index or the folder is damaged; download the checkpoint again",
                    kind=exc.kind,
                ) from None
            for key in reader:
                if key in holders:
                    raise FormatError(
                        f"tensor {key!r} is in both {holders[key]} and {path.name}; loaders "
                        "disagree on which copy counts",
                        path=self.index_path or self.root,
                        hint="the checkpoint is damaged; download or save it again",
                        kind="checkpoint-duplicate",
                    )
                holders[key] = path.name
        if self._weight_map is None:
            self._weight_map = holders
            return
        for key, name in self._weight_map.items():
            if holders.get(key) != name:
                found = f"it is in {holders[key]}" if key in holders else "no shard holds it"
                raise FormatError(
                    f"index maps tensor {key!r} to {name}, but {found}",
                    path=self.index_path,
                    hint="the index does not belong to these shards; download it again",
                    kind="checkpoint-index",
                )
        for key, name in holders.items():
            if key not in self._weight_map:
                raise FormatError(
                    f"shard {name} holds tensor {key!r}, which the index does not list",
                    path=self.index_path,
                    hint="the index does not belong to these shards; download it again",
                    kind="checkpoint-index",
                )

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: object) -> bool:
        return key in self.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def file_for(self, key: str) -> Path:
        try:
            return self.root / self.weight_map[key]
        except KeyError:
            raise FormatError(
                f"no tensor {key!r} in this checkpoint", path=self.root, kind="missing-key"
            ) from None

    def info(self, key: str) -> TensorInfo:
        """Dtype, shape and location of one tensor (opens only the shard that holds it)."""
        return self.open(self.file_for(key)).info(key)

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()


@dataclass
class Checkpoint:
    """A base checkpoint of any supported layout.

    Attributes:
        path: what the user named.
        kind: ``file``, ``folder`` or ``diffusers``.
        components: ``{"": Component}`` for files and HF folders; one per pipeline component
            for diffusers folders.
    """

    path: Path
    kind: str
    components: dict[str, Component]

    def close(self) -> None:
        for comp in self.components.values():
            comp.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _component_from_folder(name: str, folder: Path) -> Component | None:
    """The weights in one folder, or None if it holds no safetensors weights."""
    config_path = folder / MODEL_CONFIG_NAME
    config = (
        read_json_object(config_path, kind="checkpoint-json") if config_path.is_file() else None
    )
    index_paths = [folder / n for n in INDEX_NAMES if (folder / n).is_file()]
    if not index_paths:
        index_paths = sorted(folder.glob("*.safetensors.index.json"))
    if index_paths:
        index_path = index_paths[0]
        doc = read_json_object(index_path, kind="checkpoint-json")
        _refuse_duplicate_index_keys(index_path)
        weight_map = doc.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise FormatError(
                "index has no weight_map of tensor name -> file name",
                path=index_path,
                kind="checkpoint-json",
            )
        files: list[Path] = []
        for file_name in dict.fromkeys(weight_map.values()):
            shard = folder / file_name
            if os.sep in file_name or "/" in file_name or not shard.is_file():
                raise FormatError(
                    f"index names shard {file_name!r}, which is not in the folder",
                    path=index_path,
                    hint="the checkpoint is incomplete; download the missing shard",
                    kind="checkpoint-missing-shard",
                )
            files.append(shard)
        return Component(name, folder, files, index_path, config, _weight_map=dict(weight_map))
    weights = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if weights:
        return Component(name, folder, weights, None, config)
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFileError(
            f"weights are a pickle ({pickles[0].name}); loratool never unpickles files",
            path=pickles[0],
            hint="convert the checkpoint to safetensors in a trusted environment",
            kind="pickle",
        )
    return None


def _refuse_duplicate_index_keys(index_path: Path) -> None:
    """Raise when the index's JSON spells one key twice (JSON readers keep either copy)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise FormatError(
                    f"index lists {key!r} twice ({seen[key]!r} and {value!r}); readers keep "
                    "one or the other",
                    path=index_path,
                    hint="the index is damaged; download or save the checkpoint again",
                    kind="checkpoint-json",
                )
            seen[key] = value
        return seen

    # read_json_object has already parsed (and reported) the document; this second parse
    # only looks at the key pairs.
    json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=pairs)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a base checkpoint (headers and indexes only).

    Raises:
        FormatError: no weights found, a weight file is not safetensors, the index and its
            shards disagree (see :meth:`Component.verify`), bad JSON, a key listed twice.
        UnsafeFileError: the weights are pickles.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeFileError(
                "pickle-based checkpoint; loratool never unpickles files (they can run code)",
                path=path,
                hint="convert it to .safetensors in a trusted environment",
                kind="pickle",
            )
        comp = Component("", path.parent, [path])
        comp.verify()  # check the header now: errors name the file early
        return Checkpoint(path, "file", {"": comp})
    if not path.is_dir():
        raise FormatError("no such file or folder", path=path, kind="missing")
    if (path / PIPELINE_INDEX_NAME).is_file():
        components: dict[str, Component] = {}
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            comp = _component_from_folder(sub.name, sub)
            if comp is not None:
                try:
                    comp.verify()
                except BaseException:
                    for opened in components.values():
                        opened.close()
                    raise
                components[sub.name] = comp
        if not components:
            raise FormatError(
                "diffusers folder with no safetensors weights in any component",
                path=path,
                kind="no-weights",
            )
        return Checkpoint(path, "diffusers", components)
    comp = _component_from_folder("", path)
    if comp is None:
        raise FormatError(
            "no *.safetensors weights or index in this folder", path=path, kind="no-weights"
        )
    comp.verify()
    return Checkpoint(path, "folder", {"": comp})
