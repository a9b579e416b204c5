"""The suite catches wrong code: each deliberately broken copy of ktcli below must turn its tests red.

A mutant is (file, exact text, replacement, tests that must fail). The package is copied to a temporary folder,
the one change applied, and the named tests run against the copy in a fresh interpreter.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MUTANTS = {
    "sampler ignores temperature": ("ktcli/engine/sampling.py", "logits = logits.float() / temperature",
                                    "logits = logits.float()", "tests/test_sampling.py"),
    "sampler is argmax": ("ktcli/engine/sampling.py", "if temperature <= 0:", "if True:", "tests/test_sampling.py"),
    "top-p ignored": ("ktcli/engine/sampling.py", "if top_p < 1.0:", "if False:", "tests/test_sampling.py"),
    "int8 quantizer truncates": ("ktcli/ops/quant.py", "torch.round(w / s[..., None])", "torch.trunc(w / s[..., None])",
                                 "tests/test_kernel_model.py::test_quantizers_round_to_the_nearest_step"),
    "int4 quantizer truncates": ("ktcli/ops/quant.py", "torch.round(g / s[..., None])", "torch.trunc(g / s[..., None])",
                                 "tests/test_kernel_model.py::test_quantizers_round_to_the_nearest_step"),
    "roofline ratio off by 3x": ("ktcli/report/bench.py", 'rec["tps_mean"] / roof["best_tps"]',
                                 '3 * rec["tps_mean"] / roof["best_tps"]',
                                 "tests/test_bench.py::test_roofline_ratio_is_the_measured_rate_over_the_ceilings_roofline"),
    "ceiling never raised": ("ktcli/engine/bandwidth.py", "if rate > self.value:", "if False:",
                             "tests/test_bench.py::test_ceiling_is_raised_to_a_faster_rate_the_run_reached"),
    "stop strings ignored": ("ktcli/engine/generate.py", "if any(s in text for s in cfg.stop):", "if False:",
                             "tests/test_engine.py::test_stops"),
    "one baseline run kept": ("ktcli/report/bench.py", "for i, r in enumerate(rows, 1):", "for i, r in enumerate(rows[-1:], 1):",
                              "tests/test_bench.py::test_every_baseline_run_is_shown_and_ratios_name_theirs"),
    "kernel reads past the experts": ("ktcli/ops/csrc/moe_cpu.c", "if (idx[p] < 0 || idx[p] >= E) return -1;",
                                      "if (idx[p] < 0 || idx[p] >= 4096) return -1;",
                                      "tests/test_kernels.py::test_kernel_groups_pairs_by_expert_and_rejects_ids_it_cannot_index"),
    "kernel drops the routing weight": ("ktcli/ops/csrc/moe_cpu.c", "float wk = L->io ? bf16f(wb[t * K + kk]) : wf[t * K + kk];",
                                        "float wk = 1.0f;", "tests/test_kernel_model.py::test_kernel_in_the_model_matches_transformers"),
}


def run_on_copy(tmp_path, tests, change=None):
    """pytest `tests` against a copy of ktcli/ and tests/ with `change` = (file, old, new) applied."""
    copy = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "ktcli"), copy / "ktcli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "tests"), copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    if change:
        path, old, new = change
        text = (copy / path).read_text()
        assert text.count(old) == 1, f"the mutant's anchor moved: {old!r} in {path}"
        (copy / path).write_text(text.replace(old, new))
    env = {**os.environ, "PYTHONPATH": str(copy), "KTCLI_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", tests],
                          cwd=copy, env=env, capture_output=True, text=True, timeout=600)


def test_an_unchanged_copy_passes(tmp_path):
    """The control: the harness itself turns nothing red."""
    r = run_on_copy(tmp_path, "tests/test_sampling.py")
    assert r.returncode == 0, r.stdout[-2000:]


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_turns_its_tests_red(tmp_path, name):
    path, old, new, tests = MUTANTS[name]
    if path.endswith(".c"):
        from ktcli.ops import kernels
        if kernels.get() is None:
            pytest.skip(f"the kernel does not build here: {kernels.error()}")
    r = run_on_copy(tmp_path, tests, (path, old, new))
    assert r.returncode == 1, f"{name}: the tests stayed green\n{r.stdout[-2000:]}"
