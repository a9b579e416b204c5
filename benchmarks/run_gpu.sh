#!/usr/bin/env bash
# The GPU-machine runs behind benchmarks/results/ (one H200 + 16-core Xeon with AMX here; any CUDA host works).
# Usage, from the repo root on that machine: KTCLI_GIT_COMMIT=<sha> bash benchmarks/run_gpu.sh STAGE OUTDIR
# (KTCLI_GIT_COMMIT: the commit the tree was sent from; a copied tree's .git may be stale).
set -euo pipefail
what=$1; out=$2
export KTCLI_CACHE=/tmp/ktcli-cache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # scripts import ktcli
case $what in
  tests)    # GPU tests (graphs, operators, kernel paths), each test named in the log
    python3 -m pytest -v -p no:cacheprovider tests/test_graphs.py tests/test_team.py tests/test_stream_gpu.py tests/test_ops.py \
        tests/test_compile_gpu.py tests/test_multigpu_gpu.py \
        tests/test_kernels.py tests/test_kernel_model.py tests/test_benchmark_scripts.py 2>&1 | tee $out/gpu-tests.log | tail -3 ;;
  kernel)   # CPU expert kernel per format and batch, Qwen2-57B and Qwen3-30B expert shapes, against the ceiling
            # (~30 s a row on the H200 host: 18 rows, about 9 minutes; cut runs keep their ceiling)
    python3 benchmarks/cpu_experts.py --layers 4 --threads 16 --reps 10 --rounds 3 --batches 1,4,16 \
        --formats bf16,int8,int4 --stock-max-t 1 --out $out/cpu-experts-qwen2-57b-shape.json
    python3 benchmarks/cpu_experts.py --hidden 2048 --inter 768 --experts 128 --topk 8 --layers 16 --threads 16 \
        --reps 10 --rounds 3 --batches 1,4,16 --stock-max-t 0 --out $out/cpu-experts-qwen3-30b-shape.json ;;
  amx)      # #14: AMX tiles for long bf16 chunks. The kernel tests (hardware tiles against the reference), the kernel
            # at T=1 and T=512 with AMX off and on beside torch's GEMMs (Qwen3-30B and Qwen2-57B expert shapes), then
            # Qwen3-30B bf16 prefill `auto` against streaming with AMX on, and again with KTCLI_CPU_AMX=0
    python3 -c "from ktcli.ops import kernels; print('caps', kernels.caps())"
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee $out/gpu-tests-kernels.log | tail -3
    python3 benchmarks/cpu_experts.py --hidden 2048 --inter 768 --experts 128 --topk 8 --layers 3 --threads 16 \
        --reps 4 --rounds 2 --batches 1,512 --formats bf16,int8 --amx 0,1 --stock-max-t 512 --out $out/cpu-experts-amx-qwen3-30b-shape.json
    python3 benchmarks/cpu_experts.py --layers 2 --threads 16 --reps 3 --rounds 2 --batches 512 --formats bf16 --amx 0,1 \
        --stock-max-t 512 --out $out/cpu-experts-amx-qwen2-57b-shape.json
    MODEL=qwen3 PP=${PP:-512,2048} bash $0 prefill-ab $out
    mv $out/prefill-ab-qwen3-30b-a3b-cpu-experts.json $out/prefill-ab-amx-qwen3-30b-a3b-bf16.json
    KTCLI_CPU_AMX=0 MODEL=qwen3 PP=${PP:-512,2048} bash $0 prefill-ab $out
    mv $out/prefill-ab-qwen3-30b-a3b-cpu-experts.json $out/prefill-ab-noamx-qwen3-30b-a3b-bf16.json ;;
  int4amx)  # #14: int4 experts through AMX tiles (nibbles unpacked to bytes, amx.h): the kernel tests on hardware tiles,
            # the kernel at T=512 with AMX off and on beside int8 (Qwen3-30B expert shape), then Qwen3-30B int4 prefill
            # `auto` against streaming and the CPU alone
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k amx 2>&1 | tee $out/gpu-tests-int4amx.log | tail -3
    python3 benchmarks/cpu_experts.py --hidden 2048 --inter 768 --experts 128 --topk 8 --layers 3 --threads 16 \
        --reps 4 --rounds 2 --batches 512 --formats int4,int8 --amx 0,1 --stock-max-t 0 --phases \
        --out $out/cpu-experts-amx-int4-qwen3-30b-shape.json
    FORMAT=int4 MODEL=qwen3 PP=${PP:-512,2048} bash $0 prefill-ab $out ;;
  contention)  # #14: why the split's CPU share runs slower than the kernel alone: one Qwen3-30B layer's CPU share (all
            # experts, and the 26% `auto` gave pp512) alone, beside host→GPU copies, beside a busy process, team of
            # 16 or 15, weights registered or not; then the tiles' prefetch distance
    python3 benchmarks/contention.py --format ${FORMAT:-bf16} --share 1,0.26 --threads ${THREADS:-16,15} \
        --prefetch=${PREFETCH:--1} --register ${REGISTER:-0,1} --load ${LOADS:-none,copy,spin,copy+spin} \
        --out $out/contention-qwen3-30b-shape-${FORMAT:-bf16}.json
    python3 benchmarks/cpu_experts.py --hidden 2048 --inter 768 --experts 128 --topk 8 --layers 3 --threads 16 \
        --reps 4 --rounds 2 --batches 512 --formats bf16,int8 --amx 1 --prefetch 2048,4096,8192 --stock-max-t 0 \
        --phases --out $out/cpu-experts-amx-prefetch-qwen3-30b-shape.json ;;
  passive)  # #14: the tiles' row prefetch per pattern and task size (the kernel alone), then OpenMP's wait policy and
            # the new pattern A/B'd on one host: `auto` and the CPU alone at pp512 (Qwen3-30B bf16) with torch's
            # OpenMP threads spinning (ACTIVE) and asleep (PASSIVE, ktcli's default), then PASSIVE with amx_pf 1
    python3 benchmarks/cpu_experts.py --hidden 2048 --inter 768 --experts 128 --topk 8 --layers 3 --threads 16 \
        --reps 4 --rounds 2 --batches 512 --formats bf16,int8 --amx 1 --amx-pf 0,1 --chunk ${CHUNKS:-256,1024} \
        --stock-max-t 0 --out $out/cpu-experts-amx-pf-qwen3-30b-shape.json
    p=profiles/qwen3-30b-a3b-cpu-experts.yaml c=/tmp/qwen3-30b-a3b-cpu-experts-cpu.yaml
    sed -e 's/prefill_device: auto,/prefill_device: cpu,/' -e 's/^\( *\)prefill_device: "auto"/\1prefill_device: "cpu"/' $p > $c
    for w in ACTIVE PASSIVE; do
      OMP_WAIT_POLICY=$w python3 -m ktcli bench $p $c -p ${PP:-512} -n 0 -r 2 -o json \
          --output-file $out/prefill-omp-$(echo $w | tr A-Z a-z)-qwen3-30b-a3b-bf16.json
    done
    KTCLI_CPU_AMX_PF=1 python3 -m ktcli bench $p $c -p ${PP:-512} -n 0 -r 2 -o json \
        --output-file $out/prefill-amx-pf1-qwen3-30b-a3b-bf16.json ;;
  fresh)    # the same decode in three fresh processes (the spread between processes; DESIGN.md's lazily populated
            # memory): Qwen3-30B-A3B hybrid and all-CPU int4, 16 layers, full graph, with the per-layer breakdown
    for i in 1 2 3; do
      python3 -m ktcli bench profiles/qwen3-30b-a3b-gpu-half.yaml profiles/qwen3-30b-a3b-cpu-experts-int4.yaml \
          -p 0 -n 64 -r 3 --graph-mode full --num-layers 16 -o json --output-file $out/decode-fresh-$i.json
    done ;;
  decode)   # #15: tg128 with full graphs, every target placement; MODELS=qwen3 or qwen2 (Qwen2's int8 quantizes 26
            # layers at load: ~140 s)
    case ${MODELS:-qwen3} in
      qwen3) python3 -m ktcli bench profiles/qwen3-30b-a3b-cpu-experts.yaml profiles/qwen3-30b-a3b-gpu-half.yaml \
          profiles/qwen3-30b-a3b-cpu-experts-int4.yaml profiles/qwen3-30b-a3b-cpu-experts-int8.yaml \
          -p 0 -n 128 -r 3 --graph-mode full -o json --output-file $out/decode-qwen3-30b-a3b.json ;;
      qwen2) python3 -m ktcli bench profiles/qwen2-57b-a14b-gpu01-graphs.yaml profiles/qwen2-57b-a14b-gpu01-graphs-int8.yaml \
          -p 0 -n 128 -r 3 --graph-mode full -o json --output-file $out/decode-qwen2-57b-a14b.json ;;
    esac ;;
  parity)   # graph replay == eager, token for token, full-size placements
    python3 benchmarks/graph_parity.py profiles/qwen3-30b-a3b-gpu-half.yaml profiles/qwen3-30b-a3b-cpu-experts.yaml \
        --tokens 64 --out $out/parity-qwen3-30b.json
    python3 benchmarks/graph_parity.py profiles/qwen2-57b-a14b-gpu01-graphs.yaml --tokens 64 --out $out/parity-qwen2-57b.json ;;
  baselines)  # ktcli against plain transformers on the GPU and with accelerate's CPU offload
    python3 -m ktcli bench profiles/qwen3-30b-a3b-cpu-experts.yaml profiles/qwen3-30b-a3b-gpu-half.yaml \
        -p 128 -n 32 -r 2 --graph-mode off,piecewise,full --baseline hf-gpu,hf-accelerate --baseline-n-gen 2 \
        -o json --output-file $out/bench-qwen3-30b-a3b-baselines.json ;;
  serve)    # #18's proof: the server's decode t/s for one long completion against bench's tg, same profile, in one
            # process on one engine, rounds interleaved (fresh processes differ by more than the 5% asked)
    python3 benchmarks/serve_vs_bench.py profiles/qwen3-30b-a3b-gpu-half.yaml --demo-tokenizer --tokens 128 \
        --interleaved 6 --out $out/serve-vs-bench-qwen3-30b-a3b-interleaved.json ;;
  plan)     # #17's proof: predicted vs measured tg128 per GPU budget, and the shipped profiles that fit the budget.
            # Full models take minutes each: split the work with MODELS=… BUDGETS=… (one call per model and budget)
    python3 benchmarks/plan_check.py --models ${MODELS:-qwen3-30b-a3b} --budgets ${BUDGETS:-24} -n 128 -r 3 \
        --out $out/plan-check-${MODELS:-qwen3-30b-a3b}-$(echo ${BUDGETS:-24} | tr , -).json ;;
  prefill)  # #14: pp512 / pp2048 (/ pp8192) with `auto` prefill (stream or CPU per chunk), full models; FORMATS=bf16
            # by default (int8/int4 quantize 48 layers at load: minutes each)
    for f in ${FORMATS:-bf16}; do
      q3=profiles/qwen3-30b-a3b-cpu-experts.yaml; [ $f = bf16 ] || q3=profiles/qwen3-30b-a3b-cpu-experts-$f.yaml
      python3 -m ktcli bench $q3 -p ${PP:-512,2048} -n 0 -r 2 -o json --output-file $out/prefill-qwen3-30b-a3b-$f.json
      q2=profiles/qwen2-57b-a14b-gpu01-graphs.yaml; [ $f = bf16 ] || q2=profiles/qwen2-57b-a14b-gpu01-graphs-$f.yaml
      [ -f $q2 ] && python3 -m ktcli bench $q2 -p ${PP:-512,2048} -n 0 -r 2 \
          -o json --output-file $out/prefill-qwen2-57b-a14b-$f.json
    done ;;
  prefill-ab)  # #14: `auto` prefill against streaming every layer (a copy of the profile with prefill_op stream)
            # and against the CPU alone (prefill_device cpu), in one process; MODEL=qwen3 or qwen2, FORMAT=bf16|int8|int4
    case ${MODEL:-qwen3} in
      qwen3) p=profiles/qwen3-30b-a3b-cpu-experts.yaml ;;
      qwen2) p=profiles/qwen2-57b-a14b-gpu01-graphs.yaml ;;
    esac
    f=${FORMAT:-bf16}; [ $f = bf16 ] || p=${p%.yaml}-$f.yaml
    s=/tmp/$(basename $p .yaml)-stream.yaml
    sed -e 's/prefill_device: auto,/prefill_device: cuda, prefill_op: stream,/' \
        -e 's/^\( *\)prefill_device: "auto"/\1prefill_device: "cuda"\n\1prefill_op: "stream"/' $p > $s
    c=/tmp/$(basename $p .yaml)-cpu.yaml
    sed -e 's/prefill_device: auto,/prefill_device: cpu,/' -e 's/^\( *\)prefill_device: "auto"/\1prefill_device: "cpu"/' $p > $c
    python3 -m ktcli bench $p $s $c -p ${PP:-512,2048} -n 0 -r 2 -o json \
        --output-file $out/prefill-ab-$(basename $p .yaml).json ;;
  prefill-timeline)  # #14: where a prefill chunk's GPU time goes (benchmarks/prefill_timeline.py): Qwen3-30B int4, the
            # synthetic routers at pp2048 (every layer routed) and uniform routing at pp512; FORMAT=bf16|int8|int4
    f=${FORMAT:-int4}; p=profiles/qwen3-30b-a3b-cpu-experts.yaml; [ $f = bf16 ] || p=${p%.yaml}-$f.yaml
    python3 benchmarks/prefill_timeline.py $p --tokens 2048 --routing model --out $out/prefill-timeline-$f-pp2048.json
    python3 benchmarks/prefill_timeline.py $p --tokens 512 --routing uniform \
        --out $out/prefill-timeline-$f-pp512-uniform.json ;;
  prefill-join)  # #14: the range split with its CPU share joined by a flag (ops/joined.py) under uniform routing:
            # `auto` as shipped, then with the range split weighed (KTCLI_PREFILL_WAYS=routed,split), then the same with
            # the host waiting for the CPU share (KTCLI_SPLIT_JOIN=host); one process each; FORMAT=int4|int8|bf16
    f=${FORMAT:-int4}; p=profiles/qwen3-30b-a3b-cpu-experts.yaml; [ $f = bf16 ] || p=${p%.yaml}-$f.yaml
    for v in default flag host; do
      case $v in default) e=() ;; flag) e=(KTCLI_PREFILL_WAYS=routed,split) ;;
                  host) e=(KTCLI_PREFILL_WAYS=routed,split KTCLI_SPLIT_JOIN=host) ;; esac
      env "${e[@]}" python3 -m ktcli bench $p -p ${PP:-512,2048} -n 0 -r 2 --routing uniform -o json \
          --output-file $out/prefill-join-$v-$f.json
    done ;;
  compile)  # #15: runtime.compile off against on, tg128 full graphs: the GPU tests first, then per Qwen3-30B placement one
            # engine with a compiled and an eager graph, rounds interleaved (compile_ab.py; fresh processes differ more)
    python3 -m pytest -v -p no:cacheprovider tests/test_compile_gpu.py tests/test_compile.py 2>&1 | tee $out/gpu-tests-compile.log | tail -3
    for p in ${PROFILES:-profiles/qwen3-30b-a3b-cpu-experts.yaml profiles/qwen3-30b-a3b-cpu-experts-int4.yaml \
             profiles/qwen3-30b-a3b-gpu-half.yaml}; do
      python3 benchmarks/compile_ab.py $p --tokens ${TOKENS:-128} --rounds ${ROUNDS:-6} \
          --out $out/decode-compile-ab-$(basename $p .yaml).json
    done ;;
  fused)    # #15: runtime.compile's fused q/k/v GEMM and unsorted top-k (model/fused.py) off against on: the GPU's
            # share of a replay per layer (decode_timeline, 16 layers, fresh process each), then tg128 with them on
    python3 -m pytest -v -p no:cacheprovider tests/test_compile_gpu.py tests/test_fused.py 2>&1 | tee $out/gpu-tests-fused.log | tail -3
    for f in 0 1; do
      KTCLI_FUSED=$f python3 benchmarks/decode_timeline.py profiles/qwen3-30b-a3b-cpu-experts.yaml --num-layers 16 \
          --out $out/decode-timeline-fused$f.json
    done
    python3 -m ktcli bench ${PROFILES:-profiles/qwen3-30b-a3b-cpu-experts.yaml profiles/qwen3-30b-a3b-cpu-experts-int4.yaml} \
        -p 0 -n 128 -r 3 --graph-mode full -o json --output-file $out/decode-qwen3-30b-a3b-fused.json ;;
  multigpu) # #19's proof on a machine with two GPUs: the two-GPU tests, then decode tg128 with layers split over two GPUs
            # against the same CPU experts on one GPU, in one process (same machine, same run)
    python3 -m pytest -v -p no:cacheprovider tests/test_multigpu_gpu.py 2>&1 | tee $out/gpu-tests-multigpu.log | tail -3
    python3 -m ktcli bench profiles/qwen3-30b-a3b-cpu-experts.yaml profiles/qwen3-30b-a3b-2gpu-cpu-experts.yaml \
        -p 512 -n 128 -r 3 --graph-mode full -o json --output-file $out/multigpu-qwen3-30b-a3b.json
    python3 -m ktcli bench profiles/qwen2-57b-a14b-gpu01-graphs.yaml profiles/qwen2-57b-a14b-2gpu-graphs.yaml \
        -p 512 -n 128 -r 3 --graph-mode full -o json --output-file $out/multigpu-qwen2-57b-a14b.json
    python3 benchmarks/graph_parity.py profiles/qwen3-30b-a3b-2gpu-cpu-experts.yaml --tokens 64 \
        --out $out/parity-multigpu-qwen3-30b.json ;;
  *) echo "stages: tests amx contention passive kernel decode fresh prefill prefill-ab serve plan parity baselines compile fused multigpu"; exit 2 ;;
esac
