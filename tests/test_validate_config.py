"""validate-config: every check, exit codes and exact messages; nothing loads weights."""
import json
import textwrap

import pytest

from conftest import H100, profile

SEED_BROKEN = profile("qwen2-57b-a14b-gpu01-graphs-broken.yaml")
SEED_FIXED = profile("qwen2-57b-a14b-gpu01-graphs.yaml")
KT_RULES = profile("ktransformers/Qwen2-57B-A14B-Instruct.yaml")


def write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_help_describes_every_command(cli):
    for cmd in ([], ["chat"], ["bench"], ["validate-config"]):
        r = cli(*cmd, "--help")
        assert r.exit_code == 0, r
    r = cli("validate-config", "--help")
    for flag in ("--use_cuda_graph", "--use-cuda-graph", "--target-devices", "--json", "--graph-mode", "--model"):
        assert flag in r.output


def test_demo_default_validates(cli):
    r = cli("validate-config")
    assert r.exit_code == 0, r
    assert "OK: this run would work." in r.output


def test_seed_case_fails_with_rule_and_fixes(cli):
    r = cli("validate-config", SEED_BROKEN, H100)
    assert r.exit_code == 1, r
    line = next(l for l in r.output.splitlines() if l.startswith("error:"))
    assert line == (
        f"error: {SEED_BROKEN}:13: rule 1: CUDA graphs are on (graph_mode full), but layers 0-1 decode with operator "
        "'torch' on cuda:0, which is not graph safe: it loops over experts with torch.where(expert_mask[i]) / "
        "nonzero(): data-dependent shapes and a host sync, which CUDA graph capture forbids "
        "('operation not permitted when stream is capturing')")
    assert ("fix: use a graph-safe decode operator on cuda:0 (generate_op: gpu_static — KTransformers name "
            "KExpertsMarlin), or turn CUDA graphs off (--use_cuda_graph false)") in r.output


@pytest.mark.parametrize("flags", [["--use_cuda_graph", "false"], ["--no-use-cuda-graph"], ["--graph-mode", "off"]])
def test_seed_case_passes_with_graphs_off(cli, flags):
    r = cli("validate-config", SEED_BROKEN, H100, *flags)
    assert r.exit_code == 0, r
    assert "graphs off" in r.output


def test_seed_case_fixed_passes(cli):
    r = cli("validate-config", SEED_FIXED, H100)
    assert r.exit_code == 0, r
    r = cli("validate-config", SEED_FIXED, H100, "--json")
    d = json.loads(r.stdout)
    assert d["ok"] and d["graph_mode"] == "full"
    assert d["experts"][0]["layers"] == "0-1" and d["experts"][0]["decode_op"] == "gpu_static"
    assert d["experts"][1]["layers"] == "2-27" and d["experts"][1]["decode_device"] == "cpu"
    assert d["devices"]["attention"] == "cuda:0"


def test_use_cuda_graph_kt_spelling_true(cli):
    r = cli("validate-config", SEED_BROKEN, H100, "--use_cuda_graph", "false", "--use-cuda-graph")
    assert r.exit_code == 2 and "Error: --use_cuda_graph and --use-cuda-graph disagree" in r.output
    r = cli("validate-config", SEED_BROKEN, H100, "--use_cuda_graph", "maybe")
    assert r.exit_code == 2 and "Error: --use_cuda_graph takes true or false, got 'maybe'" in r.output
    r = cli("validate-config", SEED_BROKEN, H100, "--no-use-cuda-graph", "--graph-mode", "full")
    assert r.exit_code == 2 and "Error: --graph-mode full conflicts with --use-cuda-graph false" in r.output


def test_ktransformers_rule_file_is_accepted(cli):
    r = cli("validate-config", KT_RULES, "-m", "qwen2-57b-a14b", "--use_cuda_graph", "true", H100, "--json")
    assert r.exit_code == 0, r
    d = json.loads(r.stdout)
    assert d["experts"] == [{"prefill_device": "cuda:0", "prefill_op": "stream", "decode_device": "cpu",
                             "decode_op": "cpu", "weight_format": "bf16", "rule": "rule 4", "layers": "0-27"}]
    assert d["devices"]["embedding"] == "cpu" and d["devices"]["main"] == "cuda:0"
    notes = [f["message"] for f in d["findings"] if f["severity"] == "note"]
    assert any("KTransformersLinear — ktcli keeps transformers' module" in n for n in notes)
    assert any("ignored: kwarg 'per_layer_prefill_intput_threshold'" in n for n in notes)


