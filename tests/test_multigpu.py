"""Several GPUs on the CPU machine: profiles and KTransformers rule files that split decoder layers over GPUs
validate for two- and four-GPU targets (segments, memory per GPU, graph notes, errors), and `ktcli plan` spreads
layers over the GPUs by their memory."""
import json
import textwrap

import pytest

from conftest import profile

KT_2GPU = profile("ktransformers/Qwen2-57B-A14B-Instruct-2gpu.yaml")
Q3_2GPU = profile("qwen3-30b-a3b-2gpu-cpu-experts.yaml")
Q2_2GPU = profile("qwen2-57b-a14b-2gpu-graphs.yaml")


def targets(n, gib=24, cpu=125):
    return ",".join(f"cuda:{i}={gib}GiB" for i in range(n)) + f",cpu={cpu}GiB,cores=16"


def validate(cli, *args):
    r = cli("validate-config", *args, "--json")
    return r, json.loads(r.stdout)


def test_kt_multi_gpu_rule_file_validates_with_layers_split(cli):
    r, d = validate(cli, KT_2GPU, "-m", "qwen2-57b-a14b", "--target-devices", targets(2))
    assert r.exit_code == 0, r.output
    assert d["devices"]["layers"] == [{"device": "cuda:0", "layers": "0-13"}, {"device": "cuda:1", "layers": "14-27"}]
    assert d["devices"]["embedding"] == "cpu" and d["devices"]["lm_head"] == "cuda:1"
    # each GPU streams its own layers' prefill and holds its own layers' KV cache (half each)
    assert [x["prefill_device"] for x in d["experts"]] == ["cuda:0", "cuda:1"]
    kv0, kv1 = d["memory"]["cuda:0"]["KV cache"], d["memory"]["cuda:1"]["KV cache"]
    assert kv0 == kv1 > 0 and "prefill stream buffers (2 layers)" in d["memory"]["cuda:1"]
    notes = " ".join(f["message"] for f in d["findings"])
    assert "decoder layers 0-13 on cuda:0, 14-27 on cuda:1: eager" in notes
    assert "kwarg 'transfer_map' (the hidden state moves wherever consecutive layers change device" in notes


@pytest.mark.parametrize("path,split", [(Q3_2GPU, "0-23 on cuda:0, 24-47 on cuda:1"),
                                        (Q2_2GPU, "0-13 on cuda:0, 14-27 on cuda:1")])
def test_shipped_two_gpu_profiles_run_one_graph_per_gpu(cli, path, split):
    r, d = validate(cli, path, "--target-devices", targets(2, 80))
    assert r.exit_code == 0, r.output
    assert d["graph_mode"] == "full"
    assert any(f"decoder layers {split}: one full graph per GPU segment" in f["message"] for f in d["findings"])
    one = cli("validate-config", path, "--target-devices", targets(1, 80))   # a one-GPU machine lacks cuda:1
    assert one.exit_code == 1 and "device cuda:1 is not on this machine (it has cpu, cuda:0)" in one.output


def _four_gpu(tmp_path, extra=""):
    rules = "".join(f"""
          - match: {{name: "^model\\\\.layers\\\\.({a}|{a + 1}|{a + 2}|{a + 3}|{a + 4}|{a + 5}|{a + 6})\\\\."}}
            replace: {{class: default, kwargs: {{generate_device: "cuda:{g}"}}}}""" for g, a in enumerate(range(0, 28, 7)))
    p = tmp_path / "four.yaml"
    p.write_text(textwrap.dedent(f"""
        model: qwen2-57b-a14b
        runtime: {{use_cuda_graph: true}}
        rules:
          - match: {{name: "^model\\\\.layers\\\\..*\\\\.mlp\\\\.experts$"}}
            replace: {{class: Experts, kwargs: {{generate_device: cpu, generate_op: cpu}}}}{extra}{rules}
          - match: {{name: "^lm_head$"}}
            replace: {{class: default, kwargs: {{generate_device: "cuda:3"}}}}
    """))
    return str(p)


