#!/usr/bin/env bash
# The main job on the shipped fixtures. Usage: scripts/demo.sh [path/to/loratool]
# Outputs go to a temporary folder that is removed at the end; fixtures/ is never modified.
set -euo pipefail
LT=${1:-loratool}
cd "$(dirname "$0")/.."
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
step() { printf '\n\033[1m$ loratool %s\033[0m\n' "$*"; "$LT" "$@"; }
# validate exits 1 on findings: show that without stopping the demo
expect_findings() {
  printf '\n\033[1m$ loratool %s\033[0m\n' "$*"
  if "$LT" "$@"; then echo "(expected findings, got none)"; exit 1; fi
  echo "(exit code 1: findings, as expected)"
}

step inspect fixtures/peft/llama-patterns
step inspect fixtures/kohya/sd-locon.safetensors
step inspect fixtures/peft/llama-all-linear --stats

step validate fixtures/peft/llama-lora fixtures/kohya/sd-lora.safetensors fixtures/diffusers/sd-lora
step validate fixtures/kohya/sd-lora.safetensors --base fixtures/bases/tiny-sd
expect_findings validate fixtures/broken/truncated.safetensors fixtures/broken/nan-weights \
  fixtures/broken/rank-mismatch
expect_findings validate fixtures/broken/wrong-base --base fixtures/bases/tiny-llama

step resize fixtures/peft/llama-all-linear --energy 0.9 --min-rank 2 -o "$OUT/resized"
step rescale fixtures/kohya/sd-lora.safetensors --normalize -o "$OUT/normalized.safetensors"
step combine fixtures/peft/llama-lora fixtures/peft/llama-patterns --weights 1,-0.5 \
  --method svd --rank 4 -o "$OUT/combined"
step convert fixtures/kohya/sd-lora.safetensors --to diffusers --base fixtures/bases/tiny-sd \
  -o "$OUT/sd-lora-diffusers"

step merge fixtures/bases/tiny-llama-sharded fixtures/peft/llama-lora -o "$OUT/merged" --quiet
ls "$OUT/merged"
step merge fixtures/bases/tiny-sd fixtures/kohya/sd-locon.safetensors -o "$OUT/merged-sd" --quiet
step push "$OUT/resized" demo-user/llama-lora-resized --dry-run
