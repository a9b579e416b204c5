"""The benchmark scripts run end to end on tiny shapes: cpu_experts.py (both modes, its JSON rows, their
references, the per-phase timestamps), quant_accuracy.py (the kernel's integer path), contention.py (its
factors, CPU loads only here)."""
import json
import os
import subprocess
import sys

import pytest

from ktcli.ops import kernels

ROOT = os.path.join(os.path.dirname(__file__), "..")


def cpu_experts(tmp_path, *args):
    """benchmarks/cpu_experts.py on a tiny shape (2 threads, 1 round of 2 reps); its JSON."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "cpu_experts.py"), "--hidden", "256", "--inter", "128",
           "--threads", "2", "--reps", "2", "--rounds", "1", *args, "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.read_text())


@pytest.mark.skipif(kernels.get() is None, reason="kernel did not build")
@pytest.mark.parametrize("mode", [["--formats", "int4", "--experts", "8", "--topk", "2", "--layers", "1"],
                                  ["--formats", "bf16", "--resident", "--resident-mb", "0.2", "--stock-max-t", "0"]])
def test_cpu_experts_benchmark_writes_its_rows(tmp_path, mode):
    r = cpu_experts(tmp_path, "--batches", "1", *mode)
    (row,) = r["rows"]
    assert r["read_bw"] > 0 and r["probes"] and row["resident"] == ("--resident" in mode)
    assert row["kernel_ratio"] > 0 and row["kernel_ratio_paired"] > 0 and row["rel_err_vs_dequant_fp32"] < 3e-2
    assert set(kernels.KNOBS) <= set(row)
    # the ceiling is the largest of every reading and every rate reached: no ratio above 100%
    every = [x for v in r["probes"].values() for x in v] + r["paired_readings"] + [row["kernel_GBps"] * 1e9]
    assert r["ceiling"]["value"] == r["read_bw"] == max(every + [row["torch_GBps"] * 1e9 if row["torch_ms"] == row["torch_ms"] else 0])
    assert row["kernel_ratio"] <= 1 and row["kernel_ratio"] == row["kernel_GBps"] * 1e9 / r["read_bw"]


@pytest.mark.skipif(kernels.get() is None, reason="kernel did not build")
def test_cpu_experts_phases_per_schedule(tmp_path):
    rows = cpu_experts(tmp_path, "--batches", "2", "--formats", "int8", "--experts", "8", "--topk", "2", "--layers", "1",
                       "--stock-max-t", "0", "--pipeline", "0,1", "--phases")["rows"]
    assert [r["pipeline"] for r in rows] == [0, 1]
    for r in rows:
        ph = r["phases_us"]
        assert 0 <= ph["fork"] <= ph["team"] <= ph["prep"] <= ph["down_last"] <= ph["end"] <= ph["exit"] <= ph["call"]


@pytest.mark.skipif(kernels.get() is None, reason="kernel did not build")
def test_quant_accuracy_through_the_integer_path(tmp_path):
    out = tmp_path / "a.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "quant_accuracy.py"), "--inter", "128", "--group", "128",
           "--int8-act", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    r = json.loads(out.read_text())
    assert r["int8_activations"] is True
    assert r["results"]["int8"]["kernel_logits_rel_err"] < 0.03 and r["results"]["int4"]["kernel_logits_rel_err"] < 0.1
    assert r["results"]["int8"]["kernel_top1_agreement"] >= 0.9


def test_serve_vs_bench_runs_end_to_end(tmp_path):
    """The #18 proof harness on the demo: the server's decode timing and bench's tg, written with their ratio."""
    out = tmp_path / "s.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "serve_vs_bench.py"), "--tokens", "8",
                    "--reps", "2", "--out", str(out)], check=True, capture_output=True, text=True, cwd=ROOT,
                   env={**os.environ, "KTCLI_BW_PROBE_MIB": "64"})
    r = json.loads(out.read_text())
    assert len(r["serve_tps"]) == 2 and len(r["bench_tps"]) == 4 and r["serve_over_bench"] > 0   # bench before + after


def test_serve_vs_bench_interleaved_in_one_process(tmp_path):
    """--interleaved: one engine behind an in-process server, rounds of a served completion and a bench tg
    repetition alternating; both sides measured every round, the ratio of their medians written."""
    out = tmp_path / "s.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "serve_vs_bench.py"), "--tokens", "8",
                    "--interleaved", "3", "--out", str(out)], check=True, capture_output=True, text=True, cwd=ROOT)
    r = json.loads(out.read_text())
    assert len(r["serve_tps"]) == len(r["bench_tps"]) == 3 and all(t > 0 for t in r["serve_tps"] + r["bench_tps"])
    assert r["serve_over_bench"] == r["serve_median"] / r["bench_median"] > 0