def test_four_gpus_each_gpu_counts_its_own_layers(cli, tmp_path):
    r, d = validate(cli, _four_gpu(tmp_path), "--target-devices", targets(4))
    assert r.exit_code == 0, r.output
    assert [s["device"] for s in d["devices"]["layers"]] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [s["layers"] for s in d["devices"]["layers"]] == ["0-6", "7-13", "14-20", "21-27"]
    kv = [d["memory"][f"cuda:{i}"]["KV cache"] for i in range(4)]
    assert len(set(kv)) == 1 and kv[0] > 0
    other = [d["memory"][f"cuda:{i}"]["other weights"] for i in range(4)]
    assert other[0] > other[1] == other[2] < other[3]       # the embedding on the first, the lm_head on the last
    three = cli("validate-config", _four_gpu(tmp_path), "--target-devices", targets(3))
    assert three.exit_code == 1 and "device cuda:3 is not on this machine" in three.output


def test_a_layer_split_over_two_devices_is_an_error(cli, tmp_path):
    extra = """
          - match: {name: "^model\\\\.layers\\\\.(5)\\\\.self_attn$"}
            replace: {class: default, kwargs: {generate_device: "cuda:2"}}"""
    r = cli("validate-config", _four_gpu(tmp_path, extra), "--target-devices", targets(4))
    assert r.exit_code == 1
    flat = " ".join(r.output.split())
    assert "layers 5 split their own modules over cuda:0, cuda:2" in flat
    assert "only its '.mlp.experts' may go elsewhere" in flat


def test_graphs_need_every_decoder_layer_and_the_lm_head_on_a_gpu(cli, tmp_path):
    extra = """
          - match: {name: "^model\\\\.layers\\\\.(2[7])\\\\."}
            replace: {class: default, kwargs: {generate_device: cpu}}"""
    r = cli("validate-config", _four_gpu(tmp_path, extra), "--target-devices", targets(4))
    assert r.exit_code == 1 and "needs every decoder layer on a GPU, but layers 27 run their attention on the CPU" \
        in " ".join(r.output.split())
    p = tmp_path / "head.yaml"
    p.write_text(open(Q3_2GPU).read().replace('|^lm_head$', '') + textwrap.dedent("""
          - match: {name: "^lm_head$"}
            replace: {class: default, kwargs: {generate_device: cpu}}
    """).replace("\n", "\n  ").rstrip() + "\n")
    r = cli("validate-config", str(p), "--target-devices", targets(2, 80))
    assert r.exit_code == 1 and "the lm_head runs on cpu, which a CUDA graph cannot record" in " ".join(r.output.split())
    off = cli("validate-config", str(p), "--target-devices", targets(2, 80), "--use_cuda_graph", "false")
    assert off.exit_code == 0, off.output


@pytest.mark.parametrize("n", [2, 4])
def test_plan_spreads_layers_over_gpus_by_memory(cli, tmp_path, n):
    out = tmp_path / "plan.yaml"
    r = cli("plan", "-m", "qwen3-30b-a3b", f"--target-devices={targets(n)}", "-o", str(out))
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "# decoder layers: cuda:0: 0-" in text and f"cuda:{n - 1}:" in text
    v, d = validate(cli, str(out), "--target-devices", targets(n))
    assert v.exit_code == 0, v.output
    segs = d["devices"]["layers"]
    assert [s["device"] for s in segs] == [f"cuda:{i}" for i in range(n)]
    sizes = [int(b) - int(a) + 1 for a, b in (s["layers"].split("-") for s in segs)]
    assert sum(sizes) == 48 and max(sizes) - min(sizes) <= 1           # equal GPUs: equal shares
    assert d["devices"]["lm_head"] == f"cuda:{n - 1}"
    for i in range(n):                                                 # within each GPU's budget, used well
        mem = d["memory"][f"cuda:{i}"]
        assert 0.8 * 24 * 2**30 < mem["total"] <= 24 * 2**30 * 0.92 or n == 4


