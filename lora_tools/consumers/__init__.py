"""The deployment targets ("consumers") of an adapter and what each applies when it loads one.

One module per consumer (``vllm``, ``sglang``, ``tgi``, ``llamacpp``, ``diffusers``,
``comfyui``, ``peft``) holds the facts read from that consumer's own loading code: what it
refuses, what it drops without a word, which ranks and modules it serves, and from which version
on. Each names the sources read and the versions checked. ``validate --profile`` turns the facts
into rules (:mod:`lora_tools.ops.validate.checks.profiles`); :mod:`lora_tools.consumers.scales`
holds the scale each one applies to each module (``inspect --consumers``, LT590). Nothing here
reads a tensor, and nothing imports torch.

A profile is a consumer at a version: ``vllm`` (the newest version checked) or ``vllm:0.30``.

Example:
    >>> from lora_tools.consumers import parse_profiles
    >>> [p.spec for p in parse_profiles(["vllm:0.30,sglang"])]
    ['vllm:0.30', 'sglang:0.5.23']
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lora_tools.errors import UsageError

Version = tuple[int, ...]


@dataclass(frozen=True)
class Consumer:
    """A deployment target and where its facts come from.

    Attributes:
        name: the profile name (``vllm``).
        title: how its project spells it (``vLLM``).
        family: the prefix of its validate rules (``LT50``).
        current: the newest version whose loading code was read; the default. Empty for a
            consumer without releases to name (llama.cpp: the commits read are in ``checked``).
        oldest: the oldest version the facts cover; older ones are refused.
        checked: every version whose loading code was read.
        repository: where the loading code lives (``vllm-project/vllm``).
        options: the validate options the consumer reads (``max_lora_rank``,
            ``target_modules``).
    """

    name: str
    title: str
    family: str
    current: Version
    oldest: Version
    checked: tuple[str, ...]
    repository: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    """A consumer at one version."""

    consumer: Consumer
    version: Version

    @property
    def spec(self) -> str:
        if not self.version:
            return self.consumer.name
        return f"{self.consumer.name}:{fmt_version(self.version)}"

    @property
    def label(self) -> str:
        """``vLLM 0.34``: how findings name the consumer."""
        if not self.version:
            return self.consumer.title
        return f"{self.consumer.title} {fmt_version(self.version)}"

    def since(self, version: Version) -> bool:
        """Whether this profile's version is ``version`` or later."""
        return _key(self.version) >= _key(version)


def fmt_version(version: Version) -> str:
    return ".".join(str(part) for part in version)


def parse_version(text: str) -> Version:
    """``"0.33"`` -> ``(0, 33)``; ``"0.5.23"`` -> ``(0, 5, 23)``.

    Raises:
        UsageError: not dot-separated integers.
    """
    parts = text.strip().lstrip("v").split(".")
    if not parts or not all(part.isdigit() for part in parts):
        raise UsageError(
            f"{text!r} is not a version (expected numbers such as 0.33 or 0.5.23)",
            hint="write --profile NAME or NAME:VERSION, e.g. --profile vllm:0.33",
        )
    return tuple(int(part) for part in parts)


def _registry() -> dict[str, Consumer]:
    from lora_tools.consumers import comfyui, diffusers, llamacpp, peft, sglang, tgi, vllm

    modules = (vllm, sglang, tgi, llamacpp, diffusers, comfyui, peft)
    return {module.CONSUMER.name: module.CONSUMER for module in modules}


def consumers() -> dict[str, Consumer]:
    """Every consumer by profile name, in rule-family order."""
    return _registry()


def parse_profiles(values: Iterable[str] | str | None) -> tuple[Profile, ...]:
    """Profiles from ``--profile`` values: ``["vllm,sglang:0.5"]`` or ``"vllm:0.30"``.

    A version may name fewer parts than the consumer's (``0.30`` for ``0.30.0``); one older than
    the oldest version checked, or newer than the newest, is refused: the facts are not known
    there.

    Raises:
        UsageError: an unknown consumer or a version outside the range checked.
    """
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    known = consumers()
    out: list[Profile] = []
    for value in values:
        for token in (part.strip() for part in value.split(",")):
            if not token:
                continue
            name, _, version_text = token.partition(":")
            consumer = known.get(name.strip().lower())
            if consumer is None:
                raise UsageError(
                    f"--profile {token!r}: unknown consumer {name!r}",
                    hint=f"profiles: {', '.join(known)}",
                )
            if version_text and not consumer.current:
                raise UsageError(
                    f"--profile {token!r}: the {consumer.title} profile has no versions (its "
                    f"facts come from {', '.join(consumer.checked)})",
                    hint=f"write --profile {consumer.name}",
                )
            version = parse_version(version_text) if version_text else consumer.current
            if _key(version) < _key(consumer.oldest) or _key(version) > _key(consumer.current):
                raise UsageError(
                    f"--profile {token!r}: {consumer.title} {version_text} is outside the "
                    f"versions checked ({fmt_version(consumer.oldest)} to "
                    f"{fmt_version(consumer.current)})",
                    hint=f"name a version in that range, or --profile {consumer.name} for "
                    f"{fmt_version(consumer.current)}",
                )
            profile = Profile(consumer, version)
            if profile not in out:
                out.append(profile)
    return tuple(out)


def _key(version: Version) -> Version:
    """``version`` padded with zeros, so that ``0.34`` and ``0.34.0`` compare equal."""
    return version + (0,) * (4 - len(version))


__all__ = [
    "Consumer",
    "Profile",
    "Version",
    "consumers",
    "fmt_version",
    "parse_profiles",
    "parse_version",
]
