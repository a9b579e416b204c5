"""benchmarks/cpu_experts.py runs end to end on a tiny shape: both modes, its JSON rows and their references."""
import json
import os
import subprocess
import sys

import pytest

from ktcli.ops import kernels

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.skipif(kernels.get() is None, reason="kernel did not build")
@pytest.mark.parametrize("mode", [["--formats", "int4", "--experts", "8", "--topk", "2", "--layers", "1"],
                                  ["--formats", "bf16", "--resident", "--resident-mb", "0.2", "--stock-max-t", "0"]])
def test_cpu_experts_benchmark_writes_its_rows(tmp_path, mode):
    out = tmp_path / "r.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "cpu_experts.py"), "--hidden", "256", "--inter", "128",
           "--threads", "2", "--reps", "2", "--rounds", "1", "--batches", "1", *mode, "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    r = json.loads(out.read_text())
    (row,) = r["rows"]
    assert r["read_bw"] > 0 and r["probes"] and row["resident"] == ("--resident" in mode)
    assert row["kernel_ratio"] > 0 and row["kernel_ratio_paired"] > 0 and row["rel_err_vs_dequant_fp32"] < 3e-2
    assert set(kernels.KNOBS) <= set(row)