def test_profile_may_point_rules_at_a_kt_file(cli, tmp_path):
    p = write(tmp_path, f"""
        model: qwen2-57b-a14b
        runtime: {{use_cuda_graph: true}}
        rules: {KT_RULES}
    """)
    assert cli("validate-config", p, H100).exit_code == 0


def test_yaml_syntax_error_names_line(cli, tmp_path):
    p = write(tmp_path, "model: demo\nrules:\n  - match: {name: 'x'\n")
    r = cli("validate-config", p)
    assert r.exit_code == 3
    assert r.stderr.startswith(f"Error: {p}:")
    assert "YAML syntax error" in r.stderr and "Traceback" not in r.output


def test_unknown_key_names_line(cli, tmp_path):
    p = write(tmp_path, "model: demo\nruntime:\n  use_cuda_grap: true\n")
    r = cli("validate-config", p)
    assert r.exit_code == 3
    assert r.stderr.splitlines()[0] == f"Error: {p}:3: unknown key 'use_cuda_grap' in runtime"


def test_wrong_type_names_line(cli, tmp_path):
    p = write(tmp_path, "model: demo\nruntime:\n  max_seq_len: long\n")
    r = cli("validate-config", p)
    assert r.exit_code == 3
    assert r.stderr.splitlines()[0] == f"Error: {p}:3: runtime.max_seq_len must be int, got str 'long'"


def test_bad_regex(cli, tmp_path):
    p = write(tmp_path, "rules:\n  - match:\n      name: '^model\\.layers\\.([0-1]\\.mlp'\n")
    r = cli("validate-config", p)
    assert r.exit_code == 3
    assert r.stderr.startswith(f"Error: {p}:3: bad regex")


def test_unknown_operator_lists_valid(cli, tmp_path):
    p = write(tmp_path, """
        rules:
          - match: {name: "experts$"}
            replace: {class: Experts, kwargs: {generate_op: KExpertsFast}}
    """)
    r = cli("validate-config", p)
    assert r.exit_code == 1
    assert f"error: {p}:3: rule 1: unknown decode operator 'KExpertsFast' (layers 0-3)" in r.output
    assert "valid operators: torch (KExpertsTorch/eager), gpu_static (KExpertsMarlin/batched_mm), cpu (KExpertsCPU)" in r.output


def test_operator_device_mismatch(cli, tmp_path):
    p = write(tmp_path, """
        rules:
          - match: {name: "experts$"}
            replace: {class: Experts, kwargs: {generate_device: cuda, generate_op: cpu}}
    """)
    r = cli("validate-config", p, H100)
    assert r.exit_code == 1
    assert "rule 1: operator 'cpu' runs on cpu, but decode of layers 0-3 is placed on cuda:0" in r.output
    p = write(tmp_path, """
        rules:
          - match: {name: "experts$"}
            replace: {class: Experts, kwargs: {generate_device: cpu, generate_op: gpu_static}}
    """, "q.yaml")
    r = cli("validate-config", p)
    assert r.exit_code == 1
    assert "operator 'gpu_static' runs on cuda, but decode of layers 0-3 is placed on cpu" in r.output


def test_out_of_range_layer_is_error(cli, tmp_path):
    p = write(tmp_path, """
        rules:
          - match: {name: "^model\\\\.layers\\\\.(4|5)\\\\.mlp\\\\.experts$"}
            replace: {class: Experts, kwargs: {generate_device: cpu}}
    """)
    r = cli("validate-config", p)
    assert r.exit_code == 1
    assert f"error: {p}:3: rule 1 targets layer 4-5, but the model has 4 layers (0-3)" in r.output


