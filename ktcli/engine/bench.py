"""llama-bench-style measurements on an Engine: pp N (prefill N tokens), tg N (decode N tokens)."""
from __future__ import annotations

import time

import torch

from ..ops.clocks import fixed_cost_us, take_all
from ..ops.routed import PHASES as ROUTED_PHASES
from ..ops.split import PHASES
from .generate import GenerationConfig


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_ids(vocab: int, n: int, gen: torch.Generator) -> list:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


SETTLE_MAX = 4   # untimed prefills a pp row adds to its warm-up while an `auto` layer's plan still changes or
                 # its chunk trials run (4 chunks a length: each policy cold, then each timed)


def auto_plans(streamer, T: int) -> tuple:
    """Each `auto` prefill layer's (way, CPU experts) for a chunk of T tokens, as its calibration stands."""
    layers = [m for s in getattr(streamer, "all", [streamer]) for m in s.layers]
    return tuple((p["way"], p["n_cpu"]) for m in layers if hasattr(op := m.ops.get("prefill"), "choice")
                 for p in (op.choice(T),))


def run_test(engine, kind: str, n: int, reps: int, warmup: int, seed: int = 0, tick=None) -> dict:
    """{'samples': [t/s per repetition], 'reps': [{'s', 'cpu_experts_s', 'gpu_wait_s'} per repetition],
    'breakdown': {… ms per token over all repetitions}}; random prompts, EOS ignored. A pp row whose `auto`
    layers' plans changed in its last warm-up prefill (their calibration learns from each prefill: 2026-12-06,
    int4 pp512 split at 1,041 t/s once, then streamed at 1,797), or while `auto` still times its chunk policies
    (Calibration.chunk_policy), warms up again, up to SETTLE_MAX more times;
    'settle_prefills' says how many it took."""
    vocab = engine.model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    engine.prepare()
    samples, timed = [], []
    streamer = engine.built.streamer
    settle = kind == "pp" and warmup > 0 and streamer is not None
    T = min(n, getattr(engine, "chunk", n))
    plans, extra_warm, i = auto_plans(streamer, T) if settle else (), 0, 0
    while i < warmup + extra_warm + reps:
        engine.reset()
        if kind == "pp":
            ids = random_ids(vocab, n, gen)
            _sync(engine.device)
            take_all()
            if streamer is not None:
                streamer.take_stats()
            t0 = time.perf_counter()
            engine.prefill(ids)
            _sync(engine.device)
            dt, clocks = time.perf_counter() - t0, take_all()
            if streamer is not None:
                clocks.update(streamer.take_stats())
        else:
            _, st = engine.generate(random_ids(vocab, 1, gen), GenerationConfig(max_new_tokens=n + 1, ignore_eos=True))
            dt, clocks = st.decode_s, {k: getattr(st, k) for k in take_all()}
        i += 1
        if i > warmup + extra_warm:
            samples.append(n / dt)
            timed.append({"s": dt, **clocks})
        elif settle and i == warmup + extra_warm and plans and extra_warm < SETTLE_MAX:
            if (now := auto_plans(streamer, T)) != plans or streamer.trialing(T):
                plans, extra_warm = now, extra_warm + 1
                continue                        # one more untimed prefill, not counted by the progress bar
        if tick:
            tick()
    sums = {k: sum(r[k] for r in timed) for k in (timed[0] if timed else {})}
    total, cpu, gpu = sums.get("s", 0.0), sums.get("cpu_experts_s", 0.0), sums.get("gpu_wait_s", 0.0)
    per_tok = 1e3 / (n * len(timed)) if timed else 0.0
    extra = {"settle_prefills": extra_warm} if settle and plans else {}
    if kind == "pp" and timed:
        from .roofline import prefill_roofline
        extra["prefill_roofline"] = prefill_roofline(engine.built, n, engine.chunk)
    if kind == "pp" and streamer is not None and timed:
        extra["prefill_phases"] = {k: sums.get(k, 0) / len(timed) for k in
                                   ("upload_s", "stall_s", "upload_bytes", "layers_streamed", "layers_cpu",
                                    "layers_split", "split_cpu_s", *PHASES, "layers_routed", "routed_gpu_experts",
                                    "routed_touched", *ROUTED_PHASES, "moe_s")}
        extra["prefill_phases"]["run_s"] = total / len(timed)   # beside moe_s: the CPU thread's time outside MoE
        if trials := streamer.trial_report():      # auto's timed chunks per length bucket, and what it kept
            extra["prefill_phases"]["chunk_trials"] = trials
        if getattr(streamer, "cpu_scale", None):   # measured ÷ probed CPU time per way and length bucket
            for key, way in (("cpu_scale", "split"), ("cpu_alone_scale", "cpu"), ("routed_scale", "routed")):
                if cal := streamer.calibration(way):
                    extra["prefill_phases"][key] = {str(t): v for t, v in cal.items()}
                    extra["prefill_phases"][key.replace("scale", "fixed_ms")] = {
                        str(t): 1e3 * streamer.fixed(way, t) for t in cal}
    calls = sums.get("cpu_layer_calls", 0)
    bd = {"ms_per_token": total * per_tok, "cpu_experts_ms": cpu * per_tok,
          "kernel_ms": sums.get("kernel_s", 0.0) * per_tok, "fixed_us_per_layer": fixed_cost_us(sums),
          "kernel_us_per_layer": sums.get("kernel_s", 0.0) / calls * 1e6 if calls else None,
          "gpu_wait_ms": gpu * per_tok, "other_ms": max(total - cpu - gpu, 0.0) * per_tok}
    if kind == "tg" and calls and getattr(engine.graph, "mode", None) == "full":
        bd["cpu_step_kind"], bd["step_us"] = _step_us(engine)   # the part of the fixed cost no host clock sees
        if bd["step_us"] is not None and bd["fixed_us_per_layer"] is not None:
            bd["fixed_us_per_layer"] += bd["step_us"]
    return {"samples": samples, "reps": timed, **extra, "breakdown": bd}


def _step_us(engine) -> tuple:
    """(kind, µs) of an empty C step of the graph's kind (ops/steps.step_cost_us) with the CPU experts' thread
    count, measured once per engine."""
    if not hasattr(engine, "_step_us"):
        from ..ops.cpu import expert_threads
        from ..ops.kernels import get
        from ..ops.steps import step_cost_us
        kind = engine.graph.bridge.kind
        engine._step_us = (kind, step_cost_us(kind, expert_threads(engine.built.staging)) if get() is not None
                           else None)
    return engine._step_us
