"""Hostile adapter configs and metadata (issue #10, items 17, 18, 19, 23): every command ends in
bounded time with one line (or validate findings), exit 3 or 1, and writes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_tools.io.safetensors import SafetensorsFile, save_tensors
from tests.console import run_console

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURES = ROOT / "fixtures"
LLAMA = FIXTURES / "peft" / "llama-lora"
BASE = FIXTURES / "bases" / "tiny-llama"
DEEP = "[" * 100_000 + "]" * 100_000


def peft_copy(tmp_path: Path, config_text: str, name: str = "adapter") -> Path:
    folder = tmp_path / name
    shutil.copytree(LLAMA, folder)
    (folder / "adapter_config.json").write_text(config_text)
    return folder


def llama_config(**changes) -> str:
    config = json.loads((LLAMA / "adapter_config.json").read_text())
    config.update(changes)
    return json.dumps(config)


invoke = run_console


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 3, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("loratool: error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def writers(adapter: Path, out: Path) -> list[list[str]]:
    """Every command that writes, on ``adapter``, each to its own output under ``out``."""
    return [
        ["merge", str(BASE), str(adapter), "-o", str(out / "merged")],
        ["rescale", str(adapter), "-o", str(out / "rescaled"), "--factor", "2"],
        ["resize", str(adapter), "-o", str(out / "resized"), "--rank", "2"],
        ["combine", str(adapter), str(LLAMA), "-o", str(out / "combined")],
        ["convert", str(adapter), "--to", "kohya", "-o", str(out / "k.safetensors")],
    ]


# -- item 17: non-finite and non-numeric scales, weights that overflow ----------------------

BAD_SCALES = {
    "alpha-nan": (llama_config(lora_alpha=float("nan")), "lora_alpha is nan"),
    "alpha-inf": (llama_config(lora_alpha=float("inf")), "lora_alpha is inf"),
    "alpha-1e308": (llama_config(lora_alpha=1e308), "lora_alpha is 1e+308"),
    "alpha-string": (llama_config(lora_alpha="8"), "lora_alpha is '8' (a str)"),
    "alpha-object": (llama_config(lora_alpha={"a": 1}), "(a dict)"),
    "alpha-10e400": (
        llama_config(lora_alpha=0).replace('"lora_alpha": 0', '"lora_alpha": 1' + "0" * 400),
        "lora_alpha is 1000",
    ),
    "alpha-pattern-nan": (
        llama_config(alpha_pattern={"q_proj": float("nan")}),
        "alpha_pattern['q_proj'] is nan",
    ),
    "r-nan": (llama_config(r=float("nan")), "r is nan"),
    "rank-pattern-list": (llama_config(rank_pattern=["q_proj"]), "rank_pattern is a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCALES))
def test_unusable_scale_is_refused_by_every_writer_before_writing(tmp_path, case):
    config, needle = BAD_SCALES[case]
    adapter = peft_copy(tmp_path, config)
    out = tmp_path / "out"
    out.mkdir()
    for args in writers(adapter, out):
        one_line_error(invoke(*args), needle)
    assert list(out.iterdir()) == []
    result = invoke("validate", adapter)
    assert result.exit_code == 1 and "internal error" not in result.output, result.output


def test_validate_reports_unusable_alphas_as_lt108(tmp_path):
    for case in ("alpha-1e308", "alpha-string", "alpha-10e400"):
        adapter = peft_copy(tmp_path, BAD_SCALES[case][0], case)
        result = invoke("validate", adapter, "--output-format", "json")
        codes = [f["rule"] for f in json.loads(result.output)["files"][0]["findings"]]
        assert codes == ["LT108"], (case, result.output)


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e308"])
def test_merge_refuses_weights_whose_result_is_not_finite(tmp_path, weight):
    out = tmp_path / "merged"
    result = invoke("merge", BASE, LLAMA, "-o", out, "--weight", weight)
    assert result.exit_code in (2, 3), result.output
    assert "internal error" not in result.output and "--weight" in result.output + weight
    assert not out.exists()


def test_merge_refuses_a_finite_scale_whose_update_overflows_the_output_dtype(tmp_path):
    # scale 2.5e29: finite, but the update (about 1e29) times weight 1e10 overflows float32.
    adapter = peft_copy(tmp_path, llama_config(lora_alpha=1e30))
    out = tmp_path / "merged"
    result = invoke("merge", BASE, adapter, "-o", out, "--weight", "1e10")
    one_line_error(result, "beyond what F32 can hold")
    assert not out.exists()
    ok = invoke("merge", BASE, adapter, "-o", tmp_path / "fine")
    assert ok.exit_code == 0, ok.output
    with SafetensorsFile(tmp_path / "fine" / "model.safetensors") as f:
        assert all(np.isfinite(f.tensor(k).numpy()).all() for k in f.keys())  # noqa: SIM118


def test_rescale_refuses_a_subnormal_alpha_and_an_overflowing_factor(tmp_path):
    result = invoke("rescale", LLAMA, "-o", tmp_path / "a", "--alpha", "1e-320")
    assert result.exit_code == 2 and "--alpha" in result.output, result.output
    assert not (tmp_path / "a").exists()
    result = invoke("rescale", LLAMA, "-o", tmp_path / "b", "--factor", "1e300")
    one_line_error(result, "NaN/Inf")
    assert not (tmp_path / "b").exists()
    # finite factors whose product overflows float32: 1e19 * 1e19 * 0.1 * 0.1
    result = invoke("rescale", LLAMA, "-o", tmp_path / "c", "--factor", "1e40")
    assert result.exit_code == 3 and not (tmp_path / "c").exists(), result.output


# -- item 18: regular-expression DoS from the adapter itself --------------------------------

NAME = "a" * 32 + "!"


def redos_adapter(tmp_path: Path, name: str = "redos", **config) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    save_tensors(
        folder / "adapter_model.safetensors",
        {
            f"base_model.model.{NAME}.lora_A.weight": np.ones((2, 4), np.float32),
            f"base_model.model.{NAME}.lora_B.weight": np.ones((4, 2), np.float32),
        },
        {"format": "pt"},
    )
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": [NAME]}
    (folder / "adapter_config.json").write_text(json.dumps({**base, **config}))
    return folder


def run_bounded(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; a hang fails the test (TimeoutExpired) instead of the suite."""
    return subprocess.run(
        [sys.executable, "-m", "lora_tools", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "config",
    [{"alpha_pattern": {"(a+)+": 8}}, {"rank_pattern": {"(a+)+": 2}}],
    ids=["alpha_pattern", "rank_pattern"],
)
def test_catastrophic_pattern_keys_end_in_bounded_time(tmp_path, config):
    adapter = redos_adapter(tmp_path, **config)
    out = tmp_path / "out"
    out.mkdir()
    for args in (
        ["inspect", adapter],
        ["validate", adapter],
        ["rescale", adapter, "-o", out / "r", "--factor", "2"],
        ["resize", adapter, "--rank", "1", "--dry-run"],
        ["push", adapter, "me/x", "--dry-run"],
    ):
        result = run_bounded(*args)
        assert result.returncode in (0, 1), (args, result.stdout, result.stderr)
        assert "internal error" not in result.stderr
    # "(a+)+" does not match 'aaa...a!' under PEFT's (.*\.)?(KEY)$: r and lora_alpha hold.
    doc = json.loads(run_bounded("inspect", adapter, "--json").stdout)
    assert doc["scale"]["histogram"] == {"1": 1}
    matched = redos_adapter(tmp_path, "matched", alpha_pattern={"(a+)+!": 8})
    doc = json.loads(run_bounded("inspect", matched, "--json").stdout)
    assert doc["scale"]["histogram"] == {"4": 1}  # 'aaa...a!' fullmatches (a+)+!: alpha 8


def test_catastrophic_target_modules_string_ends_in_bounded_time(tmp_path):
    adapter = redos_adapter(tmp_path, target_modules="(a+)+")
    result = run_bounded("validate", adapter, "--output-format", "json")
    codes = [f["rule"] for f in json.loads(result.stdout)["files"][0]["findings"]]
    assert codes == ["LT306"]  # re.fullmatch("(a+)+", "aaa...a!") is None: PEFT targets nothing


def test_a_repeat_count_beyond_the_engine_is_one_error_line(tmp_path):
    adapter = redos_adapter(tmp_path, alpha_pattern={"a{99999999999}": 2})
    one_line_error(invoke("inspect", adapter), "alpha_pattern key 'a{99999999999}'")
    one_line_error(
        invoke("rescale", adapter, "-o", tmp_path / "o", "--factor", "2"), "a{99999999999}"
    )
    result = invoke("validate", adapter, "--output-format", "json")
    codes = [f["rule"] for f in json.loads(result.output)["files"][0]["findings"]]
    assert codes == ["LT302"], result.output


# -- item 19: memory bombs -------------------------------------------------------------------


def test_validate_of_a_rank_far_above_the_layer_stays_small(tmp_path):
    """Rank 60,000 on a 1 x 1 layer (480 KB): the r x r Grams were 13.4 GiB."""
    adapter = tmp_path / "wide"
    adapter.mkdir()
    r = 60_000
    rng = np.random.default_rng(0)
    down, up = (
        rng.normal(size=(r, 1)).astype(np.float32),
        rng.normal(size=(1, r)).astype(np.float32),
    )
    save_tensors(
        adapter / "adapter_model.safetensors",
        {"base_model.model.x.lora_A.weight": down, "base_model.model.x.lora_B.weight": up},
        {"format": "pt"},
    )
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["x"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    limit = (
        "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
    )
    code = (
        limit
        + "sys.argv = ['loratool', 'validate', sys.argv[1]]; runpy.run_module('lora_tools', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(adapter)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_module_needing_more_memory_than_available_is_named(tmp_path, monkeypatch):
    import lora_tools.adapter as adapter_module

    monkeypatch.setattr(adapter_module, "MEMORY_CHECK_BYTES", 0)
    monkeypatch.setattr(adapter_module, "available_memory_bytes", lambda: 1000)
    for args in (
        ["inspect", LLAMA, "--stats"],
        ["resize", LLAMA, "--rank", "2", "--dry-run"],
        ["rescale", LLAMA, "-o", tmp_path / "r", "--factor", "2"],
        ["merge", BASE, LLAMA, "-o", tmp_path / "m"],
    ):
        one_line_error(invoke(*args), "of working memory, more than the 0.0 GiB available")
    assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists()


# -- item 23: parsable input that used to be an internal error --------------------------------


def test_deeply_nested_config_and_metadata_are_format_errors(tmp_path):
    adapter = peft_copy(tmp_path, llama_config(x=0).replace('"x": 0', '"x": ' + DEEP))
    one_line_error(invoke("inspect", adapter), "nested deeper than 64 levels")
    result = invoke("validate", adapter)
    assert result.exit_code == 1 and "LT302" in result.output, result.output

    source = FIXTURES / "kohya" / "sd-lora.safetensors"
    with SafetensorsFile(source) as f:
        tensors = {k: f.tensor(k).numpy() for k in f.keys()}  # noqa: SIM118
        metadata = dict(f.metadata)
    for key in ("ss_network_args", "loratool_history", "loratool_merge"):
        path = tmp_path / f"{key}.safetensors"
        save_tensors(path, tensors, {**metadata, key: DEEP})
        for args in (
            ["inspect", path],
            ["validate", path],
            ["rescale", path, "-o", tmp_path / f"{key}-out.safetensors", "--factor", "2"],
        ):
            result = invoke(*args)
            assert "internal error" not in result.output, (key, args, result.output)
            assert result.exit_code in (0, 1, 3), (key, args, result.output)
    result = invoke("push", tmp_path / "loratool_merge.safetensors", "me/x", "--dry-run")
    one_line_error(result, "__metadata__['loratool_merge'] is not valid JSON")


def test_rank_zero_and_nan_alpha_are_one_line_errors(tmp_path):
    path = tmp_path / "k.safetensors"
    save_tensors(
        path,
        {
            "lora_unet_a_b.lora_down.weight": np.ones((0, 4), np.float32),
            "lora_unet_a_b.lora_up.weight": np.ones((4, 0), np.float32),
            "lora_unet_a_b.alpha": np.array(4.0, np.float32),
            "lora_unet_c_d.lora_down.weight": np.ones((2, 4), np.float32),
            "lora_unet_c_d.lora_up.weight": np.ones((4, 2), np.float32),
        },
    )
    for args in (
        ["rescale", path, "-o", tmp_path / "a.safetensors", "--alpha", "2"],
        ["rescale", path, "-o", tmp_path / "b.safetensors", "--normalize"],
        ["resize", path, "--rank", "1", "--dry-run"],
        ["inspect", path, "--stats"],
    ):
        one_line_error(invoke(*args), "has rank 0")
    adapter = peft_copy(tmp_path, BAD_SCALES["alpha-nan"][0], "nan")
    one_line_error(invoke("resize", adapter, "--rank", "2", "--dry-run"), "lora_alpha is nan")
    one_line_error(invoke("inspect", adapter, "--stats"), "lora_alpha is nan")


def test_tensor_names_with_a_lone_surrogate_are_refused_like_the_reference_reader(tmp_path):
    header = {
        "base_model.model.a\udc80.lora_A.weight": {
            "dtype": "F32",
            "shape": [1, 1],
            "data_offsets": [0, 4],
        },
        "base_model.model.a\udc80.lora_B.weight": {
            "dtype": "F32",
            "shape": [1, 1],
            "data_offsets": [4, 8],
        },
    }
    text = json.dumps(header).encode()  # \udc80 as an escape, as a hostile writer would
    text += b" " * (-len(text) % 8)
    path = tmp_path / "s.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + np.ones(2, np.float32).tobytes())
    from safetensors import SafetensorError, safe_open

    with pytest.raises(SafetensorError, match="surrogate"), safe_open(str(path), "np"):
        pass
    for args in (
        ["inspect", path],
        ["rescale", path, "-o", tmp_path / "o.safetensors", "--factor", "2"],
        ["convert", path, "--to", "kohya", "-o", tmp_path / "c.safetensors"],
    ):
        one_line_error(invoke(*args), "lone UTF-16 surrogate")
    result = invoke("validate", path)
    assert result.exit_code == 1 and "LT005" in result.output, result.output


@pytest.fixture(scope="module")
def merged_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "model"
    result = invoke("merge", BASE, LLAMA, "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("loratool_merge.json", b'{"base": ', "not valid JSON"),
        ("loratool_merge.json", b'{"base": "x"}', "'base' is a str"),
        ("loratool_merge.json", ("[" * 5000 + "]" * 5000).encode(), "nested deeper"),
        ("README.md", b"---\nfoo: [unclosed\n---\nhello\n", "front matter"),
        ("README.md", b"---\n- a\n- b\n---\nhello\n", "front matter"),
        ("README.md", b"caf\xe9\n", "not UTF-8"),
    ],
)
def test_push_dry_run_of_a_malformed_model_folder_is_one_line(
    tmp_path, merged_model, name, content, needle
):
    folder = tmp_path / "model"
    shutil.copytree(merged_model, folder)
    (folder / name).write_bytes(content)
    one_line_error(invoke("push", folder, "me/model", "--dry-run"), needle, name)


def test_push_dry_run_of_an_adapter_with_a_non_utf8_card_is_one_line(tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(LLAMA, folder)
    (folder / "README.md").write_bytes(b"caf\xe9\n")
    one_line_error(invoke("push", folder, "me/x", "--dry-run"), "README.md", "not UTF-8")