def test_plan_gives_a_bigger_gpu_more_layers_and_more_experts(cli):
    from ktcli.commands.options import machine_for, profile_from_flags
    from ktcli.placement.fit import fit
    one = fit(profile_from_flags(None, model="qwen2-57b-a14b"), machine_for("cuda:0=48GiB,cpu=125GiB,cores=16"))
    two = fit(profile_from_flags(None, model="qwen2-57b-a14b"),
              machine_for("cuda:0=16GiB,cuda:1=32GiB,cpu=125GiB,cores=16"))
    (d0, l0, e0), (d1, l1, e1) = two.segments
    assert (d0, d1) == ("cuda:0", "cuda:1") and len(l1) > len(l0) and len(e1) > len(e0)
    assert l0 + l1 == list(range(28)) and not two.notes
    for dev in ("cuda:0", "cuda:1", "cpu"):
        assert two.memory.total(dev) <= two.budget[dev]
    # the same total memory in two cards holds fewer experts than in one: each GPU keeps its own two prefill
    # upload slots (2 × 3.3 GiB here), its CUDA context and workspace
    slots = two.memory.rows["cuda:0"]["prefill stream buffers (2 layers)"]
    assert slots == two.memory.rows["cuda:1"]["prefill stream buffers (2 layers)"] > 6 * 2**30
    assert 0 < len(two.gpu_layers) < len(one.gpu_layers) and two.decode_tps < one.decode_tps


def test_hooks_go_on_every_module_off_the_main_gpu():
    from ktcli.commands.options import machine_for, profile_from_flags
    from ktcli.model.devices import modules_off_main
    from ktcli.placement.validate import validate
    v = validate(profile_from_flags(Q3_2GPU), machine_for(targets(2, 80)))
    off = modules_off_main(v.model, v.plan)
    assert off == [(f"model.layers.{i}", "cuda:1") for i in range(24, 48)] + [("model.norm", "cuda:1"),
                                                                             ("lm_head", "cuda:1")]


def test_a_tensor_every_layer_gets_crosses_once_per_forward():
    """The rotary cos/sin and the mask reach every layer: moved once, reused by the next layers on that device,
    forgotten when the next forward starts; the hidden state and non-tensors pass as they are."""
    import torch
    from ktcli.model import devices
    meta, cache = torch.device("meta"), object()
    cos = torch.zeros(4)
    a, k = devices.move(meta, (torch.ones(2, 3),), {"position_embeddings": (cos, cos), "past_key_values": cache,
                                                    "use_cache": True})
    assert a[0].device == meta and a[0].shape == (2, 3) and k["past_key_values"] is cache and k["use_cache"] is True
    pe = k["position_embeddings"]
    assert isinstance(pe, tuple) and pe[0].device == meta and pe[0] is pe[1]
    _, k2 = devices.move(meta, (torch.ones(2, 3),), {"position_embeddings": (cos, cos)})
    assert k2["position_embeddings"][0] is pe[0]
    devices._forget(None, None)
    _, k3 = devices.move(meta, (), {"position_embeddings": (cos, cos)})
    assert k3["position_embeddings"][0] is not pe[0]
    devices._forget(None, None)


