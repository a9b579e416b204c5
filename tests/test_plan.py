"""ktcli plan / --fit: placements for a machine's memory — monotone in the GPU budget, within every device,
respecting the user's rules, accepted by validate-config unchanged; and the SGLang + kt-kernel export."""
import json
import os
import shlex

import pytest

from ktcli.commands.options import machine_for, profile_from_flags
from ktcli.placement.fit import Rates, fit

ARCHS = ["qwen3-30b-a3b", "qwen2-57b-a14b", "mixtral-8x7b"]


def plan_for(model, gpu_gib, cpu_gib=125, fmt="bf16", profile=None, context=4096):
    machine = machine_for(f"cuda:0={gpu_gib}GiB,cpu={cpu_gib}GiB,cores=16")
    return fit(profile_from_flags(profile, model=model), machine, context=context, fmt=fmt), machine


@pytest.mark.parametrize("model", ARCHS)
def test_more_gpu_memory_never_puts_fewer_experts_on_the_gpu(model):
    counts = []
    for gib in (16, 24, 48, 80, 141):
        f, machine = plan_for(model, gib)
        counts.append(len(f.gpu_layers))
        if f.notes:                                    # the GPU cannot even hold the non-expert weights
            assert counts[-1] == 0 and "no placement fits" in f.notes[0]
            continue
        for dev, budget in f.budget.items():          # never beyond any device
            assert f.memory.total(dev) <= budget, (model, gib, dev)
        assert f.gpu_layers == list(range(len(f.gpu_layers)))                  # filled in layer order
        assert sorted(f.gpu_layers + f.cpu_layers) == list(range(len(f.gpu_layers) + len(f.cpu_layers)))
    assert counts == sorted(counts) and counts[-1] > counts[0], counts


@pytest.mark.parametrize("model,gib", [("qwen3-30b-a3b", 24), ("qwen2-57b-a14b", 48), ("mixtral-8x7b", 80)])
def test_the_written_profile_passes_validate_config_unchanged(cli, tmp_path, model, gib):
    out = tmp_path / "plan.yaml"
    targets = f"--target-devices=cuda:0={gib}GiB,cpu=125GiB,cores=16"
    r = cli("plan", "-m", model, targets, "--context", "8192", "-o", str(out))
    assert r.exit_code == 0, r
    text = out.read_text()
    assert text.startswith("# Made by `ktcli plan") and "# predicted decode:" in text and "# memory cuda:0:" in text
    v = cli("validate-config", str(out), targets)
    assert v.exit_code == 0 and "OK: this run would work." in v.stdout, v


def test_rules_the_user_wrote_pin_what_they_name(tmp_path):
    p = tmp_path / "pin.yaml"
    p.write_text("model: qwen3-30b-a3b\nrules:\n  - match: {name: '^model\\.layers\\.(0|1)\\.mlp\\.experts$'}\n"
                 "    replace: {class: Experts, kwargs: {generate_device: cpu, prefill_device: cpu, generate_op: cpu,"
                 " prefill_op: cpu, weight_format: int8}}\n")
    f, _ = plan_for(None, 48, profile=str(p))
    assert f.pinned == [0, 1] and 0 not in f.gpu_layers and 1 not in f.gpu_layers and f.gpu_layers[0] == 2
    assert f.profile.rules[0].kwargs["weight_format"] == "int8"        # the user's rule, first, unchanged


def test_format_auto_takes_the_first_format_that_fits_the_cpu():
    assert plan_for("qwen2-57b-a14b", 24, cpu_gib=125, fmt="auto")[0].fmt == "bf16"
    assert plan_for("qwen2-57b-a14b", 24, cpu_gib=64, fmt="auto")[0].fmt == "int8"
    assert plan_for("qwen2-57b-a14b", 24, cpu_gib=40, fmt="auto")[0].fmt == "int4"
    f, _ = plan_for("qwen2-57b-a14b", 24, cpu_gib=8, fmt="auto")
    assert f.notes and f.notes[0].startswith("cpu needs")


def test_a_machine_too_small_is_an_error(cli):
    r = cli("plan", "-m", "qwen2-57b-a14b", "--target-devices=cuda:0=24GiB,cpu=8GiB")
    assert r.exit_code == 1 and "note" in r.output and "no placement fits; try --format auto" in r.output


