"""Checkpoint layouts: how one model's modules are named in its native (single-file) layout and
in diffusers, derived from the model's block structure rather than listed per case.

- :mod:`lora_tools.layouts.unet`: the Stable Diffusion UNet (SD1.x, SD2.x, SDXL), original
  ``input_blocks`` / ``middle_block`` / ``output_blocks`` <-> diffusers ``down_blocks`` /
  ``mid_block`` / ``up_blocks``.

The maps work on module paths (no ``.weight``), know nothing of files and import nothing of
loratool: :mod:`lora_tools.resolve` uses them to find a base weight named in the other layout.
"""

from __future__ import annotations

from lora_tools.layouts.unet import UNetLayout

__all__ = ["UNetLayout"]
