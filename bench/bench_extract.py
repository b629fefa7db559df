"""Benchmark ``loratool extract`` against mergekit's ``mergekit-extract-lora`` on the same files.

Usage (from the repository root; prints a markdown table for docs/benchmarks.md):

    .venv/bin/python bench/bench_extract.py --mergekit /path/to/venv/bin/mergekit-extract-lora
    .venv/bin/python bench/bench_extract.py --size 8b --no-mergekit --runs 1 --sample 3
    .venv/bin/python bench/bench_extract.py --size 8b-4l --no-mergekit --runs 1 --sample 3

(``8b`` writes a 32 GB pair under ``--work``: check ``df -h`` first; ``8b-4l`` has the same
largest tensors, so the same per-pair memory, in 7.7 GB.)

mergekit is not a dependency: install it in a separate venv (``pip install torch==2.13.0`` first,
the CPU build, then ``pip install mergekit``) and pass its ``mergekit-extract-lora``.

The pair: ``bench/make_extract_pair.py`` (its docstring says what the fine-tune is: a rank-24
update with a decaying spectrum plus full-rank noise on every attention / MLP weight, the norms
changed slightly, the embeddings and lm_head unchanged), written under ``--work`` (default
``bench/_work/extract``, gitignored) in a child process if it is not there.

Each tool runs as a child process, rank 16, on the CPU:

- ``python -m lora_tools extract BASE FT -o OUT --rank 16 -q``
- ``mergekit-extract-lora --model FT --base-model BASE --out-path OUT --max-rank 16 --device
  cpu --quiet`` (absolute paths: with a relative one mergekit's model card asks the Hub whether
  the path is a repo id, and fails offline).

Wall time around each child; peak RSS and CPU time (user + system) are the child's, from
``os.wait4`` (``_common.timed``); ``sync`` before each run; the tools take turns in each round;
the page cache holds both checkpoints when they fit in RAM (read once before timing starts).

Error against the exact optimum, on ``--sample`` modules spread over the layers and the 7 kinds
of linear: the true difference ``dW = W_ft - W_base`` (both bf16, decoded to float64), its
singular values in float64 (LAPACK, all of them), and the optimum rank-16 error
``sqrt(sum_{i >= 16} s_i^2) / ||dW||_F`` (Eckart-Young). Each tool's update is read from its
PEFT folder independently of loratool's loader (``lora_alpha / r`` with ``rank_pattern`` /
``alpha_pattern`` matched as PEFT matches them, ``use_rslora``), multiplied out in float64, and
its relative error ``||dW - scale B A||_F / ||dW||_F`` set beside the optimum's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import timed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import make_extract_pair as pair  # noqa: E402

from lora_tools.io.safetensors import SafetensorsFile  # noqa: E402

WORK = ROOT / "bench" / "_work" / "extract"


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a checkpoint or adapter folder."""
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with SafetensorsFile(path) as f:
            found.update({k: path for k in f})
    return found


def read(files: dict[str, Path], name: str) -> np.ndarray:
    with SafetensorsFile(files[name]) as f:
        return f.read(name).astype(np.float64)


