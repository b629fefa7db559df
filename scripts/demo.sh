#!/usr/bin/env bash
# The main job on the shipped fixtures. Usage: scripts/demo.sh [path/to/loratool]
set -euo pipefail
LT=${1:-loratool}
cd "$(dirname "$0")/.."
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$LT" inspect fixtures/peft/llama-lora
step "$LT" inspect fixtures/kohya/sd-locon.safetensors
step "$LT" inspect fixtures/peft/llama-patterns --stats