def test_predicted_decode_is_the_plans_bytes_at_the_measured_rates():
    """decode_tps: CPU-expert bytes at the kernel's share of the CPU bandwidth, the rest at the GPU's, plus the
    per-layer cost; never above the roofline (bytes at the bandwidths alone); more GPU memory, faster."""
    f, _ = plan_for("qwen3-30b-a3b", 24)
    r = Rates()
    roof = 1 / (f.bytes_per_token["cuda"] / r.gpu_bw + f.bytes_per_token["cpu"] / r.cpu_bw)
    assert abs(f.roofline_tps - roof) < 1e-9
    cpu_experts = 8 * len(f.cpu_layers)                       # top-8 of each CPU layer, each with its fixed cost
    want = 1 / (f.bytes_per_token["cuda"] / r.gpu_bw + f.bytes_per_token["cpu"] / (r.cpu_bw * r.cpu_kernel_eff)
                + cpu_experts * r.cpu_expert_s + 48 * r.layer_s)
    assert abs(f.decode_tps - want) < 1e-9 and f.decode_tps < f.roofline_tps
    more, _ = plan_for("qwen3-30b-a3b", 48)
    assert more.decode_tps > f.decode_tps and more.bytes_per_token["cpu"] < f.bytes_per_token["cpu"]


def test_plan_takes_a_checkpoint_and_a_config_json(cli, tmp_path):
    from ktcli.model.demo import ensure_demo
    ckpt = ensure_demo()
    for spec in (ckpt, os.path.join(ckpt, "config.json")):
        r = cli("plan", "-m", spec, "--target-devices=cuda:0=1GiB,cpu=8GiB")
        assert r.exit_code == 0 and "rules:" in r.stdout, r


def test_sglang_export_uses_only_documented_flags(cli):
    r = cli("plan", "-m", "qwen2-57b-a14b", "--target-devices=cuda:0=48GiB,cpu=64GiB,cores=16", "--format", "auto",
            "--export", "sglang")
    assert r.exit_code == 0, r
    from ktcli.placement.export import known_flags
    flags = known_flags()
    command = "\n".join(line for line in r.stdout.splitlines() if not line.startswith("#")).replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "sglang.launch_server"]
    used = [a for a in argv if a.startswith("--")]
    assert used and all(a in flags for a in used), set(used) - set(flags)
    assert all(flags[a]["source"] and flags[a]["version"] for a in used)
    f, _ = plan_for("qwen2-57b-a14b", 48, cpu_gib=64, fmt="auto")
    per_layer = round(len(f.gpu_layers) * 64 / 28)
    assert argv[argv.index("--kt-num-gpu-experts") + 1] == str(per_layer)
    assert argv[argv.index("--kt-method") + 1] == {"bf16": "BF16", "int8": "AMXINT8", "int4": "AMXINT4"}[f.fmt]


def test_fit_on_bench_prints_the_placement_it_chose(cli):
    r = cli("bench", "--fit", "-p", "4", "-n", "0", "-r", "1", "--warmup", "0", "-o", "json")
    assert r.exit_code == 0, r
    assert "Plan — demo" in r.stderr and "experts on the CPU" in r.stderr
    assert json.loads(r.stdout)["results"][0]["tps_mean"] > 0


def test_bad_plan_flags(cli):
    r = cli("plan", "--format", "fp8")
    assert r.exit_code == 2 and "Error: --format must be one of bf16, int8, int4, auto, got 'fp8'" in r.output
    r = cli("plan", "--export", "vllm")
    assert r.exit_code == 2 and "Error: --export takes sglang, got 'vllm'" in r.output


def test_int4_plans_pick_a_group_that_divides_the_experts(cli, tmp_path):
    """The demo's experts (hidden 64, intermediate 32) take group 32, not the default 128: validate-config agrees."""
    out = tmp_path / "int4.yaml"
    r = cli("plan", "--format", "int4", "--target-devices=cpu=8GiB", "-o", str(out))
    assert r.exit_code == 0 and "group_size: 32" in out.read_text(), r
    assert cli("validate-config", str(out), "--target-devices=cpu=8GiB").exit_code == 0


