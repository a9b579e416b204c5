"""ktcli bench on the embedded default: formats parse, sweeps cover every combination, failures stay in their row."""
import csv
import io
import json
import os
import pytest

from conftest import profile


def bench(cli, *args):
    return cli("bench", "-r", "2", "--warmup", "0", *args)


def test_markdown_default(cli):
    r = bench(cli, "-p", "16", "-n", "4")
    assert r.exit_code == 0, r
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| model | profile | size | params | backend | placement | graphs | threads | test | t/s |")
    rows = [l for l in lines if l.startswith("| demo-v1")]
    assert [row.split("|")[9].strip() for row in rows] == ["pp16", "tg4"]
    assert all("±" in row for row in rows)
    assert "roofline (demo-v1" in r.stdout and "| ms/token | CPU experts ms |" in r.stdout


def test_sweep_runs_every_combination_and_json_parses(cli, tmp_path):
    out = tmp_path / "r.json"
    r = bench(cli, "-p", "8,16", "-n", "2,4", "--graph-mode", "off", profile("demo.yaml"), "--output-file", str(out), "-o", "json")
    assert r.exit_code == 0, r
    d = json.loads(out.read_text())
    assert sorted(x["test"] for x in d["results"]) == ["pp16", "pp8", "tg2", "tg4"]
    for x in d["results"]:
        assert len(x["samples"]) == 2 and x["tps_mean"] > 0 and x["error"] is None
    assert {"cpu", "cores", "torch", "transformers", "git_commit"} <= set(d["machine"])
    tg = next(x for x in d["results"] if x["test"] == "tg4")
    assert tg["roofline"]["best_tps"] > 0 and 0 < tg["roofline_ratio"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]   # atomic write left nothing behind


def test_failing_combination_is_reported_in_its_row(cli, tmp_path):
    """On a CPU machine graphs cannot run: those rows carry the error, graphs-off rows still run."""
    r = bench(cli, "-p", "8", "-n", "2", "--use-cuda-graph", "0,1", "-o", "jsonl")
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(rows) == 4
    ok = [x for x in rows if x["graphs"] == "off"]
    bad = [x for x in rows if x["graphs"] == "full"]
    assert all(x["error"] is None and x["tps_mean"] > 0 for x in ok)
    assert all("graph_mode full needs the model on a GPU" in x["error"] for x in bad)
    assert r.exit_code == 0


def test_csv_and_several_profiles(cli, tmp_path):
    r = bench(cli, "-p", "8", "-n", "0", profile("demo.yaml"), profile("demo.yaml"), "-o", "csv")
    assert r.exit_code == 0, r
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 2 and all(float(x["tps_mean"]) > 0 for x in rows)
    assert len(rows[0]["samples"].split(";")) == 2


def test_num_layers_is_said_in_output(cli):
    r = bench(cli, "-p", "8", "-n", "0", "--num-layers", "2")
    assert r.exit_code == 0 and "demo-v1 (2/4 layers)" in r.stdout
    assert "note: demo-v1: only 2 of 4 layers (--num-layers)" in r.stdout


def test_bad_flags(cli):
    for args, msg in ((["-p", "abc"], "Error: -p takes comma-separated integers, got 'abc'"),
                      (["-o", "xml"], "Error: -o must be one of md, csv, json, jsonl, got 'xml'"),
                      (["--graph-mode", "fast"], "Error: --graph-mode values must be full, piecewise, off, got 'fast'"),
                      (["--baseline", "llama"], "Error: --baseline values must be hf-accelerate, hf-gpu, got 'llama'"),
                      (["-p", "0", "-n", "0"], "Error: nothing to run: -p 0 and -n 0"),
                      (["--model", "demo", "--model-config", "qwen2-57b-a14b"], "Error: --model and --model-config name the model twice")):
        r = cli("bench", *args)
        assert r.exit_code == 2 and msg in r.output, (args, r)


def test_all_rows_failing_exits_1(cli):
    r = bench(cli, "-p", "8", "-n", "0", "--graph-mode", "full")
    assert r.exit_code == 1 and "error: graph_mode full needs the model on a GPU" in r.stdout


def test_baseline_without_gpu_is_an_error_row(cli):
    r = bench(cli, "-p", "8", "-n", "0", "--baseline", "hf-gpu", "-o", "json")
    d = json.loads(r.stdout)
    assert [x["backend"] for x in d["results"]] == ["ktcli", "hf-gpu"]
    assert d["results"][1]["error"] == "baseline hf-gpu needs a GPU"


