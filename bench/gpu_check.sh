#!/usr/bin/env bash
# Every GPU check issues 15 and 17 ask for, as one prepared run (device time is short: one run,
# time kept for one rerun). Writes its numbers and logs to $OUT (default bench/_work/gpu).
#
#   bash bench/gpu_check.sh                   # on the GPU machine
#   DEVICE=torch-cpu LIMIT_SCALE=4 bash bench/gpu_check.sh
#       # rehearsal without a GPU: the same steps, torch's engine on the CPU (the GPU-only
#       # tests skip), with longer time limits
#
# Steps, each under its own time limit so that the whole stays inside one 10-minute call:
#   1. the machine: nvidia-smi, torch's version and what it sees;
#   2. `pytest -m gpu`: the CUDA merge engine's bytes against numpy's (every fixture, bf16
#      blocks) and extract's torch path against numpy's (ranks, methods, errors, bound);
#   3. bench_merge.py --devices cpu,$DEVICE on the 1.6 GB Llama-shaped checkpoint beside `cp -r`
#      (3 runs), with nvidia-smi sampling GPU memory every 100 ms in the background;
#   4. bench_extract.py on the 1.67 GB pair, --device cpu then --device $DEVICE (one run each),
#      errors against the exact optimum on 3 sampled modules.
# loratool's dependencies must be importable by $PY there (the device README: carry wheels and
# put them on PYTHONPATH first); nothing here downloads.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench/_work/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

LIMIT_SCALE=${LIMIT_SCALE:-1}  # the rehearsal on a 2-core machine needs longer limits (4)

step() {  # step NAME SECONDS COMMAND...: run it, log to $OUT/NAME.log, record its exit code
    local name=$1 limit=$(($2 * LIMIT_SCALE))
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$name rc=$? $((SECONDS - start)) s" >>"$OUT/steps.txt"
}

: >"$OUT/steps.txt"
step machine 60 sh -c "nvidia-smi || true; $PY -c 'import torch; print(torch.__version__, \
torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count() and \
torch.cuda.get_device_name(0))'"
step pytest-gpu 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/ops/test_merge.py \
    tests/ops/test_extract.py
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv -lms 100 >"$OUT/gpu-memory.csv" &
    SAMPLER=$!
fi
step merge-1b 240 "$PY" bench/bench_merge.py --devices "cpu,$DEVICE" --runs 3 --no-peft
if [ -n "${SAMPLER:-}" ]; then kill "$SAMPLER" 2>/dev/null; fi
step extract-1b-cpu 150 "$PY" bench/bench_extract.py --size 1b --no-mergekit --runs 1 \
    --sample 3 --keep --extra "--device cpu"
step extract-1b-"$DEVICE" 150 "$PY" bench/bench_extract.py --size 1b --no-mergekit --runs 1 \
    --sample 3 --extra "--device $DEVICE"
cat "$OUT/steps.txt"
