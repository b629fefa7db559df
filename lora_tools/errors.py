"""The exception hierarchy of loratool.

Every error the library raises on purpose derives from :class:`LoraToolError`. Each carries the
file it is about, a message that says what was expected and what was found, and a hint that says
what to do next. The CLI prints ``str(error)`` as one line on stderr and exits with
``error.exit_code``.

Example:
    >>> from lora_tools.errors import FormatError
    >>> err = FormatError("header length 9 exceeds file size 8", path="a.safetensors",
    ...                   hint="the file is truncated; download it again")
    >>> str(err)
    'a.safetensors: header length 9 exceeds file size 8 (hint: the file is truncated; download it again)'
"""

from __future__ import annotations

import os

#: Exit codes shared by every command.
EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_ERROR = 3


class LoraToolError(Exception):
    """Base class of all loratool errors.

    Args:
        message: what is wrong: the tensor or module, what was expected and what was found.
        path: the file or folder the error is about, if any.
        hint: what the user can do about it.
        kind: a stable slug naming the kind of problem (validate maps it to a rule ID).
    """

    exit_code = EXIT_ERROR

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        hint: str | None = None,
        kind: str | None = None,
    ) -> None:
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.hint = hint
        self.kind = kind
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class UsageError(LoraToolError):
    """The command line or API call asks for something impossible (exit code 2)."""

    exit_code = EXIT_USAGE


class FormatError(LoraToolError):
    """A file is not a valid container (safetensors header, offsets, dtypes, JSON config)."""


class UnsafeFileError(FormatError):
    """A pickle-based file (.bin/.pt/.ckpt) that loratool refuses to unpickle."""


class AdapterError(LoraToolError):
    """Valid container, but the tensors do not form a LoRA adapter loratool understands."""


class UnknownFormatError(AdapterError):
    """The keys match no known adapter naming scheme."""


class UnsupportedAdapterError(AdapterError):
    """A LyCORIS or other adapter type (LoHa, LoKr, OFT...) for which an operation is undefined."""


class UnknownScaleError(AdapterError):
    """An operation needs a module's scale (alpha / r), which the adapter's files do not say
    (PEFT keys without adapter_config.json)."""


class ResolveError(LoraToolError):
    """Adapter modules do not resolve to base weights (none, or more than one)."""


class ShapeError(LoraToolError):
    """Tensors that should agree in shape do not."""


class OutputError(LoraToolError):
    """The output cannot be written: it exists, it is an input, or it lies inside an input."""


class DeviceError(LoraToolError):
    """The requested compute device is not available (torch missing, no CUDA)."""


class HubError(LoraToolError):
    """Talking to the Hugging Face Hub failed (auth, missing repo, rate limit, network)."""