def test_synthetic_full_size_config_few_layers(cli):
    """--model-config with the real Qwen3-30B-A3B shapes, 1 layer, synthetic weights, on the CPU."""
    r = bench(cli, "--model-config", "qwen3-30b-a3b", "--num-layers", "1", "--device", "cpu", "-p", "4", "-n", "2",
              "--max-seq-len", "64", "-o", "json")
    assert r.exit_code == 0, r
    d = json.loads(r.stdout)
    assert d["results"][0]["weights"] == "synthetic" and d["results"][0]["num_layers_full"] == 48


def test_bandwidth_is_measured_in_the_run_unless_a_cache_is_asked_for(cli, tmp_path):
    """Each run measures its ceilings; --cached-bw reuses the last run's readings, labelled with when they were
    taken."""
    runs = []
    for extra in ([], ["--cached-bw"]):
        r = cli("bench", "-p", "0", "-n", "3", "-r", "1", "--warmup", "1", *extra, "-o", "json")
        assert r.exit_code == 0, r
        runs.append(json.loads(r.stdout))
    first, second = (d["bandwidth"] for d in runs)
    assert first["source"] == "measured in this run" and second["source"] == "cache of an earlier run"
    assert second["measured_at"] == first["measured_at"] and second["cpu"]["readings"] == first["cpu"]["readings"]
    assert len(runs[0]["results"][0]["samples"]) == 1


def test_roofline_ratio_is_the_measured_rate_over_the_ceilings_roofline(cli):
    """best t/s = 1 / Σ bytes ÷ ceiling; the ceiling is the largest reading or faster rate reached; ratio ≤ 100%."""
    r = bench(cli, "-p", "0", "-n", "4", "-r", "3", "-o", "json")
    assert r.exit_code == 0, r
    d = json.loads(r.stdout)
    cpu = d["bandwidth"]["cpu"]
    every = [x for v in cpu["readings"].values() for x in v] + [x["bytes_per_s"] for x in cpu["raised_by"]]
    assert cpu["value"] == max(every) and sum(len(v) for v in cpu["readings"].values()) >= 5
    (tg,) = d["results"]
    roof = tg["roofline"]
    assert roof["bandwidth"]["cpu"] == cpu["value"]
    assert abs(roof["best_tps"] - 1 / sum(b / cpu["value"] for b in roof["bytes_per_token"].values())) < 1e-9 * roof["best_tps"]
    assert abs(tg["roofline_ratio"] - tg["tps_mean"] / roof["best_tps"]) < 1e-12
    assert 0 < tg["roofline_ratio"] <= 1
    assert all(n / rep["s"] <= roof["best_tps"] for n, rep in zip([4] * 3, tg["reps"]))


def test_a_cpu_only_prefill_row_has_its_roofline_too(cli):
    """No layer streams (CPU only): the pp row's roofline comes from the CPU's probed rates, once per model, and is
    said under the table; its ratio is the measured rate over it."""
    r = bench(cli, "-p", "32,64", "-n", "0", "-r", "2", "-o", "json")
    assert r.exit_code == 0, r
    rows = json.loads(r.stdout)["results"]
    for pp in rows:
        pre = pp["prefill_roofline"]
        assert pre["rates"]["cpu_GBps"] > 0 and pre["rates"]["cpu_TFLOPs"] > 0 and pre["rates"]["pcie_GBps"] == 0
        assert pre["layer_chunks"]["cpu"] > 0 and pre["layer_chunks"]["stream"] == 0
        assert abs(pp["roofline_ratio"] - pp["tps_mean"] / pre["best_tps"]) < 1e-12 and 0 < pp["roofline_ratio"] < 1
    assert rows[0]["prefill_roofline"]["rates"] == rows[1]["prefill_roofline"]["rates"]   # probed once
    md = bench(cli, "-p", "32", "-n", "0", "-r", "1")
    assert "prefill roofline (pp32, chunks of" in md.stdout and "→ best" in md.stdout


def test_ceiling_is_raised_to_a_faster_rate_the_run_reached():
    from ktcli.engine.bandwidth import Ceiling
    c = Ceiling({"torch-sum": [5e9, 7e9], "stream": [6e9]})
    assert c.value == 7e9
    c.offer("slower call", 6.5e9)
    assert c.value == 7e9 and not c.raised_by
    c.offer("kernel call", 9e9)
    assert c.value == 9e9 and c.raised_by == [{"source": "kernel call", "bytes_per_s": 9e9}]