def test_given_bandwidths_drive_the_prediction(cli):
    args = ["plan", "-m", "qwen3-30b-a3b", "--target-devices=cuda:0=24GiB,cpu=125GiB"]
    slow = cli(*args, "--cpu-bw", "40", "--gpu-bw", "1000")
    fast = cli(*args, "--cpu-bw", "80", "--gpu-bw", "2000")
    pred = lambda r: float(r.stdout.split("# predicted decode: ")[1].split(" t/s")[0])  # noqa: E731
    assert slow.exit_code == fast.exit_code == 0
    first, last = fast.stdout.split("# experts on the CPU: layers ")[1].split(" ")[0].split("-")
    cpu_layers = int(last) - int(first) + 1
    assert slow.stdout.split("# experts on the CPU: ")[1][:20] == fast.stdout.split("# experts on the CPU: ")[1][:20]
    r = Rates()
    per_layer = 48 * r.layer_s + 8 * cpu_layers * r.cpu_expert_s      # the part of a token that is not bytes
    byte_time = lambda r: 1 / pred(r) - per_layer                    # noqa: E731
    assert abs(byte_time(slow) / byte_time(fast) - 2) < 2e-2          # every byte read twice as fast (2-digit t/s)
    assert "# rates from: defaults, --cpu-bw, --gpu-bw" in fast.stdout
    # the link rate drives the prefill prediction only (auto uploads, or splits with the CPU)
    pp = lambda r: float(r.stdout.split("# predicted prefill: pp512 ")[1].split(" t/s")[0])  # noqa: E731
    link = cli(*args, "--cpu-bw", "80", "--gpu-bw", "2000", "--pcie-bw", "55")
    assert link.exit_code == 0 and pred(link) == pred(fast) and pp(link) > 1.5 * pp(fast)
    assert "--pcie-bw" in link.stdout and "at 55 GB/s" in link.stdout


def test_fit_on_chat(cli):
    r = cli("chat", "--fit", "--prompt", "Hello!", "-n", "3")
    assert r.exit_code == 0 and "Plan — demo" in r.stderr and "eval count:" in r.stderr, r


def test_cpu_layers_prefill_auto_and_the_prediction_takes_the_fastest_of_upload_cpu_and_split():
    machine = machine_for("cuda:0=24GiB,cpu=125GiB,cores=16")
    prof = profile_from_flags(None, model="qwen3-30b-a3b")
    slow_link = fit(prof, machine, context=256, rates=Rates(pcie_bw=1e9))
    fast_link = fit(prof, machine, context=256, rates=Rates(pcie_bw=50e9))
    kw = [r.kwargs for r in fast_link.profile.rules]
    assert {"prefill_device": "auto", "generate_device": "cpu", "generate_op": "cpu"} in kw
    # 32 CPU layers of 1.21 GB each: at 50 GB/s the upload (0.77 s) beats 0.4 TFLOP/s of CPU GEMMs for pp512, and
    # a split (the CPU takes some experts while the rest upload) beats both, but not the DRAM both read from
    cpu_layers = len(fast_link.cpu_layers)
    per_layer = 128 * 3 * 2048 * 768 * 2
    upload_tps = 512 / (cpu_layers * per_layer / 50e9)
    dram_tps = 512 / (cpu_layers * per_layer / Rates().cpu_bw)
    assert 1.05 * upload_tps < fast_link.prefill_tps < dram_tps
    assert slow_link.prefill_tps < fast_link.prefill_tps / 3      # a slow link: the CPU's GEMMs, not the upload
    assert slow_link.decode_tps == fast_link.decode_tps           # decode does not cross the link


def test_a_gpu_too_small_for_the_upload_slots_prefills_on_the_cpu():
    """Qwen2-57B's two upload slots (2 × 3.5 GB) do not fit beside the rest in 24 GiB: the plan prefills those layers
    on the CPU rather than failing; with room for them it streams."""
    small = fit(profile_from_flags(None, model="qwen2-57b-a14b"), machine_for("cuda:0=24GiB,cpu=125GiB"), context=256)
    big = fit(profile_from_flags(None, model="qwen2-57b-a14b"), machine_for("cuda:0=48GiB,cpu=125GiB"), context=256)
    assert not small.notes and not big.notes
    assert small.profile.rules[-1].kwargs["prefill_device"] == "cpu"
    assert big.profile.rules[-1].kwargs["prefill_device"] == "auto"
    assert big.prefill_tps > 3 * small.prefill_tps
    cpu_only = fit(profile_from_flags(None, model="qwen3-30b-a3b"), machine_for("cpu=125GiB"), context=256)
    assert cpu_only.profile.rules[-1].kwargs["prefill_device"] == "cpu"        # nothing to upload to
