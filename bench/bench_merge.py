"""Benchmark ``loratool merge`` against ``cp -r`` and transformers + PEFT merge_and_unload.

Usage (from the repository root; prints a markdown table for docs/benchmarks.md):

    .venv/bin/python bench/bench_merge.py                 # 1.6 GB Llama-shaped base, 3 runs
    .venv/bin/python bench/bench_merge.py --size 8b       # 16 GB 8B-shaped base (no PEFT run)
    .venv/bin/python bench/bench_merge.py --devices cpu,cuda --runs 5
    .venv/bin/python bench/bench_merge.py --runs 7 --prefault-gb 6   # see "prefault" below

Everything is generated under bench/_work/ (gitignored): a bf16 checkpoint with random weights
written by the streaming writer, sharded like HF (~5 GB shards for 8b, 512 MiB for 1b), and a
rank-16 all-linear PEFT adapter (fp32). Each contender runs as a child process; wall time is
measured around it; peak RSS and CPU time (user + system) are the child's, from ``os.wait4``.
The page cache holds the base for every contender (read once before timing starts), ``sync``
runs before each timed run so that no run pays for the previous one's writeback, and the
contenders take turns within each round. ``loratool merge`` leaves its output in the page
cache, as ``cp -r`` does; ``loratool merge --fsync`` puts it on the disk before returning,
as ``cp -r && sync`` does.

prefault: on a VM whose host backs guest memory lazily (and takes free memory back), the first
write into a page the host has not backed costs a fault on the host. ``cp -r`` of 1.6 GB then
takes anywhere from 0.45 to 4 s. ``--prefault-gb N`` touches N GiB in a throw-away process just
before each timed run, so that every contender finds backed free memory: the numbers then
measure the tools, not the host.

After the timed runs, the PEFT output and loratool's output are compared tensor by tensor
(elements that differ, and by how many bf16 ulps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import timed

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
SHAPES = {
    "1b": dict(hidden=2048, layers=16, inter=5632, vocab=32000, heads=32, kv=4),
    "8b": dict(hidden=4096, layers=32, inter=14336, vocab=128256, heads=32, kv=8),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Shard size of the generated base, like HF's default for each size.
MAX_SHARD_BYTES = {"1b": 1 << 29, "8b": 5 * 10**9}


def llama_tensors(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v, hd = s["hidden"], s["inter"], s["vocab"], s["hidden"] // s["heads"]
    kv = s["kv"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]
    return [*out, ("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def random_bf16_bytes(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random bf16 values of magnitude ~0.01 (sign, exponent 2^-7, random mantissa), fast."""
    bits = rng.integers(0, 1 << 16, size=count, dtype=np.uint16)
    return (bits & np.uint16(0x807F)) | np.uint16(0x3C00)


