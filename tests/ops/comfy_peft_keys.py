"""ComfyUI's ``base_model.model.`` keys, as a test-only reference: the LoRA stems
``model_lora_keys_unet`` maps for a model, built from the model's own weights.

Written for these tests from the facts of ComfyUI's code (Comfy-Org/ComfyUI comfy/lora.py at
17358c8, comfy/utils.py ``mmdit_to_diffusers`` / ``pixart_to_diffusers`` at 09708ea,
comfy/ldm/hydit/models.py and attn_layers.py), not copied from it. It is independent of
:mod:`lora_tools.consumers.comfyui` (which matches paths with patterns): here every stem is
listed from a model of a given depth, so a test can ask whether a file's stems are all in it.

- SD3 / SD3.5: per block ``transformer_blocks.i``, the diffusers names of the fused
  ``x_block.attn.qkv`` (``attn.to_q|k|v``), ``context_block.attn.qkv``
  (``attn.add_q|k|v_proj``) and ``x_block.attn2.qkv`` (``attn2.to_q|k|v``), and of the renamed
  weights (``attn.to_out.0``, ``attn.to_add_out``, ``ff.net.0.proj``, ``ff.net.2``,
  ``ff_context.*``, ``norm1.linear``, ``norm1_context.linear``, the q / k norms,
  ``attn2.to_out.0``), built for every block whether the model has them or not; outside the
  blocks ``context_embedder``, ``time_text_embed.*_embedder.linear_1|2``, ``pos_embed.proj``,
  ``norm_out.linear``, ``proj_out`` (``pos_embed.pos_embed`` is no ``.weight``: not mapped).
- PixArt: per block ``attn1.to_q|k|v|to_out.0``, ``attn2.to_q|k|v|to_out.0``, ``ff.net.0.proj``,
  ``ff.net.2``; ``adaln_single.*``, ``caption_projection.linear_1|2``, ``pos_embed.proj``,
  ``proj_out``. ComfyUI also maps them under ``unet.base_model.model.``.
- HunyuanDiT: ``base_model.model.`` + every native ``.weight`` key of the model, as is.
"""

from __future__ import annotations

PREFIX = "base_model.model."


def sd3_stems(depth: int) -> set[str]:
    block = [
        *(f"attn.to_{p}" for p in "qkv"),
        *(f"attn.add_{p}_proj" for p in "qkv"),
        *(f"attn2.to_{p}" for p in "qkv"),
        "norm1_context.linear",
        "attn.to_add_out",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "attn.norm_added_q",
        "attn.norm_added_k",
        "norm1.linear",
        "attn.to_out.0",
        "attn.norm_q",
        "attn.norm_k",
        "attn2.to_out.0",
        "attn2.norm_q",
        "attn2.norm_k",
        "ff.net.0.proj",
        "ff.net.2",
    ]
    basic = [
        "context_embedder",
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2",
        "pos_embed.proj",
        "time_text_embed.text_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2",
        "norm_out.linear",
        "proj_out",
    ]
    paths = [f"transformer_blocks.{i}.{name}" for i in range(depth) for name in block]
    return {PREFIX + p for p in paths + basic}


def pixart_stems(depth: int) -> set[str]:
    block = [
        *(f"attn1.to_{p}" for p in "qkv"),
        *(f"attn2.to_{p}" for p in "qkv"),
        "attn1.to_out.0",
        "attn2.to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
    ]
    basic = [
        *(
            f"adaln_single.emb.{e}_embedder.linear_{n}"
            for e in ("resolution", "aspect_ratio", "timestep")
            for n in (1, 2)
        ),
        "adaln_single.linear",
        "caption_projection.linear_1",
        "caption_projection.linear_2",
        "pos_embed.proj",
        "proj_out",
    ]
    paths = [f"transformer_blocks.{i}.{name}" for i in range(depth) for name in block]
    return {PREFIX + p for p in paths + basic}


def hunyuandit_weights(depth: int) -> list[str]:
    """The ``.weight`` keys of ComfyUI's ``HunYuanDiT`` with ``qk_norm`` (its state dict,
    ``diffusion_model.`` removed): blocks past ``depth // 2`` have the long skip."""
    keys = [
        "mlp_t5.0.weight",
        "mlp_t5.2.weight",
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.weight",
        "extra_embedder.0.weight",
        "extra_embedder.2.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight",
    ]
    for i in range(depth):
        names = [
            "norm1",
            "attn1.Wqkv",
            "attn1.q_norm",
            "attn1.k_norm",
            "attn1.out_proj",
            "norm2",
            "mlp.fc1",
            "mlp.fc2",
            "default_modulation.1",
            "attn2.q_proj",
            "attn2.kv_proj",
            "attn2.q_norm",
            "attn2.k_norm",
            "attn2.out_proj",
            "norm3",
        ]
        if i > depth // 2:
            names += ["skip_norm", "skip_linear"]
        keys += [f"blocks.{i}.{name}.weight" for name in names]
    return keys


def hunyuandit_stems(depth: int) -> set[str]:
    return {PREFIX + k.removesuffix(".weight") for k in hunyuandit_weights(depth)}