def test_plan_check_runs_end_to_end(tmp_path):
    """The #17 proof harness on the demo (CPU only): a plan per budget, measured, beside the shipped demo profile."""
    out = tmp_path / "p.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "plan_check.py"), "--models", "demo",
                    "--budgets", "1,2", "--targets", "cpu={gib}GiB", "-n", "4", "-r", "1", "--out", str(out)],
                   check=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "KTCLI_BW_PROBE_MIB": "64"})
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert res["rates"][0] == "--cpu-bw" and float(res["rates"][1]) > 0     # this machine's reading, not defaults
    assert [r["budget_gib"] for r in rows] == [1.0, 2.0]
    for r in rows:
        assert r["predicted_tps"] > 0 and r["measured"]["tps_mean"] > 0 and "demo.yaml" in r["shipped"]
    again = tmp_path / "again.json"                  # today's model on the recorded rates: the same code, the same
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "plan_check.py"), "--repredict", str(out),
                    "--targets", "cpu={gib}GiB", "--out", str(again)], check=True, capture_output=True, cwd=ROOT)
    assert [r["predicted_tps_now"] for r in json.loads(again.read_text())["rows"]] == [r["predicted_tps"] for r in rows]


def test_compile_ab_interleaves_both_modes_on_one_engine(tmp_path):
    """compile_ab.py on the demo (graphs off on a CPU): rounds of each mode alternate, medians and ratio written."""
    out = tmp_path / "c.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_ab.py"), "--num-layers", "2",
                    "--tokens", "4", "--rounds", "2", "--graph-mode", "off", "--out", str(out)],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    r = json.loads(out.read_text())
    assert len(r["rounds"]["on"]) == len(r["rounds"]["off"]) == 2
    assert r["compiled_over_eager"] == r["median"]["on"]["tps"] / r["median"]["off"]["tps"] > 0
    assert all(m["rest_ms"] >= 0 for m in r["median"].values())


@pytest.mark.skipif(kernels.get() is None, reason="kernel did not build")
def test_contention_times_every_factor_combination(tmp_path):
    """contention.py: one row per share × threads × prefetch × load (copy loads and registering need a GPU),
    the split's pair count and the kernel's prefetch as set."""
    out = tmp_path / "c.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "contention.py"), "--hidden", "256", "--inter",
                    "128", "--experts", "8", "--topk", "2", "--tokens", "32", "--layers", "1", "--reps", "2",
                    "--threads", "2,1", "--prefetch=-1,8192", "--register", "0", "--load", "none,spin",
                    "--share", "1,0.25", "--out", str(out)], check=True, capture_output=True, text=True, cwd=ROOT)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 2 * 2 and all(r["kernel_ms"] > 0 and r["kernel_GBps"] > 0 for r in rows)
    assert {r["prefetch"] for r in rows} >= {8192} and {r["load"] for r in rows} == {"none", "spin"}
    full, quarter = (next(r for r in rows if r["share"] == s) for s in (1.0, 0.25))
    assert full["n_cpu"] == 8 and full["pairs"] == 32 * 2 and quarter["n_cpu"] == 2 and quarter["pairs"] < 32 * 2


@pytest.mark.skipif(kernels.get() is None, reason="kernel did not build")
def test_contention_routes_unevenly_and_times_the_phases(tmp_path):
    """--routing skewed:H:F: the last H experts take F of the picks, so the CPU's share [0, n) gets the cold ones;
    --phases adds each row's per-member timestamps; a malformed spec is refused by argparse."""
    out = tmp_path / "c.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "contention.py"), "--hidden", "256", "--inter", "128",
           "--experts", "8", "--topk", "2", "--tokens", "64", "--layers", "1", "--reps", "2", "--threads", "1",
           "--register", "0", "--load", "none", "--share", "1,0.5", "--out", str(out)]
    subprocess.run(cmd + ["--routing", "skewed:2:0.9", "--phases"], check=True, capture_output=True, text=True,
                   cwd=ROOT)
    full, half = json.loads(out.read_text())["rows"]
    assert full["pairs"] == 64 * 2 and half["pairs"] < 0.3 * 64 * 2          # uniform would give half
    assert half["phases_us"]["exit"] > 0 and half["experts_touched"] <= half["n_cpu"] == 4
    bad = subprocess.run(cmd + ["--routing", "skewed:x"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "skewed:H:F" in bad.stderr


def test_prefill_timeline_splits_the_compute_streams_idle_time():
    """prefill_timeline.summarize: a gap in the compute stream is 'on copies' where the copy stream is busy
    during it, else 'on the host'; kinds come from kernel names."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from prefill_timeline import summarize
    ev = lambda tid, ts, dur, name: {"tid": tid, "ts": ts, "dur": dur, "name": name}
    g = summarize([ev(7, 0, 10, "sm90_xmma_gemm"), ev(7, 30, 5, "flash_fwd"), ev(7, 60, 10, "triton_dequant"),
                   ev(7, 75, 5, "elementwise"), ev(9, 10, 15, "Memcpy HtoD (Pinned -> Device)")])
    assert g["compute_busy_ms"] == pytest.approx(0.030) and g["window_ms"] == pytest.approx(0.080)
    assert g["compute_idle_on_copies_ms"] == pytest.approx(0.015)     # 10-25 of the 10-30 gap
    assert g["compute_idle_on_host_ms"] == pytest.approx(0.035)       # 25-30, 35-60, 70-75
    assert g["copy_busy_ms"] == pytest.approx(0.015) and g["compute_kernels"] == 4
    assert g["compute_by_kind_ms"] == pytest.approx({"gemm": 0.010, "triton": 0.010, "attention": 0.005, "other": 0.005})
