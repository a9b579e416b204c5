#!/usr/bin/env bash
# The device runs behind benchmarks/results/*-h100-*.json (H100 machine, 16-core Xeon, 125 GB RAM).
# Usage (from the repo root on the GPU machine): bash benchmarks/run_h100.sh STAGE OUTDIR (stages below)
set -euo pipefail
what=$1; out=$2
export KTCLI_CACHE=/tmp/ktcli-cache PYTHONUNBUFFERED=1
case $what in
  kernel)   # CPU expert kernel vs stock torch, Qwen2-57B expert shape (dynamic / guided chunks), compute ceiling,
            # fixed cost per call, and Qwen3-30B-A3B's smaller experts
    python3 -m pytest -q tests/test_kernels.py 2>&1 | tail -3 || true
    (lscpu; grep -H . /sys/kernel/mm/transparent_hugepage/enabled) > $out/machine.txt
    (gcc -O3 -march=native -fopenmp benchmarks/dot_micro.c -o /tmp/dot_micro -lm && /tmp/dot_micro) | tee $out/dot-micro.txt || true
    python3 benchmarks/cpu_experts.py --resident --threads 16 --reps 30 --batches 1,2,4,16 --stock-max-t 0 \
        --out $out/cpu-experts-resident.json
    python3 benchmarks/cpu_experts.py --resident --resident-mb 0.1 --threads 16 --reps 30 --batches 1,4 \
        --stock-max-t 0 --out $out/cpu-experts-overhead.json
    python3 benchmarks/cpu_experts.py --layers 3 --threads 16 --reps 10 --batches 1,4,16 \
        --formats bf16 --out $out/cpu-experts-bf16.json
    python3 benchmarks/cpu_experts.py --layers 4 --threads 16 --reps 10 --batches 1,4,16 \
        --formats int8,int4 --stock-max-t 1 --out $out/cpu-experts-quant.json
    python3 benchmarks/cpu_experts.py --hidden 2048 --inter 768 --experts 128 --topk 8 --layers 16 --threads 16 \
        --reps 10 --batches 1,4,16 --stock-max-t 0 --out $out/cpu-experts-qwen3-shape.json ;;
  int4)     # session 4: where each call's time goes, cost per row (dot_micro at 4x longer rows), fixed cost
            # per call (the zero-start A/B of results/*s4c* also built -DZERO_FROM=1, removed since: see git 531a96d)
    python3 -m pytest -q tests/test_kernels.py 2>&1 | tail -3 || true
    for n in "" "-DN=14336 -DROWS=24"; do
        gcc -O3 -march=native -fopenmp $n benchmarks/dot_micro.c -o /tmp/dot_micro -lm && echo "dot_micro $n" && /tmp/dot_micro
    done | tee $out/dot-micro-rows.txt || true
    python3 benchmarks/cpu_experts.py --resident --resident-mb 0.1 --threads 16 --reps 30 --batches 1,4 \
        --formats int4 --stock-max-t 0 --phases --out $out/cpu-experts-overhead.json
    python3 benchmarks/cpu_experts.py --layers 4 --threads 16 --reps 10 --rounds 7 --batches 1,4,16 \
        --formats int4,int8 --phases --stock-max-t 0 --out $out/cpu-experts-quant.json ;;
  proof)    # issue 7's table: every format, batches 1-16, paired references, stock torch at batch 1
    python3 benchmarks/cpu_experts.py --layers 4 --threads 16 --reps 10 --rounds 7 --batches 1,2,4,8,16 \
        --formats bf16,int8,int4 --stock-max-t 1 --out $out/cpu-experts-proof.json ;;
  parity)   # graph replay == eager, token for token, full-size seed placement and Qwen3-30B-A3B hybrid
    python3 benchmarks/graph_parity.py profiles/qwen3-30b-a3b-gpu-half.yaml profiles/qwen3-30b-a3b-cpu-experts.yaml \
        --tokens 64 --out $out/parity-qwen3-30b.json
    python3 benchmarks/graph_parity.py profiles/qwen2-57b-a14b-gpu01-graphs.yaml --tokens 64 --out $out/parity-qwen2-57b.json ;;
  parity256)
    python3 benchmarks/graph_parity.py profiles/qwen2-57b-a14b-gpu01-graphs.yaml profiles/qwen2-57b-a14b-cpu-experts.yaml \
        profiles/qwen3-30b-a3b-gpu-half.yaml --tokens 256 --num-layers 8 --out $out/parity-256.json ;;
  bench30)
    python3 -m ktcli bench profiles/qwen3-30b-a3b-cpu-experts.yaml profiles/qwen3-30b-a3b-gpu-half.yaml \
        -p 128 -n 32 -r 2 --graph-mode off,piecewise,full --baseline hf-gpu,hf-accelerate --baseline-n-gen 2 \
        -o json --output-file $out/bench-qwen3-30b-a3b.json ;;
  bench57)
    python3 -m ktcli bench profiles/qwen2-57b-a14b-gpu01-graphs.yaml \
        -p 64 -n 16 -r 3 --graph-mode off,piecewise,full --baseline hf-accelerate --baseline-n-gen 2 \
        -o json --output-file $out/bench-qwen2-57b-a14b.json ;;
  bench57cpu)   # Qwen2-57B-A14B with every layer's experts on the CPU
    python3 -m ktcli bench profiles/qwen2-57b-a14b-cpu-experts.yaml -p 64 -n 16 -r 2 --graph-mode off,piecewise,full \
        -o json --output-file $out/bench-qwen2-57b-a14b-cpu-experts.json ;;
  formats)  # decode with every layer's experts on the CPU as bf16 / int8 / int4 (16 of Qwen3-30B-A3B's 48 layers)
    python3 -m ktcli bench profiles/qwen3-30b-a3b-cpu-experts.yaml profiles/qwen3-30b-a3b-cpu-experts-int8.yaml \
        profiles/qwen3-30b-a3b-cpu-experts-int4.yaml -p 0 -n 32 -r 2 --graph-mode full --num-layers 16 \
        -o json --output-file $out/decode-formats-qwen3-30b-16layers.json ;;
  decode)   # decode-only sweep of the graph modes, both architectures (after the single CPU worker thread)
    python3 -m ktcli bench profiles/qwen2-57b-a14b-gpu01-graphs.yaml -p 0 -n 32 -r 3 --graph-mode off,piecewise,full \
        -o json --output-file $out/decode-qwen2-57b-a14b.json
    python3 -m ktcli bench profiles/qwen3-30b-a3b-cpu-experts.yaml profiles/qwen3-30b-a3b-gpu-half.yaml -p 0 -n 64 -r 3 \
        --graph-mode off,piecewise,full -o json --output-file $out/decode-qwen3-30b-a3b.json ;;
esac
