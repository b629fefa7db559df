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
import re
import sys

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


class UnsupportedBaseError(LoraToolError):
    """A base checkpoint loratool cannot merge into (a quantization scheme it does not
    requantize: fp8 schemes until the merge engine keeps them, int4 / NF4 / GPTQ / AWQ...)."""


class ShapeError(LoraToolError):
    """Tensors that should agree in shape do not."""


class OutputError(LoraToolError):
    """The output cannot be written: it exists, it is an input, or it lies inside an input."""


class DeviceError(LoraToolError):
    """The requested compute device is not available (torch missing, no CUDA)."""


class HubError(LoraToolError):
    """Talking to the Hugging Face Hub failed (auth, missing repo, rate limit, network)."""


# Secrets and terminal control in printed text: every line loratool prints passes through
# safe_text (cli/_common.py), and Hub error translations redact at the source too.
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s'\",;}\]]+")
_AUTH_VALUE = re.compile(r"(?i)\b(authorization)(['\"]?\s*[:=]\s*['\"]?)(?!bearer\b)[^\s'\",;}\]]+")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{16,}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_SECRETS: set[str] = set()
#: Environment variables huggingface_hub reads a token from.
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def register_secret(value: str | None) -> None:
    """Have :func:`redact` hide ``value`` (a token given on the command line) from now on."""
    if value and len(value) >= 8:
        _SECRETS.add(value)


def _known_secrets() -> set[str]:
    known = set(_SECRETS)
    known.update(v for name in TOKEN_ENV if len(v := os.environ.get(name, "")) >= 8)
    if "huggingface_hub" in sys.modules:  # the token it sends: env, or the stored login
        try:
            from huggingface_hub import get_token

            token = get_token()
        except Exception:  # an unreadable token file is no reason to fail an error message
            token = None
        if token and len(token) >= 8:
            known.add(token)
    return known


def redact(text: str) -> str:
    """``text`` with Hub tokens hidden: the known token, any ``Bearer ...``, any ``hf_...``.

    Example:
        >>> redact("401: got 'Authorization: Bearer hf_abcdefghijklmnopqrstuvwxyz0123'")
        "401: got 'Authorization: Bearer ***'"
    """
    for secret in sorted(_known_secrets(), key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _BEARER.sub(r"\1 ***", text)
    text = _AUTH_VALUE.sub(r"\1\2***", text)
    return _HF_TOKEN.sub("hf_***", text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``, ``\\u202e``, lone
    surrogates): a file name cannot split a line, colour the terminal or fake a log line.

    Example:
        >>> printable("evil\\n\\x1b[31mname")
        'evil\\\\n\\\\x1b[31mname'
    """
    return _CONTROL.sub(_escape, text)


def safe_text(text: str) -> str:
    """What loratool prints: :func:`redact` then :func:`printable`."""
    return printable(redact(text))
