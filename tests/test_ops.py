"""Every operator against the eager reference on fresh random inputs, many token counts including 1."""
import types

import pytest
import torch

from ktcli.ops.base import eager_reference
from ktcli.ops.cpu import CpuExperts, Staging, cpu_moe
from ktcli.ops.gpu_static import GpuStaticExperts
from ktcli.ops.torch_eager import TorchEagerExperts

E, H, I, K = 8, 48, 24, 3


def fake_experts(device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gu = (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(device, dtype)
    dn = (torch.randn(E, H, I, generator=g) * 0.1).to(device, dtype)
    ex = types.SimpleNamespace(gate_up_proj=gu, down_proj=dn, act_fn=torch.nn.SiLU(), silu_act=True, packed=None)
    ex.weights_on = lambda dev: (gu.to(dev), dn.to(dev))
    ex.expert_weights = lambda e, dtype: (gu[e], dn[e])
    return ex


def inputs(T, device, dtype, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device)
    w = torch.rand(T, K, generator=g).softmax(-1).to(device, dtype)
    return x, idx, w


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


TOKENS = [1, 2, 3, 7, 16, 33, 100]
def transformers_experts(x, idx, w, gate_up, down):
    """The reference: transformers' own experts module (Qwen3MoeExperts, eager) holding these weights, so no
    operator is compared with a copy of its own code."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    E, I2, H = gate_up.shape
    m = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I2 // 2, num_experts=E))
    m.gate_up_proj.data, m.down_proj.data = gate_up, down
    with torch.no_grad():
        return m(x, idx, w)


OPS = {"torch": TorchEagerExperts, "gpu_static": GpuStaticExperts, "cpu": CpuExperts}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_operator_matches_reference_cpu(name, T, dtype, tol):
    """Operators' arithmetic on the CPU (gpu_static's code is device-agnostic; its device is checked elsewhere)."""
    seed = torch.randint(0, 2**30, ()).item()       # fresh inputs every run
    ex = fake_experts("cpu", dtype, seed)
    x, idx, w = inputs(T, "cpu", dtype, seed)
    want = transformers_experts(x.float(), idx, w.float(), ex.gate_up_proj.float(), ex.down_proj.float())
    got = OPS[name](ex, torch.device("cpu"))(x, idx, w)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel(got, want) <= tol, (name, T, dtype, seed)


def test_cpu_moe_writes_every_row():
    ex = fake_experts("cpu", torch.float32, 3)
    x, idx, w = inputs(5, "cpu", torch.float32, 3)
    out = torch.full_like(x, float("nan"))     # poisoned: every element must be written
    cpu_moe(x, idx, w, ex.gate_up_proj, ex.down_proj, ex.act_fn, out)
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("T", TOKENS)
def test_operator_matches_reference_gpu(name, T):
    seed = torch.randint(0, 2**30, ()).item()
    dev = "cpu" if name == "cpu" else "cuda"
    ex = fake_experts(dev, torch.bfloat16, seed)
    x, idx, w = inputs(T, "cuda", torch.bfloat16, seed)
    staging = Staging(16, H, K, torch.bfloat16, pin=True)
    op = OPS[name](ex, torch.device(dev), staging)
    got = op(x, idx, w)
    want = eager_reference(x.float().cpu(), idx.cpu(), w.float().cpu(), ex.gate_up_proj.float().cpu(),
                           ex.down_proj.float().cpu(), ex.act_fn)
    assert got.device.type == "cuda" and rel(got.cpu(), want) <= 2e-2


@pytest.mark.gpu
def test_gpu_static_captures_and_replays():
    ex = fake_experts("cuda", torch.bfloat16, 5)
    op = GpuStaticExperts(ex, torch.device("cuda"))
    x, idx, w = inputs(1, "cuda", torch.bfloat16, 5)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op(x, idx, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = op(x, idx, w)
    for seed in range(3):
        x2, idx2, w2 = inputs(1, "cuda", torch.bfloat16, 100 + seed)
        x.copy_(x2), idx.copy_(idx2), w.copy_(w2)
        g.replay()
        torch.testing.assert_close(y, op(x, idx, w), rtol=0, atol=0)


@pytest.mark.gpu
def test_torch_op_cannot_be_captured():
    """The declaration 'not graph safe' is real: capture raises the error KTransformers users see."""
    ex = fake_experts("cuda", torch.bfloat16, 6)
    op = TorchEagerExperts(ex, torch.device("cuda"))
    x, idx, w = inputs(1, "cuda", torch.bfloat16, 6)
    op(x, idx, w)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(Exception, match="capturing|capture"):
        with torch.cuda.graph(g):
            op(x, idx, w)


def test_cpu_worker_runs_jobs_in_order_and_reraises():
    from ktcli.ops.worker import worker
    seen = []
    for i in range(20):
        worker().run(lambda i=i: seen.append(i))
    assert seen == list(range(20))
    with pytest.raises(ZeroDivisionError):
        worker().run(lambda: 1 / 0)
    worker().run(lambda: seen.append("after"))
    assert seen[-1] == "after"
