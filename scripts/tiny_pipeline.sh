#!/usr/bin/env bash
# The whole lab loop from the command line on CPU, with no downloads:
# built-in corpus -> token dataset -> tiny model -> samples -> evaluation -> sweep report.
# About 3 minutes on a 2-core laptop. Outputs go under $CRYSTALLAB_RUNS (default runs/).
#
#   bash scripts/tiny_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
run() { echo "+ crystallab $*" >&2; uv run crystallab "$@"; }

run data corpus --out builtin --n "${CORPUS_N:-5000}"                      # runs/data/builtin
run train configs/tiny_cpu.yaml --run-dir tiny_cpu --no-progress            # runs/train/tiny_cpu
run sample --ckpt train/tiny_cpu/ckpt/best.pt --prompt NaCl --z 4 \
    --n 16 --temperature 0.8 --top-k 10 --seed 1 --max-new-tokens 400 --out tiny_nacl   # runs/samples/tiny_nacl
run sweep configs/sweep_tiny.yaml                                           # runs/sweeps/tiny
cat "${CRYSTALLAB_RUNS:-runs}/sweeps/tiny/summary.md"