@pytest.mark.parametrize("mode", ["full", "piecewise"])
def test_segmented_capture_splits_at_each_gpu_change_and_copies_once(monkeypatch, mode):
    """The bookkeeping of one graph per GPU, with torch.cuda's graph and stream calls stubbed (no GPU here): a
    segment per run of layers on one device, each tensor from another device copied once (the hidden state at the
    boundary, cos/sin reused by the next layers), the copies replayed after the segment that produced them."""
    import torch
    from ktcli.model import devices
    from ktcli.ops import bridge as br
    log, cur = [], {"dev": torch.device("cpu")}

    class Graph:
        def capture_begin(self, pool=None):
            log.append(("begin", str(cur["dev"])))

        def capture_end(self):
            log.append(("end", str(cur["dev"])))

        def replay(self):
            log.append(("replay", str(cur["dev"])))

    class Stream:
        def __init__(self, device=None):
            self.device = torch.device(device) if device is not None else cur["dev"]

        def synchronize(self):
            pass

    class Device:
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            self.prev, cur["dev"] = cur["dev"], self.d

        def __exit__(self, *a):
            cur["dev"] = self.prev

    streams = {}
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams.setdefault(str(cur["dev"]), Stream()))
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: (cur.update(dev=s.device), streams.update({str(s.device): s})))
    monkeypatch.setattr(torch.cuda, "default_stream", lambda d: Stream(d))
    monkeypatch.setattr(torch.cuda, "device", Device)

    b = br.SegmentedFullBridge.__new__(br.SegmentedFullBridge) if mode == "full" else br.PiecewiseBridge(None)
    br.SegmentedCapture.__init__(b, pool=None)
    meta = torch.device("meta")
    with br.use_bridge(b):
        b.begin(torch.device("cpu"))
        h, cos = torch.ones(1, 1, 4), torch.ones(1, 1, 2)
        for layer in range(4):                         # layers 0-1 on cpu ("GPU A"), 2-3 on meta ("GPU B")
            if layer >= 2:
                (h,), kw = devices.move(meta, (h,), {"position_embeddings": (cos, cos)})
                assert h.device == meta and kw["position_embeddings"][0].device == meta
            if mode == "piecewise":                    # a CPU-expert layer ends its segment
                b.cpu_step(lambda i=layer: log.append(("step", i)))
        b.end()
    if mode == "full":
        assert log == [("begin", "cpu"), ("end", "cpu"), ("begin", "meta"), ("end", "meta")]
        (_, d0, after0), (_, d1, after1) = b.segments
        assert (str(d0), str(d1)) == ("cpu", "meta") and len(after0) == 2 and after1 == []   # h and cos, once each
        log.clear()
        b.replay()
        assert log == [("replay", "cpu"), ("replay", "meta")]
    else:
        assert [str(d) for _, d, _ in b.segments] == ["cpu", "cpu", "cpu", "meta", "meta", "meta"]
        assert [len(a) for _, _, a in b.segments] == [1, 1, 2, 1, 1, 0]      # steps; the boundary's two copies
        log.clear()
        b.replay()
        assert log == [("replay", "cpu"), ("step", 0), ("replay", "cpu"), ("step", 1), ("replay", "cpu"),
                       ("replay", "meta"), ("step", 2), ("replay", "meta"), ("step", 3), ("replay", "meta")]


def test_the_first_module_back_on_the_main_gpu_takes_a_hook_too():
    from ktcli.commands.options import machine_for, profile_from_flags
    from ktcli.model.devices import modules_off_main
    from ktcli.placement.validate import validate
    text = open(Q3_2GPU).read().replace("|^model\\\\.norm$|^lm_head$", "")     # norm and lm_head back on cuda:0
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    v = validate(profile_from_flags(f.name), machine_for(targets(2, 80)))
    assert v.plan.lm_head_device == "cuda:0"
    off = modules_off_main(v.model, v.plan)
    assert off[-1] == ("model.norm", "cuda:0") and len(off) == 25


def test_sglang_export_of_a_two_gpu_plan_is_tensor_parallel(cli):
    r = cli("plan", "-m", "qwen2-57b-a14b", f"--target-devices={targets(2)}", "--export", "sglang")
    assert r.exit_code == 0, r.output
    assert "--tensor-parallel-size 2" in r.stdout
    assert "# 2 GPUs: SGLang splits every layer over them (tensor parallel)" in r.stdout