def test_rule_matching_nothing_is_warning(cli, tmp_path):
    p = write(tmp_path, """
        rules:
          - match: {name: "^lm_head_of_nothing$"}
            replace: {class: default}
    """)
    r = cli("validate-config", p)
    assert r.exit_code == 0
    assert "warning" in r.output and "rule 1 matches no module of this qwen2_moe model" in r.output


def test_cuda_missing_on_cpu_machine(cli):
    r = cli("validate-config", SEED_FIXED, "--target-devices", "cpu=125GiB")
    assert r.exit_code == 1
    assert "device cuda:0 is not on this machine (it has cpu)" in r.output
    assert "--target-devices" in r.output


def test_second_gpu_missing(cli, tmp_path):
    p = write(tmp_path, """
        device: cuda:1
    """)
    r = cli("validate-config", p, H100)
    assert r.exit_code == 1 and "device cuda:1 is not on this machine (it has cpu, cuda:0)" in r.output


def test_memory_over_capacity(cli):
    r = cli("validate-config", SEED_FIXED, "--target-devices", "cuda:0=16GiB,cpu=64GiB")
    assert r.exit_code == 1
    assert "cuda:0 needs 29.35 GiB but has 16.00 GiB" in r.output
    assert "cpu needs 85.33 GiB but has 64.00 GiB" in r.output


def test_threads_above_cores_warns(cli, tmp_path):
    p = write(tmp_path, "runtime: {cpu_threads: 999}\n")
    r = cli("validate-config", p)
    assert r.exit_code == 0 and "cpu_threads 999 is above the" in r.output


def test_graphs_need_gpu_main_device(cli, tmp_path):
    p = write(tmp_path, "device: cpu\nruntime: {use_cuda_graph: true}\n")
    r = cli("validate-config", p)
    assert r.exit_code == 1 and "graph_mode full needs the model on a GPU, but its main device is cpu" in r.output


def test_missing_checkpoint_dir(cli, tmp_path):
    r = cli("validate-config", "--model", str(tmp_path / "nope"))
    assert r.exit_code == 4
    assert f"model '{tmp_path / 'nope'}' not found" in r.output and "Traceback" not in r.output


def test_missing_profile_file(cli, tmp_path):
    r = cli("validate-config", str(tmp_path / "nope.yaml"))
    assert r.exit_code == 3
    assert r.stderr.startswith(f"Error: {tmp_path / 'nope.yaml'}: cannot read profile")


def test_architecture_without_experts_interface(cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}))
    r = cli("validate-config", "--model", str(tmp_path))
    assert r.exit_code == 4
    assert "LlamaForCausalLM (llama) has no experts module" in r.output
    assert "qwen2_moe" in r.output and "mixtral" in r.output


def test_bad_target_devices_is_usage_error(cli):
    r = cli("validate-config", "--target-devices", "gpu=80GiB")
    assert r.exit_code == 2 and "Error: unknown device 'gpu' in --target-devices" in r.output
    r = cli("validate-config", "--target-devices", "cuda:0")
    assert r.exit_code == 2 and "Error: bad --target-devices entry 'cuda:0'" in r.output


def test_json_and_exit_code_agree(cli):
    r = cli("validate-config", SEED_BROKEN, H100, "--json")
    d = json.loads(r.stdout)
    assert r.exit_code == 1 and d["ok"] is False
    assert [f["check"] for f in d["findings"] if f["severity"] == "error"] == ["cuda-graph"]


def test_qwen3_profiles_validate(cli):
    for name in ("qwen3-30b-a3b-cpu-experts.yaml", "qwen3-30b-a3b-gpu-half.yaml", "qwen2-57b-a14b-cpu-experts.yaml",
                 "qwen3-30b-a3b-cpu-experts-int8.yaml", "qwen3-30b-a3b-cpu-experts-int4.yaml"):
        r = cli("validate-config", profile(name), H100)
        assert r.exit_code == 0, (name, r)


def test_num_layers_cut_turns_out_of_range_into_a_note(cli):
    r = cli("validate-config", profile("qwen3-30b-a3b-gpu-half.yaml"), H100, "--num-layers", "8", "--json")
    d = json.loads(r.stdout)
    assert r.exit_code == 0 and d["num_layers"] == 8
    assert any("targets layer 8-15, cut by --num-layers 8" in f["message"] for f in d["findings"])


