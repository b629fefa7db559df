"""Engine choice: which engine merges, on which device (``--device``, ``--exact``).

``cpu`` is :class:`~lora_tools.ops.merge.numpy_engine.NumpyEngine` and never imports torch;
CUDA (and ``torch-cpu``) is :class:`~lora_tools.ops.merge.torch_engine.TorchEngine`, imported
only when chosen.

Example:
    >>> select_engine("cpu").name
    'numpy'
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Protocol

from lora_tools.errors import DeviceError, UsageError
from lora_tools.io.safetensors import SafetensorsFile, SafetensorsWriter
from lora_tools.ops.merge.jobs import DEFAULT_BLOCK_BYTES, FilePlan, ProgressFn
from lora_tools.ops.merge.numpy_engine import NumpyEngine


class Engine(Protocol):
    """Writes the tensors of one file: raw copies and merges (numpy or torch)."""

    name: str

    def write_file(
        self,
        reader: SafetensorsFile,
        plan: FilePlan,
        writer: SafetensorsWriter,
        progress: ProgressFn,
    ) -> None: ...


def _cuda_possible() -> bool:
    """Whether a GPU could be usable, judged without importing torch (2 s and 220 MB)."""
    if importlib.util.find_spec("torch") is None:
        return False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    # NVIDIA's device nodes, or AMD's (ROCm builds of torch also answer torch.cuda)
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def select_engine(device: str = "auto", *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Engine:
    """The engine for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``cpu`` is the numpy engine and never imports torch. ``auto`` uses CUDA when torch is
    installed and sees a GPU, else the numpy engine; torch is imported only when a GPU device
    node exists, so a machine without one pays nothing for the check. ``torch-cpu`` (the CLI's
    ``--exact``) runs the torch engine on the CPU: its products are torch's own float32 matmul,
    so the result is bit-identical to PEFT's ``merge_and_unload`` on CPU for every rank, at the
    cost of importing torch (about 2 s and 220 MB). The numpy engine's BLAS sums the rank in the
    same order only for small ranks; otherwise it differs in the last bit of a few elements.

    Raises:
        DeviceError: CUDA asked for but torch or a GPU is missing.
        UsageError: an unknown device name.

    Example:
        >>> select_engine("cpu").name
        'numpy'
    """
    cuda = device == "cuda" or device.startswith("cuda:")
    if device not in ("auto", "cpu", "torch-cpu") and not cuda:
        raise UsageError(f"unknown device {device!r}", hint="use auto, cpu, cuda or cuda:N")
    if device == "cpu" or (device == "auto" and not _cuda_possible()):
        return NumpyEngine(block_bytes)
    try:
        import torch  # noqa: F401
    except ImportError:
        if device == "auto":
            return NumpyEngine(block_bytes)
        if device == "torch-cpu":
            raise DeviceError(
                "--exact needs torch (it merges with torch's own matmul, as PEFT does), "
                "which is not installed",
                hint="pip install 'loratool[torch]', or drop --exact",
            ) from None
        raise DeviceError(
            f"--device {device} needs torch, which is not installed",
            hint="pip install 'loratool[torch]' (a CUDA build of torch), or use --device cpu",
        ) from None
    from lora_tools.ops.merge.torch_engine import TorchEngine, cuda_device

    if device == "torch-cpu":
        return TorchEngine("cpu", block_bytes=block_bytes)
    if device == "auto":
        found = cuda_device("cuda", required=False)
        return TorchEngine(found, block_bytes=block_bytes) if found else NumpyEngine(block_bytes)
    return TorchEngine(cuda_device(device, required=True), block_bytes=block_bytes)