def test_every_baseline_run_is_shown_and_ratios_name_theirs():
    from ktcli.report.bench import add_baseline_ratios, finish, md
    rows = [{"model": "m", "backend": "ktcli", "test": "tg8", "samples": [20.0, 20.0]},
            {"model": "m", "backend": "hf-gpu", "test": "tg2", "samples": [10.0]},
            {"model": "m", "backend": "hf-gpu", "test": "tg2", "samples": [8.0]},
            {"model": "m", "backend": "hf-accelerate", "test": "tg2", "samples": [0.5]}]
    rows = [finish(r) for r in rows]
    add_baseline_ratios(rows)
    assert [r.get("label") for r in rows] == [None, "hf-gpu#1", "hf-gpu#2", "hf-accelerate"]
    assert rows[0]["vs_baseline"] == {"hf-gpu#1": 2.0, "hf-gpu#2": 2.5, "hf-accelerate": 40.0}
    text = md(rows, {})
    assert "| × hf-accelerate | × hf-gpu#1 | × hf-gpu#2 |" in text and "| hf-gpu#2 |" in text
    assert "| 40.00 | 2.00 | 2.50 |" in text


def test_baseline_runs_once_per_model(cli):
    r = bench(cli, "-p", "8", "-n", "0", profile("demo.yaml"), profile("demo.yaml"), "--baseline", "hf-gpu", "-o", "json")
    d = json.loads(r.stdout)
    assert sorted(x["backend"] for x in d["results"]) == ["hf-gpu", "ktcli", "ktcli"]


def test_roofline_counts_quantized_experts_at_their_stored_size(cli, tmp_path):
    """int4 CPU experts: the roofline counts the packed bytes (scales included), not the checkpoint's."""
    text = open(profile("demo.yaml")).read()
    rows = {}
    for fmt in ("bf16", "int4"):
        p = tmp_path / f"{fmt}.yaml"
        p.write_text(text.replace("prefill_op: cpu, generate_op: cpu}", f"prefill_op: cpu, generate_op: cpu, weight_format: {fmt}, group_size: 16}}"))
        out = tmp_path / f"{fmt}.json"
        r = bench(cli, "-p", "0", "-n", "2", str(p), "--output-file", str(out), "-o", "json")
        assert r.exit_code == 0, r
        rows[fmt] = json.loads(out.read_text())["results"][0]
    from ktcli.model.demo import demo_config
    c = demo_config(512)
    per_token = 2 * c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size   # 2 CPU layers' params
    cpu = {f: x["roofline"]["bytes_per_token"]["cpu"] for f, x in rows.items()}
    # fp32 weights (the demo's dtype) → 0.5 B + one fp32 scale per 16 weights
    assert rows["int4"]["tps_mean"] > 0 and cpu["bf16"] - cpu["int4"] == per_token * (4 - (0.5 + 4 / 16))


def test_breakdown_separates_the_kernel_from_the_fixed_cost_per_layer(cli, tmp_path):
    """int8 CPU experts (layers 2-3) run the C kernel: per repetition 2 layer calls per decoded token; the kernel's
    time is part of the CPU-expert time, and what is left over per layer call is the fixed cost."""
    from ktcli.ops import kernels
    if kernels.get() is None:
        import pytest
        pytest.skip("kernel did not build")
    p = tmp_path / "int8.yaml"
    p.write_text(open(profile("demo.yaml")).read().replace("prefill_op: cpu, generate_op: cpu}",
                                                           "prefill_op: cpu, generate_op: cpu, weight_format: int8}"))
    r = bench(cli, "-p", "0", "-n", "8", str(p), "-o", "json")
    assert r.exit_code == 0, r
    tg = json.loads(r.stdout)["results"][0]
    assert all(rep["cpu_layer_calls"] == 2 * 8 for rep in tg["reps"])
    b = tg["breakdown"]
    assert 0 < b["kernel_ms"] <= b["cpu_experts_ms"] <= b["ms_per_token"]
    sums = {k: sum(rep[k] for rep in tg["reps"]) for k in ("cpu_experts_s", "kernel_s", "cpu_layer_calls")}
    want = (sums["cpu_experts_s"] - sums["kernel_s"]) / sums["cpu_layer_calls"] * 1e6
    assert abs(b["fixed_us_per_layer"] - want) < 1e-6 * max(want, 1)


def test_breakdown_table_shows_the_kernel_and_the_graph_steps_cost_per_layer():
    """A full-graph row (as the GPU machine writes it): kernel µs and fixed µs per CPU layer, and the measured cost
    of an empty graph step with its kind, in the breakdown table."""
    from ktcli.report.bench import finish, md
    b = {"ms_per_token": 46.07, "cpu_experts_ms": 32.78, "kernel_ms": 32.74, "kernel_us_per_layer": 682.1,
         "fixed_us_per_layer": 16.5, "step_us": 15.6, "cpu_step_kind": "flags", "gpu_wait_ms": 0.0, "other_ms": 13.3}
    row = finish({"model": "m", "backend": "ktcli", "graphs": "full", "test": "tg128", "samples": [21.7],
                  "breakdown": b})
    text = md([row], {})
    assert "| kernel µs / CPU layer | fixed µs / CPU layer | of which graph step µs |" in text
    assert "| 32.740 | 682.1 | 16.5 | 15.6 (flags) |" in text


