"""Every bad input gets one `Error:` line (exact text asserted), a hint, its exit code, and no traceback.

One line per case: (command line, exit code, the error line). `{name}` in a command line is a file made by the
`inputs` fixture below; exit codes are errors.EXIT_CODES (1 the plan fails, 2 usage, 3 profile, 4 model).
"""
import os
import shutil

import pytest

from conftest import PROFILES

DEMO = os.path.join(PROFILES, "demo.yaml")
CASES = [
    ("validate-config {latin1}", 3, "Error: {latin1}:2: not UTF-8 text (byte 0xe9 at offset 17)"),
    ("chat {latin1} --prompt hi", 3, "Error: {latin1}:2: not UTF-8 text (byte 0xe9 at offset 17)"),
    ("bench {binary} -p 4 -n 0", 3, "Error: {binary}:1: control character 0x00 in the profile: not a text file"),
    ("validate-config {group7}", 1, "error: {group7}:15: rule 2: int4 group_size 7 does not divide the experts' input "
                                    "sizes (hidden 64, intermediate 32) of layers 2-3"),
    ("chat {group128} --prompt hi", 1, "Error: {group128}:15: rule 2: int4 group_size 128 does not divide the experts' "
                                       "input sizes (hidden 64, intermediate 32) of layers 2-3"),
    ("validate-config {groupstr}", 3, "Error: {groupstr}:23: group_size must be an integer ≥ 2, got 'abc'"),
    ("validate-config --cpu-threads -1", 2, "Error: --cpu-threads must be ≥ 1, got -1"),
    ("chat --cpu-threads -1 --prompt hi", 2, "Error: --cpu-threads must be ≥ 1, got -1"),
    ("validate-config --max-seq-len 0", 2, "Error: --max-seq-len must be ≥ 1, got 0"),
    ("bench --max-seq-len -5 -p 4 -n 0", 2, "Error: --max-seq-len must be ≥ 1, got -5"),
    ("validate-config --dtype int8", 2, "Error: --dtype must be one of bfloat16, float16, float32, got 'int8'"),
    ("validate-config --device tpu", 2, "Error: --device 'tpu' is not a device ktcli runs on"),
    ("validate-config {device}", 3, "Error: {device}:2: device 'tpu' is not a device ktcli runs on"),
    ("chat -m {notok} --prompt hi", 4, "Error: {notok} has no tokenizer files (tokenizer.json, tokenizer.model, "
                                       "vocab.json, vocab.txt)"),
    ("validate-config -m {noshard}", 4, "error: missing shard x.safetensors (listed in model.safetensors.index.json for "
                                        "lm_head.weight)"),
    ("bench -p 4 -n 0 --output-file {folder}", 2, "Error: --output-file {folder}: {folder} is a directory"),
    ("bench -p 4 -n 0 --output-file {demo}/x.json", 2, "Error: --output-file {demo}/x.json: {demo} is a file, not a directory"),
    ("bench -p 4 -n 0 --output-file {folder}/no/x.json", 2, "Error: --output-file {folder}/no/x.json: directory "
                                                            "{folder}/no does not exist"),
    ("validate-config {ktclass}", 1, "error: {ktclass}:1: rule 1: unknown replace class "
                                     "'ktransformers.operators.experts.KTransformersExpert' (did you mean KTransformersExperts?)"),
    ("validate-config {badop}", 1, "error: {badop}:15: rule 2: unknown decode operator 'cpuu' (layers 2-3) (did you mean cpu?)"),
    ("validate-config {demo} --target-devices cpu=1MiB", 1, "fix: store the CPU experts as int8 or int4 (weight_format: "
                                                            "int8 / int4), or move some layers' experts to the GPU"),
    ("chat --prompt ' '", 2, "Error: the message is empty"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    text = open(DEMO).read()
    files = {"demo": DEMO, "folder": str(d)}

    def put(name, data):
        p = d / f"{name}.yaml"
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        files[name] = str(p)
    put("latin1", b"model: demo\n# caf\xe9\n")
    put("binary", b"model: demo\x00\n")
    cpu_rule = "prefill_op: cpu, generate_op: cpu}"
    put("group7", text.replace(cpu_rule, "prefill_op: cpu, generate_op: cpu, weight_format: int4, group_size: 7}"))
    put("group128", text.replace(cpu_rule, "prefill_op: cpu, generate_op: cpu, weight_format: int4}"))
    put("groupstr", text + "  - match: {name: '^model\\.layers\\.0\\.mlp\\.experts$'}\n    replace:\n      class: Experts\n"
        "      kwargs: {group_size: abc}\n")
    put("device", "model: demo\ndevice: tpu\n")
    put("ktclass", "- match:\n    name: '^model\\.layers\\..*\\.mlp\\.experts$'\n  replace:\n"
        "    class: ktransformers.operators.experts.KTransformersExpert\n"
        "    kwargs: {generate_device: cpu, generate_op: KExpertsCPU}\n")
    put("badop", text.replace("generate_op: cpu}", "generate_op: cpuu}"))
    from ktcli.model.demo import ensure_demo
    demo = ensure_demo()
    files["notok"] = str(d / "notok")
    shutil.copytree(demo, files["notok"], ignore=shutil.ignore_patterns("tokenizer*"))
    files["noshard"] = str(d / "noshard")
    shutil.copytree(demo, files["noshard"])
    with open(os.path.join(files["noshard"], "model.safetensors.index.json"), "w") as f:
        f.write('{"weight_map": {"lm_head.weight": "x.safetensors"}}')
    return files


@pytest.mark.parametrize("command,code,line", CASES, ids=[c[0].split(" {")[0] + f"-{i}" for i, c in enumerate(CASES)])
def test_bad_input(cli, inputs, command, code, line):
    import shlex
    r = cli(*shlex.split(command.format(**inputs)))
    assert r.exit_code == code, r
    assert line.format(**inputs) in r.output, r
    assert "Traceback" not in r.output
    if line.startswith("Error:"):          # validate-config reports findings in its table instead
        assert r.stderr.count("Error:") == 1 and "Hint:" in r.stderr, r
