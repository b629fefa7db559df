"""diffusers: what ``load_lora_weights`` (``lora_state_dict``, ``load_lora_adapter``) reads.

Read from diffusers 0.42.1 (huggingface/diffusers, installed here and run on the test files), and
from the wheels of 0.35.2, 0.38.0, 0.39.0, 0.40.0 and 0.41.0 (0.39.0 also run, in a separate
environment, on a mixed-rank file):
``loaders/lora_pipeline.py`` (``StableDiffusionLoraLoaderMixin.lora_state_dict`` and the other
pipelines' copies), ``loaders/lora_conversion_utils.py`` (``_convert_non_diffusers_lora_to_
diffusers``, ``_convert_kohya_flux_lora_to_diffusers``), ``loaders/peft.py``
(``load_lora_adapter``) and ``utils/peft_utils.py`` (``get_peft_kwargs``).

- A pipeline takes one state dict: a diffusers file (``unet.`` / ``text_encoder.`` /
  ``transformer.`` prefixes, PEFT roles, with or without ``lora_adapter_metadata``), an old
  attention-processor file, or a kohya / ComfyUI-named file it converts. Each component keeps
  the keys under its own prefix; a file with none (a PEFT folder's ``base_model.model.`` keys)
  loads nothing, with only a warning ("No LoRA keys associated to UNet2DConditionModel found
  with the prefix='unet'").
- ``dora_scale`` tensors (kohya DoRA) are filtered out with a warning ("a DoRA checkpoint that is
  not compatible in Diffusers"): the module is applied as a plain LoRA.
- SD / SDXL kohya files (every key under ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` /
  ``lora_te2_``) go through ``_convert_non_diffusers_lora_to_diffusers``, which takes
  ``lora_down`` / ``lora_up`` / ``alpha`` only: any other tensor left (LoHa ``hada_*``, LoKr
  ``lokr_*``, Tucker ``lora_mid``, ``diff`` / ``diff_b``...) raises "The following keys have not
  been correctly renamed" (LoKr files of Z-Image and Flux 2 pipelines have their own converter,
  ``_convert_non_diffusers_lokr_to_diffusers``, and load). A kohya file with one key outside those prefixes is not converted at
  all: its ``lora_unet_`` keys match no component and nothing loads.
- The scale of each module is :mod:`lora_tools.consumers.scales` ``_diffusers`` (network_alphas
  for SD / SDXL kohya files, PR 14409 for diffusers files without metadata) from 0.40. Before
  0.40, ``get_peft_kwargs`` on a component without ``lora_adapter_metadata`` and with mixed
  ranks sets ``lora_alpha`` to the rank of the component's first ``lora_B`` key (in key order)
  and writes no ``alpha_pattern``: a module of another rank runs at ``first_rank / rank``
  instead of 1 (measured on 0.39.0: rank-2 modules at 2 beside a first rank of 4, rank-4
  modules at 0.5 beside a first rank of 2). The other facts are the same from 0.35.2 to 0.42.1.
"""

from __future__ import annotations

from lora_tools.adapter import LoraModule
from lora_tools.consumers import Consumer, Version

CONSUMER = Consumer(
    name="diffusers",
    title="diffusers",
    family="LT54",
    current=(0, 42),
    oldest=(0, 35),
    checked=("0.35.2", "0.38.0", "0.39.0", "0.40.0", "0.41.0", "0.42.1"),
    repository="huggingface/diffusers",
)

#: ``get_peft_kwargs`` mirrors each rank into its alpha when a file carries no alphas.
MIRRORED_ALPHAS_SINCE: Version = (0, 40)

#: The prefixes every key of an SD / SDXL kohya file must have to be converted.
KOHYA_SD_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")
#: The tensor suffixes ``_convert_non_diffusers_lora_to_diffusers`` consumes (``dora_scale``
#: is filtered out before it, with a warning).
KOHYA_SD_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
DORA_SUFFIX = ".dora_scale"
#: Flux kohya names, which ``_convert_kohya_flux_lora_to_diffusers`` converts instead.
FLUX_KOHYA_PREFIXES = ("lora_unet_double_blocks_", "lora_unet_single_blocks_")


def kohya_sd_left(names: list[str]) -> list[str]:
    """The tensors of an SD / SDXL kohya file the converter does not consume (it then
    raises)."""
    return [n for n in names if not n.endswith(KOHYA_SD_SUFFIXES) and not n.endswith(DORA_SUFFIX)]


def kohya_flux_dropped(names: list[str]) -> tuple[list[str], list[str]]:
    """Of a Flux kohya file's ``.diff`` / ``.diff_b`` tensors, ``(dropped, refused)`` by
    ``_convert_kohya_flux_lora_to_diffusers`` (0.42, loaders/lora_conversion_utils.py): every
    ``diff_b`` under lora_unet_ / lora_te_ / lora_te1_ is filtered out with an info log; once a
    key holds both ``.norm`` and ``.diff`` every key with either goes the same way; any other
    ``.diff`` is left for the converter, which raises ("Incompatible keys detected")."""
    dropped = [
        n for n in names if "diff_b" in n and n.startswith(("lora_unet_", "lora_te_", "lora_te1_"))
    ]
    rest = [n for n in names if ".diff_b" not in n]
    if any(".norm" in n and ".diff" in n for n in rest):
        dropped += [n for n in rest if ".norm" in n or ".diff" in n]
        rest = [n for n in rest if not (".norm" in n or ".diff" in n)]
    return dropped, [n for n in rest if n.endswith(".diff")]


def kohya_te_attention_dropped(stems: list[str]) -> dict[str, tuple[list[str], bool]]:
    """Per kohya text-encoder prefix (``lora_te_``, ``lora_te1_``, ``lora_te2_``): the
    ``self_attn_q/k/v_proj`` modules diffusers 0.42 does not load, and whether it then refuses
    the file. ``_convert_text_encoder_lora_key`` renames them to the old attention-processor
    names (``to_q_lora``), which ``convert_state_dict_to_diffusers`` / ``_to_peft`` take as old
    diffusers only when a key of the same text encoder holds ``to_out_lora`` (an
    ``self_attn_out_proj`` module); otherwise they stay unexpected keys (dropped, in
    transformers' load report), or, when the text encoder has nothing else, no state-dict type
    is inferred ("Could not automatically infer state dict type")."""
    out: dict[str, tuple[list[str], bool]] = {}
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        mine = [s for s in stems if s.startswith(prefix)]
        if any(s.endswith("_self_attn_out_proj") for s in mine):
            continue
        qkv = [
            s
            for s in mine
            if s.endswith(("_self_attn_q_proj", "_self_attn_k_proj", "_self_attn_v_proj"))
        ]
        if qkv:
            out[prefix] = (qkv, len(qkv) == len(mine))
    return out


def kohya_sd_unprefixed(names: list[str]) -> list[str]:
    """The keys that stop a kohya file from being converted (none of the four prefixes)."""
    return [n for n in names if not n.startswith(KOHYA_SD_PREFIXES)]


def first_rank_scales(modules: list[LoraModule]) -> dict[str, float]:
    """Before 0.40, the scale of each module of one component loaded without metadata: the rank
    of the first ``lora_B`` key (in key order) over the module's own rank."""
    ordered = sorted(modules, key=lambda m: m.keys.get("up", m.key))
    if not ordered:
        return {}
    first = ordered[0].rank
    return {m.key: first / m.rank for m in ordered if m.rank}