def test_prefill_line_shows_uploads_splits_and_the_calibration():
    """A streamed pp row (as the GPU machine writes it): the prefill roofline line with the run's uploads, its split
    layers and the split's measured ÷ probed CPU time per chunk-length bucket."""
    from ktcli.report.bench import finish, md
    rates = {"pcie_GBps": 55.0, "cpu_GBps": 130.0, "cpu_TFLOPs": 1.2, "gpu_TFLOPs": 700.0}
    row = finish({"model": "m", "backend": "ktcli", "graphs": "full", "test": "pp512", "samples": [278.0],
                  "prefill_roofline": {"best_tps": 353.0, "chunk": 4096, "rates": rates,
                                       "layer_chunks": {"split": 26, "gpu": 2, "stream": 0}},
                  "prefill_phases": {"upload_bytes": 86.6e9, "upload_s": 1.642, "stall_s": 0.87, "layers_streamed": 26,
                                     "layers_cpu": 0, "layers_split": 13, "split_cpu_s": 0.594,
                                     "cpu_scale": {"512": 1.29}}})
    text = md([row], {})
    assert "prefill roofline (pp512, chunks of 4096): layer-chunks split 26, gpu 2 at PCIe 55.0 GB/s" in text
    assert "uploads 86.6 GB in 1.642 s, GPU stalled on uploads 0.870 s" in text
    assert "/ split 13 (CPU share 0.594 s); split CPU time ÷ probed: T 512-1023: 1.29×" in text
    row["prefill_phases"]["split_kernel_s"] = 0.412   # since the experts' own time is recorded apart
    assert "/ split 13 (CPU share 0.594 s, of it the experts 0.412 s);" in md([row], {})
    row["prefill_phases"].update(split_gather_s=0.05, split_post_s=0.012, split_wait_s=0.3)   # every phase, since
    assert ("/ split 13 (CPU share 0.594 s, of it gather 0.050 s, the experts 0.412 s, copy back 0.012 s; CPU waited "
            "for its inputs 0.300 s);") in md([row], {})
    row["prefill_phases"]["cpu_alone_scale"] = {"512": 0.97}
    assert "T 512-1023: 1.29×; CPU layers' time ÷ probed: T 512-1023: 0.97×" in md([row], {})
    row["prefill_phases"].update(moe_s=1.25, run_s=1.84)   # the CPU thread inside MoE layers, of the run's time
    assert "T 512-1023: 0.97×; the CPU thread spent 1.250 s of 1.840 s in MoE layers" in md([row], {})


class _SettlingEngine:
    """An engine whose one `auto` layer changes its plan after each of its first `changes` prefills, and whose
    streamer times chunks for its policy (trialing) until `trials` prefills have run."""

    def __init__(self, changes: int, trials: int = 0):
        import types
        import torch
        self.prefills, self.changes = 0, changes
        op = types.SimpleNamespace(choice=lambda T: {"way": "split", "n_cpu": min(self.prefills, self.changes)})
        layer = types.SimpleNamespace(ops={"prefill": op})
        st = types.SimpleNamespace(layers=[layer], take_stats=lambda: {}, trialing=lambda T: self.prefills < trials,
                                   trial_report=lambda: {})
        self.built = types.SimpleNamespace(streamer=st)
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=50))
        self.device, self.chunk = torch.device("cpu"), 512

    def prepare(self):
        pass

    def reset(self):
        pass

    def prefill(self, ids):
        self.prefills += 1


@pytest.mark.parametrize("changes,trials,settle", [(0, 0, 0), (1, 0, 1), (2, 0, 2), (9, 0, 4), (0, 4, 3), (1, 9, 4)])
def test_a_pp_row_warms_up_until_its_auto_plans_settle(changes, trials, settle, monkeypatch):
    """An `auto` plan learns from each prefill: the row warms up again while the last warm-up changed a plan or
    `auto` still times its chunk policies, up to SETTLE_MAX more prefills, and then times its repetitions; the
    progress bar counts warm-up + reps."""
    from ktcli.engine.bench import SETTLE_MAX, run_test
    monkeypatch.setattr("ktcli.engine.roofline.prefill_roofline", lambda *a: {})
    eng, ticks = _SettlingEngine(changes, trials), []
    r = run_test(eng, "pp", 64, reps=2, warmup=1, tick=lambda: ticks.append(1))
    assert SETTLE_MAX == 4 and r["settle_prefills"] == settle
    assert eng.prefills == 1 + settle + 2 and len(r["samples"]) == 2 and len(ticks) == 3
    assert "settle_prefills" not in run_test(_SettlingEngine(2), "pp", 64, reps=1, warmup=0)   # asked for none