def _pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern key matching the module name's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def peft_update(folder: Path, files: dict[str, Path], module: str) -> tuple[np.ndarray, int]:
    """(``scale * B @ A`` in float64, rank) of one module of a PEFT LoRA folder."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    key = _pattern_key(cfg.get("rank_pattern") or {}, module)
    if key is not None:
        r = cfg["rank_pattern"][key]
    key = _pattern_key(cfg.get("alpha_pattern") or {}, module)
    if key is not None:
        alpha = cfg["alpha_pattern"][key]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    stem = f"base_model.model.{module}"
    a = read(files, f"{stem}.lora_A.weight")
    b = read(files, f"{stem}.lora_B.weight")
    if a.shape[0] != r or b.shape[1] != r:
        raise SystemExit(f"{folder}: {module}: factors {b.shape} x {a.shape}, config says r={r}")
    return scale * (b @ a), r


def sampled_modules(s: dict, count: int) -> list[str]:
    """``count`` linears spread over the layers, cycling through the 7 kinds."""
    layers = s["layers"]
    out = []
    for k in range(count):
        layer = round(k * (layers - 1) / max(count - 1, 1))
        kind = pair.LINEARS[k % len(pair.LINEARS)]
        attn = kind in ("q_proj", "k_proj", "v_proj", "o_proj")
        out.append(f"model.layers.{layer}.{'self_attn' if attn else 'mlp'}.{kind}")
    return out


def errors(
    base: Path, ft: Path, outs: dict[str, Path], modules: list[str], rank: int
) -> list[dict]:
    bf, ff = _tensor_files(base), _tensor_files(ft)
    of = {name: _tensor_files(out) for name, out in outs.items()}
    rows = []
    for module in modules:
        dw = read(ff, module + ".weight") - read(bf, module + ".weight")
        norm = np.linalg.norm(dw)
        s = np.linalg.svd(dw, compute_uv=False)
        row = {
            "module": module,
            "shape": dw.shape,
            "optimum": math.sqrt(float(np.sum(s[rank:] ** 2))) / norm,
        }
        for name, out in outs.items():
            update, r = peft_update(out, of[name], module)
            row[name] = float(np.linalg.norm(dw - update) / norm)
            row[name + " rank"] = r
        rows.append(row)
    return rows


def stored(out: Path) -> tuple[float, list[str]]:
    """(MB of tensor files, the non-LoRA tensors stored, shortened)."""
    size = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6
    full = sorted(
        {
            re.sub(r"\.\d+\.", ".N.", k.removeprefix("base_model.model."))
            for k in _tensor_files(out)
            if ".lora_" not in k
        }
    )
    return size, full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=pair.SHAPES, default="1b")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3, help="loratool runs (median)")
    ap.add_argument("--mergekit", default=os.environ.get("MERGEKIT_EXTRACT_LORA"))
    ap.add_argument("--mergekit-runs", type=int, default=1, help="mergekit runs (slow)")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-loratool", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sample", type=int, default=7, help="modules for the error check")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--keep", action="store_true", help="keep the generated pair")
    ap.add_argument("--extra", default="", help="extra loratool extract options")
    ap.add_argument(
        "--layers",
        type=int,
        help="both tools on the first N decoder layers only (loratool --modules, mergekit -i; "
        "mergekit's embeddings and lm_head excluded with -e)",
    )
    args = ap.parse_args()
    if not args.no_mergekit and not args.mergekit:
        ap.error("--mergekit PATH (or MERGEKIT_EXTRACT_LORA) is needed, or --no-mergekit")

    s = pair.SHAPES[args.size]
    work = (args.work / args.size).resolve()
    base, ft = work / "base", work / "finetuned"
    if not (base / "config.json").exists() or not (ft / "config.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        t = time.perf_counter()
        # a child process: this one stays small, so its children's peak RSS is their own
        gen = [sys.executable, str(ROOT / "bench" / "make_extract_pair.py"), str(work)]
        subprocess.run([*gen, "--size", args.size], check=True)
        print(f"generated the {args.size} pair in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    size_gb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    warm = 2 * size_gb < ram / 2
    if warm:
        files = [*map(str, base.glob("*.safetensors")), *map(str, ft.glob("*.safetensors"))]
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)

    outs = {"loratool": work / "out-loratool"}
    cmds = {
        "loratool": [
            sys.executable,
            "-m",
            "lora_tools",
            "extract",
            str(base),
            str(ft),
            "-o",
            str(outs["loratool"]),
            "--rank",
            str(args.rank),
            "-q",
            *args.extra.split(),
        ]
    }
    if not args.no_mergekit:
        outs["mergekit"] = work / "out-mergekit"
        cmds["mergekit"] = [
            args.mergekit,
            "--model",
            str(ft),
            "--base-model",
            str(base),
            "--out-path",
            str(outs["mergekit"]),
            "--max-rank",
            str(args.rank),
            "--device",
            "cpu",
            "--quiet",
        ]
    if args.layers:
        subset = rf".*layers\.({'|'.join(map(str, range(args.layers)))})\..*"
        cmds["loratool"] += ["--modules", subset]
        if "mergekit" in cmds:
            cmds["mergekit"] += ["-i", subset, "-e", "embed_tokens|lm_head"]
        s = {**s, "layers": args.layers}
    if args.no_loratool:
        del cmds["loratool"], outs["loratool"]
    runs = {"loratool": args.runs, "mergekit": args.mergekit_runs}
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in cmds}
    loads = [os.getloadavg()[0]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    os.environ.update(env)
    for i in range(max(runs[k] for k in cmds)):
        for name, cmd in cmds.items():
            if i >= runs[name]:
                continue
            shutil.rmtree(outs[name], ignore_errors=True)
            results[name].append(timed(cmd))
            loads.append(os.getloadavg()[0])
            print(f"{name} run {i + 1}: {results[name][-1]}", file=sys.stderr)

    check = None
    if "loratool" in outs:
        validate = ["validate", str(outs["loratool"]), "--base", str(base), "--fail-on", "warning"]
        check = subprocess.run(
            [sys.executable, "-m", "lora_tools", *validate], capture_output=True, text=True
        )
    rows = errors(base, ft, outs, sampled_modules(s, args.sample), args.rank)

    print(
        f"\n{args.size}-shaped bf16 pair, {size_gb:.2f} GB per checkpoint "
        f"({len(list(base.glob('*.safetensors')))} shards), rank {args.rank}; "
        f"loratool: median of {args.runs} runs; mergekit: {args.mergekit_runs} run(s); "
        f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"1-min load average during the runs {min(loads):.2f}..{max(loads):.2f}; "
        f"page cache {'warm' if warm else 'cold (pair larger than half the RAM)'}"
        + (f"; both tools on layers 0..{args.layers - 1} only" if args.layers else "")
        + "\n"
    )
    walls = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    print(
        "| tool | wall (s) | runs (s) | CPU (s) | peak RSS (MB) | output (MB) | mergekit / this |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, res in results.items():
        each = ", ".join(f"{r[0]:.1f}" for r in res)
        cpu = statistics.median(r[2] for r in res)
        rss = max(r[1] for r in res)
        ratio = f"{walls['mergekit'] / walls[name]:.1f}x" if "mergekit" in walls else "-"
        size, _ = stored(outs[name])
        print(
            f"| {name} | {walls[name]:.1f} | {each} | {cpu:.1f} | {rss:.0f} | {size:.1f} | "
            f"{ratio} |"
        )
    print()
    for name in outs:
        print(f"- {name} stores besides LoRA factors: {', '.join(stored(outs[name])[1]) or '-'}")
    if check is not None:
        print(
            f"- `loratool validate OUT --base BASE --fail-on warning`: exit {check.returncode}"
            + (f" ({(check.stdout + check.stderr).strip()[-300:]})" if check.returncode else "")
        )
    print()
    head = " | ".join(f"{n} error | {n} / optimum - 1" for n in outs)
    print(f"| module | shape | optimum rank-{args.rank} error | {head} |")
    print("|---|---|---:|" + "---:|---:|" * len(outs))
    for row in rows:
        cells = " | ".join(
            f"{row[n]:.6f} | {row[n] / row['optimum'] - 1:+.1e}"
            + ("" if row[n + " rank"] == args.rank else f" (rank {row[n + ' rank']})")
            for n in outs
        )
        shape = "x".join(map(str, row["shape"]))
        print(f"| {row['module']} | {shape} | {row['optimum']:.6f} | {cells} |")
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
