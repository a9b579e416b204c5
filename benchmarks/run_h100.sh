#!/usr/bin/env bash
# The device run behind benchmarks/results/*-h100-*.json (H100 machine, 16-core Xeon, 125 GB RAM).
# Usage (from the repo root on the GPU machine): bash benchmarks/run_h100.sh parity|bench57|bench30 OUTDIR
set -euo pipefail
what=$1; out=$2
export KTCLI_CACHE=/tmp/ktcli-cache PYTHONUNBUFFERED=1
case $what in
  parity)   # graph replay == eager, token for token: seed placement full size, and 256 tokens on 8 layers
    python3 benchmarks/graph_parity.py profiles/qwen2-57b-a14b-gpu01-graphs.yaml --tokens 64 --out $out/parity-qwen2-57b.json
    python3 benchmarks/graph_parity.py profiles/qwen2-57b-a14b-gpu01-graphs.yaml profiles/qwen2-57b-a14b-cpu-experts.yaml \
        profiles/qwen3-30b-a3b-gpu-half.yaml --tokens 256 --num-layers 8 --out $out/parity-256.json ;;
  bench30)
    python3 -m ktcli bench profiles/qwen3-30b-a3b-cpu-experts.yaml profiles/qwen3-30b-a3b-gpu-half.yaml \
        -p 128 -n 32 -r 3 --graph-mode off,piecewise,full --baseline hf-accelerate,hf-gpu --baseline-n-gen 4 \
        -o json --output-file $out/bench-qwen3-30b-a3b.json ;;
  bench57)
    python3 -m ktcli bench profiles/qwen2-57b-a14b-gpu01-graphs.yaml profiles/qwen2-57b-a14b-cpu-experts.yaml \
        -p 64 -n 16 -r 3 --graph-mode off,piecewise,full --baseline hf-accelerate --baseline-n-gen 2 \
        -o json --output-file $out/bench-qwen2-57b-a14b.json ;;
esac
