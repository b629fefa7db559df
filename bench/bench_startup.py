"""Start-up of every command (``--help`` and a header-only run) beside ``import click``.

Run: .venv/bin/python bench/bench_startup.py [--runs N] [--before TREE]
(prints a markdown table for docs/benchmarks.md).

Each row is the median of N fresh processes, run from the repository root on the shipped
fixtures: wall time, and CPU time (user + system, from ``getrusage``), which a busy machine
inflates far less than wall time. ``--before TREE`` times the same rows on another checkout
(e.g. ``git worktree add /tmp/before HEAD~1``), alternating run by run with this one so that
both see the same load. Each row's imports are probed once for ml_dtypes, torch and gguf.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from _common import machine

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
COMMANDS = ["inspect", "validate", "rescale", "resize", "combine", "convert", "merge", "push"]
HEADER_ONLY = [
    ["inspect", "fixtures/peft/llama-lora"],
    ["inspect", "fixtures/kohya/sd-lora.safetensors", "--json"],
    ["validate", "--ignore", "LT2", "fixtures/peft/llama-lora"],
    ["validate", "--ignore", "LT2", "fixtures/peft/llama-lora", "--base", "fixtures/bases/tiny-llama"],
    ["push", "fixtures/peft/llama-lora", "me/llama-lora", "--dry-run", "--no-validate"],
]  # fmt: skip
REFERENCES = [
    ("`python -c pass`", "pass"),
    ('`python -c "import click"` (reference)', "import click"),
    ('`python -c "import numpy"`', "import numpy"),
    ('`python -c "import ml_dtypes"`', "import ml_dtypes"),
]
PROBE = (
    "import runpy, sys\n"
    "sys.argv = ['loratool', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('lora_tools', run_name='__main__')\n"
    "except SystemExit:\n"
    "    pass\n"
    "sys.stderr.write(', '.join(m for m in ('ml_dtypes', 'torch', 'gguf') if m in sys.modules) or 'none')\n"
)


def once(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``cmd`` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} (in {cwd}) exited {proc.returncode}:\n{proc.stderr}")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def timed(cmd: list[str], trees: list[Path], runs: int) -> list[tuple[float, float]]:
    """Median (wall, CPU) per tree, the trees' runs alternating."""
    for tree in trees:
        once(cmd, tree)  # warm the page cache and the bytecode cache
    samples: list[list[tuple[float, float]]] = [[] for _ in trees]
    for _ in range(runs):
        for i, tree in enumerate(trees):
            samples[i].append(once(cmd, tree))
    return [
        (statistics.median(w for w, _ in s), statistics.median(c for _, c in s)) for s in samples
    ]


def heavy_imports(args: list[str], tree: Path) -> str:
    proc = subprocess.run([PY, "-c", PROBE, *args], cwd=tree, capture_output=True, text=True)
    return proc.stderr.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--before", type=Path, help="another checkout to time alongside")
    opts = parser.parse_args()
    trees = [ROOT] + ([opts.before.resolve()] if opts.before else [])
    load = os.getloadavg()[0]

    rows: list[tuple[str, list[tuple[float, float]], list[str]]] = []
    for label, code in REFERENCES:
        rows.append((label, timed([PY, "-c", code], trees[:1], opts.runs), ["-"]))
    for args in [["--help"]] + [[c, "--help"] for c in COMMANDS] + HEADER_ONLY:
        cmd = [PY, "-m", "lora_tools", *args]
        heavy = [heavy_imports(args, tree) for tree in trees]
        rows.append((f"`loratool {' '.join(args)}`", timed(cmd, trees, opts.runs), heavy))

    _, click_cpu = rows[1][1][0]
    print(
        f"Machine: {machine()}, ml_dtypes {metadata.version('ml_dtypes')}, "
        f"click {metadata.version('click')}; 1-minute load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; median of {opts.runs} fresh processes per row "
        "(after one warm-up run), from the repository root; `loratool` is "
        "`python -m lora_tools`.\n"
    )
    head = "| command | wall (ms) | CPU (ms) | CPU vs `import click` | imports ml_dtypes / torch |"
    rule = "|---|---:|---:|---:|---|"
    if opts.before:
        head += " before: wall (ms) | before: CPU (ms) | before: imports |"
        rule += "---:|---:|---|"
    print(head)
    print(rule)
    for label, results, heavy in rows:
        wall, cpu = results[0]
        line = f"| {label} | {wall * 1e3:.0f} | {cpu * 1e3:.0f} | {cpu / click_cpu:.1f}x | {heavy[0]} |"
        if opts.before:
            if len(results) > 1:
                line += f" {results[1][0] * 1e3:.0f} | {results[1][1] * 1e3:.0f} | {heavy[1]} |"
            else:
                line += " - | - | - |"
        print(line)


if __name__ == "__main__":
    main()