def make_base(folder: Path, s: dict, max_shard_bytes: int) -> None:
    from lora_tools.io.safetensors import SafetensorsWriter, TensorSpec

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in llama_tensors(s):
        nbytes = int(np.prod(shape)) * 2
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for n, tensors in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        specs = [TensorSpec(name, "BF16", shape) for name, shape in tensors]
        with SafetensorsWriter(folder / fname, specs, {"format": "pt"}, keep_order=True) as w:
            for spec in specs:
                count = int(np.prod(spec.shape))
                for start in range(0, count, 1 << 26):
                    w.write(
                        spec.name, memoryview(random_bf16_bytes(rng, min(1 << 26, count - start)))
                    )
                weight_map[spec.name] = fname
                total += count * 2
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def make_adapter(folder: Path, s: dict, rank: int = 16) -> None:
    from lora_tools.io.safetensors import save_tensors

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    tensors = {}
    for name, shape in llama_tensors(s):
        if not any(name.endswith(f"{t}.weight") for t in TARGETS):
            continue
        stem = "base_model.model." + name.removesuffix(".weight")
        tensors[stem + ".lora_A.weight"] = (rng.standard_normal((rank, shape[1])) * 0.01).astype(
            np.float32
        )
        tensors[stem + ".lora_B.weight"] = (rng.standard_normal((shape[0], rank)) * 0.01).astype(
            np.float32
        )
    save_tensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": TARGETS,
        "base_model_name_or_path": str(folder.parent / "base"),
        "lora_dropout": 0.0,
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
torch.set_num_threads({threads})
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload()
m.save_pretrained(sys.argv[3], max_shard_size="{shard}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SHAPES, default="1b")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--devices", default="cpu", help="comma list of loratool --device values")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--peft-runs", type=int, default=1, help="PEFT runs (slow; default 1)")
    ap.add_argument("--keep", action="store_true", help="keep bench/_work/<size> afterwards")
    ap.add_argument(
        "--prefault-gb", type=float, default=0, help="GiB to touch before each run (see above)"
    )
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    s = SHAPES[args.size]
    work = WORK / args.size
    base, adapter, out = work / "base", work / "adapter", work / "out"
    if args.generate_only:
        shutil.rmtree(work, ignore_errors=True)
        make_base(base, s, MAX_SHARD_BYTES[args.size])
        make_adapter(adapter, s)
        return
    if not base.exists():
        # in a child process: the parent stays small, so the children it forks report their
        # own peak RSS, not the generator's
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--size", args.size, "--generate-only"], check=True
        )
        print(f"generated {args.size} base in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    size_gb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    subprocess.run(["cat", *map(str, base.glob("*.safetensors"))], stdout=subprocess.DEVNULL)

    py = sys.executable
    sys.path.insert(0, str(ROOT))
    outs = {"cp -r": work / "out-cp", "cp -r && sync": work / "out-cp-sync"}
    contenders = {
        "cp -r": ["cp", "-r", str(base), str(outs["cp -r"])],
        # what loratool does too: the data on disk (it fsyncs each file before the rename)
        "cp -r && sync": ["sh", "-c", f"cp -r '{base}' '{outs['cp -r && sync']}' && sync"],
    }
    for dev in args.devices.split(","):
        for extra in ([], ["--fsync"]):
            name = " ".join(["loratool merge --device", dev, *extra])
            outs[name] = work / f"out-{dev}{'-fsync' if extra else ''}"
            contenders[name] = [
                py,
                "-m",
                "lora_tools",
                "merge",
                str(base),
                str(adapter),
                "-o",
                str(outs[name]),
                "--device",
                dev,
                "--quiet",
                *extra,
            ]
    peft_name = "transformers + PEFT merge_and_unload"
    if not args.no_peft and args.size == "1b":
        outs[peft_name] = work / "out-peft"
        script = PEFT_SCRIPT.format(threads=os.cpu_count(), shard="2GB")
        contenders[peft_name] = [py, "-c", script, str(base), str(adapter), str(outs[peft_name])]
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in contenders}
    loads = [os.getloadavg()[0]]
    for i in range(args.runs):
        for name, cmd in contenders.items():
            if name == peft_name and i >= args.peft_runs:
                continue
            shutil.rmtree(outs[name], ignore_errors=True)
            results[name].append(timed(cmd, args.prefault_gb))
            loads.append(os.getloadavg()[0])
            if name.startswith("cp"):
                shutil.rmtree(outs[name], ignore_errors=True)  # 16 GB twice does not fit

    cp = statistics.median(r[0] for r in results["cp -r"])
    peft = results.get(peft_name)
    peft_wall = statistics.median(r[0] for r in peft) if peft else None
    print(
        f"\n{args.size}-shaped bf16 checkpoint, {size_gb:.2f} GB in "
        f"{len(list(base.glob('*.safetensors')))} shards, rank-16 all-linear adapter; "
        f"median of {args.runs} runs (PEFT: {min(args.runs, args.peft_runs)}); "
        f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"1-min load average during the runs {min(loads):.2f}..{max(loads):.2f}; "
        f"prefault {args.prefault_gb:g} GiB\n"
    )
    cp_sync = statistics.median(r[0] for r in results["cp -r && sync"])
    print(
        "| command | wall (s) | runs (s) | CPU (s) | x cp | x (cp && sync) | PEFT / this "
        "| peak RSS (MB) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        rss = max(r[1] for r in runs)
        cpu = statistics.median(r[2] for r in runs)
        vs_peft = f"{peft_wall / wall:.1f}" if peft_wall else "-"
        each = ", ".join(f"{r[0]:.2f}" for r in runs)
        print(
            f"| {name} | {wall:.2f} | {each} | {cpu:.2f} | {wall / cp:.2f} | "
            f"{wall / cp_sync:.2f} | {vs_peft} | {rss:.0f} |"
        )
    for name in outs:
        if peft and name.startswith("loratool"):
            print()
            print(compare_outputs(outs[name], outs[peft_name], name))
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _ordered(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns as integers in value order (adjacent floats differ by 1)."""
    i = bits.astype(np.int64)
    return np.where(i & 0x8000, -(i & 0x7FFF), i)


def compare_outputs(ours: Path, peft: Path, label: str) -> str:
    """Elements of each tensor that differ from PEFT's output, and by how many bf16 ulps."""
    from lora_tools.io.safetensors import SafetensorsFile

    def files(folder: Path) -> dict[str, Path]:
        found = {}
        for path in folder.glob("*.safetensors"):
            with SafetensorsFile(path) as f:
                found.update({k: path for k in f})
        return found

    mine, theirs = files(ours), files(peft)
    total = differ = changed_tensors = 0
    worst = 0
    for key, path in mine.items():
        with SafetensorsFile(path) as a, SafetensorsFile(theirs[key]) as b:
            x = a.read(key).view(np.uint16)
            y = b.read(key).view(np.uint16)
        d = np.abs(_ordered(x) - _ordered(y))
        n = int(np.count_nonzero(d))
        total += x.size
        differ += n
        changed_tensors += n > 0
        worst = max(worst, int(d.max(initial=0)))
    return (
        f"{label} vs PEFT: {differ} of {total} elements differ ({differ / total:.2e}), "
        f"in {changed_tensors} of {len(mine)} tensors; largest difference {worst} bf16 ulp"
    )


if __name__ == "__main__":
    main()
