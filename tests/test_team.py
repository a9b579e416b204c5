"""The kernel's own thread team and its one-argument entry point moe_host (the CUDA host function's target),
against the plain call and the fp32 reference, on fresh random inputs. CPU only: the host function's graph path
is in test_graphs.py."""
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from ktcli.ops import clocks, kernels
from ktcli.ops.quant import pack
from test_kernels import case, reference, rel

lib = kernels.get()
pytestmark = pytest.mark.skipif(lib is None, reason=f"kernel did not build: {kernels.error()}")


def layer(fmt, T, seed, E=8, H=64, I=32, K=3):
    gu, dn, x, idx, w = case(E, H, I, K, T, seed)
    ew = pack(fmt, gu.bfloat16(), dn.bfloat16()) if fmt == "bf16" else pack(fmt, gu, dn, group=32)
    return ew, x, idx, w, reference(ew, x, idx, w, E)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("threads", [1, 3, 16])
def test_moe_host_equals_the_plain_call_from_any_thread(fmt, threads):
    """moe_host(block), called as CUDA would (a raw C function pointer, from another thread), writes what
    moe_call writes; 16 members on this machine's few cores are not pinned, and share the work with any number
    that join."""
    seed = torch.randint(0, 2**30, ()).item()
    ew, x, idx, w, want = layer(fmt, 4, seed)
    run = kernels.Runner()
    plain = torch.empty_like(x)
    run(lib, x, idx, w, ew, plain, threads)
    out = torch.full_like(x, float("nan"))
    block = run.prepare(lib, x, idx, w, ew, out, threads)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(ctypes.cast(lib.moe_host, ctypes.c_void_p).value)
    t = threading.Thread(target=fn, args=(block.addr,))
    t.start()
    t.join()
    assert block.call.rc == 0 and torch.equal(out, plain), seed
    assert rel(out, want) <= 3e-2, seed
    team = kernels.team()
    assert team["threads"] == threads
    if threads > len(os.sched_getaffinity(0)):
        assert not team["pinned"]