def test_unknown_replace_class(cli, tmp_path):
    p = write(tmp_path, """
        rules:
          - match: {name: "experts$"}
            replace: {class: FastExperts}
    """)
    r = cli("validate-config", p)
    assert r.exit_code == 1 and f"error: {p}:3: rule 1: unknown replace class 'FastExperts'" in r.output


def test_bad_device_and_bad_size(cli):
    r = cli("validate-config", "--device", "tpu")
    assert r.exit_code == 2 and "Error: --device 'tpu' is not a device ktcli runs on" in r.output
    r = cli("validate-config", "--target-devices", "cuda:0=lots,cpu=1GiB")
    assert r.exit_code == 2 and "Error: bad size 'lots'" in r.output


TWO_GPU = """
model: qwen3-30b-a3b
weights: synthetic
runtime: {{use_cuda_graph: {graphs}, max_seq_len: 4096}}
rules:
  - match: {{name: "^model\\\\.layers\\\\.([0-9]|1[0-1])\\\\.mlp\\\\.experts$"}}
    replace: {{class: Experts, kwargs: {{generate_device: "cuda:{gpu}", generate_op: gpu_static, prefill_device: "cuda:{gpu}", prefill_op: torch}}}}
  - match: {{name: "^model\\\\.layers\\\\..*\\\\.mlp\\\\.experts$"}}
    replace: {{class: Experts, kwargs: {{generate_device: cpu, generate_op: cpu}}}}
"""


@pytest.mark.parametrize("gpus,gpu", [(2, 1), (4, 3)])
def test_experts_on_another_gpu_against_multi_gpu_targets(cli, tmp_path, gpus, gpu):
    """Two- and four-GPU targets: experts of layers 0-11 on cuda:N, their attention on cuda:0. With graphs on, one
    error naming the rule, the layers and the fix (a graph records one GPU's stream); with graphs off, a warning;
    the memory table counts each GPU apart, and a GPU the target lacks is an error."""
    target = ",".join(f"cuda:{i}=24GiB" for i in range(gpus)) + ",cpu=125GiB"
    on = cli("validate-config", write(tmp_path, TWO_GPU.format(graphs="true", gpu=gpu), "on.yaml"),
             "--target-devices", target)
    assert on.exit_code == 1, on.output
    flat = " ".join(on.output.split())                               # rich may wrap long lines
    assert (f"on.yaml:6: CUDA graphs are on (graph_mode full), but rule 1: layers 0-11 run their experts on cuda:{gpu} "
            "while their attention runs on cuda:0: a graph records one GPU's stream") in flat
    assert "place these experts on cuda:0 or the CPU" in on.output
    off = cli("validate-config", write(tmp_path, TWO_GPU.format(graphs="false", gpu=gpu), "off.yaml"),
              "--target-devices", target)
    assert off.exit_code == 0 and "warning" in off.output and "crosses GPUs" in off.output, off.output
    assert f"cuda:{gpu}" in off.output and "experts 13.50 GiB" in off.output
    short = ",".join(f"cuda:{i}=24GiB" for i in range(gpu)) + ",cpu=125GiB"
    lacking = cli("validate-config", write(tmp_path, TWO_GPU.format(graphs="false", gpu=gpu), "off.yaml"),
                  "--target-devices", short)
    assert lacking.exit_code == 1 and f"device cuda:{gpu} is not on this machine" in lacking.output


def test_auto_prefill_note_says_routing_is_decided_by_timed_chunks(cli):
    """The routed split is taken by whole timed chunks only (ops/calibration.py): validate-config says what a chunk
    length does otherwise."""
    import os
    r = cli("validate-config", os.path.join(os.path.dirname(__file__), "..", "profiles",
                                            "qwen3-30b-a3b-cpu-experts-int4.yaml"))
    assert ("splits each chunk's routed experts between the CPU and the copy where a timed chunk beats the plan "
            "(streamed otherwise) for chunks of 64-512 tokens") in " ".join(r.output.split())
    assert "computes on the CPU for chunks of 1-16 tokens" in r.output
