"""Naming facts have one home, lora_tools.naming: no module outside formats/ takes them from a
format module, and naming itself sits below every layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lora_tools
from lora_tools import naming
from lora_tools.adapter import LoraModule

ROOT = Path(lora_tools.__file__).parent


def naming_names() -> set[str]:
    """The names lora_tools.naming defines (functions, classes, constants)."""
    tree = ast.parse(Path(naming.__file__).read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _absolute(node: ast.ImportFrom, module: str) -> str:
    """The absolute module an ``ImportFrom`` in ``module`` (dotted) names."""
    if not node.level:
        return node.module or ""
    base = module.split(".")[: -node.level]
    return ".".join(base + ([node.module] if node.module else []))


def naming_leaks(source: str, module: str, names: set[str]) -> list[str]:
    """Every naming helper ``source`` (the text of ``module``) takes from a format module:
    ``from lora_tools.formats.kohya import split_name``, or ``kohya.split_name`` after
    ``from lora_tools.formats import kohya`` / ``import lora_tools.formats.kohya as kohya``."""
    tree = ast.parse(source)
    leaks, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            origin = _absolute(node, module)
            if not (origin == "lora_tools.formats" or origin.startswith("lora_tools.formats.")):
                continue
            for alias in node.names:
                if alias.name in names:
                    leaks.append(f"{module}:{node.lineno}: {alias.name} from {origin}")
                elif origin == "lora_tools.formats":  # a format module imported whole
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lora_tools.formats.") and alias.asname:
                    aliases.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in names
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            leaks.append(f"{module}:{node.lineno}: {node.value.id}.{node.attr}")
    return leaks


def test_naming_defines_the_facts_the_layers_share():
    names = naming_names()
    assert {"PEFT_PREFIX", "COMPONENTS", "split_stem", "flatten_path", "split_name"} <= names
    assert {"kohya_name", "target_paths", "FLAT_TARGET_NAMES", "flat_target_name"} <= names


def test_no_module_outside_formats_takes_naming_from_a_format_module():
    names = naming_names()
    leaks = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent)
        if rel.parts[:2] == ("lora_tools", "formats"):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        leaks += naming_leaks(path.read_text(encoding="utf-8"), module, names)
    assert not leaks, leaks


@pytest.mark.parametrize(
    "source",
    [
        "from lora_tools.formats.kohya import split_name",
        "from lora_tools.formats.peft import PEFT_PREFIX as P",
        "from ..formats.peft import split_stem",
        "from lora_tools.formats import peft as p\np.split_stem('x')",
        "import lora_tools.formats.kohya as k\nk.flatten_path('a.b')",
        "def f():\n    from lora_tools.formats.kohya import kohya_name",
    ],
)
def test_the_scan_finds_each_spelling_of_a_leak(source):
    assert len(naming_leaks(source, "lora_tools.ops.example", naming_names())) == 1


@pytest.mark.parametrize(
    "source",
    [
        "from lora_tools.naming import split_name",
        "from lora_tools.formats.peft import diffusers_component_configs",
        "from lora_tools.formats import load_adapter",
    ],
)
def test_the_scan_passes_other_imports(source):
    assert naming_leaks(source, "lora_tools.ops.example", naming_names()) == []


def test_naming_imports_only_the_bottom_layer():
    tree = ast.parse(Path(naming.__file__).read_text(encoding="utf-8"))
    runtime = {
        getattr(node, "module", None) or alias.name
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    loratool = {m for m in runtime if m.startswith("lora_tools")}
    assert loratool <= {"lora_tools", "lora_tools.errors"}, loratool


@pytest.mark.parametrize(
    ("split", "stem", "expected"),
    [
        ("split_stem", "base_model.model.layers.0.q_proj", (None, "layers.0.q_proj")),
        ("split_stem", "unet.down_blocks.0.to_q", ("unet", "down_blocks.0.to_q")),
        ("split_stem", "text_encoder.base_model.model.fc1", ("text_encoder", "fc1")),
        ("split_stem", "vae.decoder.conv", (None, "vae.decoder.conv")),
        ("split_stem", "unet", (None, "unet")),
        ("split_name", "lora_unet_down_blocks_0_to_q", ("unet", "down_blocks_0_to_q")),
        ("split_name", "lora_te2_text_model_fc1", ("text_encoder_2", "text_model_fc1")),
        ("split_name", "lycoris_blocks_0_attn", ("transformer", "blocks_0_attn")),
        ("split_name", "lycoris_down_blocks_0_to_q", ("unet", "down_blocks_0_to_q")),
        (
            "split_name",
            "lora_unet_double_blocks_0_img_attn_qkv",
            ("transformer", "double_blocks_0_img_attn_qkv"),
        ),
        ("split_name", "lora_unet_input_blocks_4_1_proj_in", ("unet", "input_blocks_4_1_proj_in")),
        ("split_name", "other_name", (None, "other_name")),
    ],
)
def test_a_stem_splits_into_component_and_path(split, stem, expected):
    assert getattr(naming, split)(stem) == expected


def test_kohya_name_round_trips_through_split_name():
    name = naming.kohya_name("text_encoder_2", "encoder.layers.0.mlp.fc1")
    assert name == "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    assert naming.split_name(name) == (
        "text_encoder_2",
        naming.flatten_path("text_model.encoder.layers.0.mlp.fc1"),
    )
    assert naming.kohya_name(None, "mid_block.conv1") == "lora_unet_mid_block_conv1"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("lora_unet_down_blocks_0_attentions_0_to_out_0", "to_out.0"),
        ("lora_te_text_model_encoder_layers_0_self_attn_out_proj", "out_proj"),
        ("lora_unet_blocks_3_weird_layer", "weird_layer"),
        ("lora_unet_img_in", "img_in"),
        (
            "lora_transformer_time_text_embed_timestep_embedder_linear_1",
            "time_text_embed_timestep_embedder_linear_1",
        ),
    ],
)
def test_a_flattened_name_targets_its_known_layer(key, expected):
    assert naming.flat_target_name(key) == expected
    assert LoraModule(key, None, None, None, "linear").target_name == expected