def test_many_calls_from_two_threads_stay_exact():
    """Calls from two threads at once (serialized by the team's lock), each 200 times with a 9-member team on
    fewer cores: every result equals the single-threaded call (no task lost or done twice when members join
    late or not at all)."""
    cases = [layer(f, T, 100 + i) for i, (f, T) in enumerate([("int8", 3), ("bf16", 16), ("int4", 1)])]
    want = []
    for ew, x, idx, w, _ in cases:
        o = torch.empty_like(x)
        kernels.Runner()(lib, x, idx, w, ew, o, 1)
        want.append(o)
    bad = []

    def hammer(k):
        ew, x, idx, w, _ = cases[k]
        run, o = kernels.Runner(), torch.empty_like(x)
        for _ in range(200):
            o.fill_(float("nan"))
            run(lib, x, idx, w, ew, o, 9)
            if not torch.equal(o, want[k]):
                bad.append(k)
    ts = [threading.Thread(target=hammer, args=(k,)) for k in (0, 1, 2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not bad


def test_refused_host_call_is_counted_once_and_raised():
    """An expert id outside [0, E) is refused: the block's rc is -1, the host-function error counter counts it
    (what a graph replay reports), and the eager step raises it and consumes the count."""
    ew, x, idx, w, _ = layer("bf16", 2, 5)
    bad = idx.clone()
    bad[1, 0] = 99
    out = torch.empty_like(x)
    block = kernels.Runner().prepare(lib, x, bad, w, ew, out, 2)
    kernels.host_errors()
    lib.moe_host(block.addr)
    assert block.call.rc == -1 and kernels.host_errors() == 1 and kernels.host_errors() == 0
    with pytest.raises(RuntimeError, match="refused"):
        block.run_host(lib)
    assert kernels.host_errors() == 0


def test_the_kernel_counts_its_calls_for_the_clocks():
    """Host steps count as CPU-expert layer calls and kernel calls in take_all(); the fastest call's rate is
    offered to the bandwidth ceiling."""
    ew, x, idx, w, _ = layer("int8", 1, 9)
    clocks.take_all()
    clocks.KernelRate.take()
    out = torch.empty_like(x)
    block = kernels.Runner().prepare(lib, x, idx, w, ew, out, 2)
    for _ in range(5):
        block.run_host(lib)
    c = clocks.take_all()
    assert c["cpu_layer_calls"] == 5 and c["kernel_s"] > 0 and c["cpu_step_s"] >= c["kernel_s"]
    assert clocks.fixed_cost_us(c) is not None
    assert clocks.KernelRate.take() > 0


def test_shutdown_restarts_and_knobs_restart_the_team():
    """moe_shutdown (registered at exit) joins the workers; the next call starts a new team; a new pin setting
    restarts it too; results are unchanged throughout."""
    ew, x, idx, w, _ = layer("int4", 3, 11)
    ref, out = torch.empty_like(x), torch.empty_like(x)
    run = kernels.Runner()
    run(lib, x, idx, w, ew, ref, 4)
    lib.moe_shutdown()
    assert kernels.team()["threads"] == 0
    run(lib, x, idx, w, ew, out, 4)
    assert torch.equal(out, ref) and kernels.team()["threads"] == 4
    pinning = kernels.tune()[kernels.KNOBS.index("pin")]
    was = kernels.tune(pin=1 - pinning)
    try:
        assert kernels.team()["threads"] == 0
        run(lib, x, idx, w, ew, out, 4)
        assert torch.equal(out, ref)
        assert kernels.team()["pinned"] == (pinning == 0 and len(os.sched_getaffinity(0)) >= 4)
    finally:
        kernels.tune(*was)


SCRIPT = """
import sys, time, torch
from ktcli.ops import kernels
from ktcli.ops.quant import pack
lib = kernels.get()
E, H, I = 8, 256, 128
ew = pack("bf16", torch.randn(E, 2 * I, H).bfloat16(), torch.randn(E, H, I).bfloat16())
x, idx, w, out = torch.randn(2, H), torch.tensor([[1, 2], [3, 4]]), torch.rand(2, 2), torch.empty(2, H)
run = kernels.Runner()
print("ready", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    run(lib, x, idx, w, ew, out, 6)
print("done", flush=True)
"""


@pytest.mark.parametrize("how", ["exit", "sigint"])
def test_the_team_ends_with_the_process(how):
    """A process whose kernel team is busy exits promptly, at the end of its script and after Ctrl-C (SIGINT
    while calls are running): the workers neither hang the exit nor crash it."""
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, "1" if how == "exit" else "60"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    if how == "sigint":
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the process did not exit")
    if how == "exit":
        assert p.returncode == 0 and "done" in out, err
    else:
        assert p.returncode != 0 and "KeyboardInterrupt" in err and "Segmentation" not in err, err


def test_flag_server_runs_each_step_the_gpu_asks_for():
    """csrc/flags.h without a GPU: this test writes go = i as the graph would and waits for done == i; the C
    thread runs step i's block, in order, for two armed replays; a step number outside the table is counted as
    an error and still answered (the GPU must never wait forever); an arm whose replay never came does not block
    the next one."""
    from ktcli.ops.steps import _Req
    cases = [layer(f, 1, 200 + i) for i, f in enumerate(("bf16", "int8", "int4"))]
    run, outs, blocks, want = kernels.Runner(), [], [], []
    for ew, x, idx, w, _ in cases:
        o, r = torch.full_like(x, float("nan")), torch.empty_like(x)
        run(lib, x, idx, w, ew, r, 2)
        blocks.append(run.prepare(lib, x, idx, w, ew, o, 2))
        outs.append(o)
        want.append(r)
    words = torch.zeros(32, dtype=torch.int32)
    go, done = words.data_ptr(), words.data_ptr() + 64
    table = (ctypes.c_void_p * 3)(*(b.addr for b in blocks))
    req = _Req(go, done, ctypes.addressof(table), 3)
    g = (ctypes.c_uint32 * 1).from_address(go)
    d = (ctypes.c_uint32 * 1).from_address(done)

    def step(i):
        g[0] = i
        t0 = time.time()
        while d[0] != i:
            assert time.time() - t0 < 30, f"step {i} not answered"
        d[0] = 0
    kernels.host_errors()
    for _ in range(2):
        for o in outs:
            o.fill_(float("nan"))
        assert lib.moe_flags_arm(ctypes.addressof(req)) == 0
        for i in (1, 2, 3):
            step(i)
        assert all(torch.equal(o, r) for o, r in zip(outs, want))
    assert lib.moe_flags_arm(ctypes.addressof(req)) == 0
    step(7)
    step(1)
    step(3)                                      # the last step: the thread disarms itself
    assert kernels.host_errors() == 1
    assert lib.moe_flags_arm(ctypes.addressof(req)) == 0   # armed, and the replay never comes (Ctrl-C) …
    assert lib.moe_flags_arm(ctypes.addressof(req)) == 0   # … the next arm neither waits nor is lost
    for _ in range(2):                                     # both armed replays are served (the second drains the
        for o in outs:                                     # count, so the thread sleeps again: no spinning core
            o.fill_(float("nan"))                          # left behind for the rest of the suite)
        for i in (1, 2, 3):
            step(i)
        assert all(torch.equal(o, r) for o, r in zip(outs, want))


def test_environment_sets_spin_and_pinning():
    """KTCLI_CPU_SPIN_US and KTCLI_CPU_PIN are read when the library loads (README's environment list)."""
    code = "from ktcli.ops import kernels; kernels.get(); w = kernels.tune(); print(w[4], w[5])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "KTCLI_CPU_SPIN_US": "7", "KTCLI_CPU_PIN": "1"}).stdout.split()
    assert out == ["7", "1"]
