"""Engine: greedy output equals transformers' generate; prefix reuse; sampling; stops; context."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from ktcli.engine import ContextFull, Engine, GenerationConfig
from test_hybrid import PLACEMENTS, built
from tiny import make_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.getbasetemp(), "qwen3_moe")
    b = built(tmp_path_factory.mktemp("e"), ckpt, PLACEMENTS["mixed-ops"], prefill_chunk=8)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return b, ref


def greedy_ref(ref, ids, n):
    out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers_generate(setup):
    b, ref = setup
    e = Engine(b)
    ids = list(range(5, 40))                      # 35 tokens: several prefill chunks of 8
    new, st = e.generate(ids, GenerationConfig(max_new_tokens=24, ignore_eos=True))
    assert new == greedy_ref(ref, ids, 24)
    assert st.prompt_tokens == 35 and st.decode_tokens == 23 and st.stop_reason == "length"
    assert st.decode_tps > 0 and st.latency_ms(0.5) > 0


def test_second_turn_reuses_prefix_and_still_matches(setup):
    b, ref = setup
    e = Engine(b)
    ids = list(range(10, 30))
    new, _ = e.generate(ids, GenerationConfig(max_new_tokens=6, ignore_eos=True))
    ids2 = ids + new + [3, 4, 5]
    new2, st = e.generate(ids2, GenerationConfig(max_new_tokens=6, ignore_eos=True))
    assert st.prompt_tokens == 3 + 1     # only the new tokens (+ the last reply token not yet in the cache)
    assert new2 == greedy_ref(ref, ids2, 6)


def test_sampling_is_seeded(setup):
    b, _ = setup
    e = Engine(b)
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.8, seed=7, ignore_eos=True)
    assert e.generate([5, 6, 7], cfg)[0] == e.generate([5, 6, 7], cfg)[0]


def test_top_k_one_is_greedy(setup):
    b, _ = setup
    e = Engine(b)
    greedy = e.generate([5, 6, 7], GenerationConfig(max_new_tokens=8, ignore_eos=True))[0]
    sampled = e.generate([5, 6, 7], GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=1, seed=1,
                                                     ignore_eos=True))[0]
    assert greedy == sampled


def test_stops(setup):
    b, _ = setup
    e = Engine(b)
    first = e.generate([5, 6, 7], GenerationConfig(max_new_tokens=8, ignore_eos=True))[0]
    e.eos = {first[2]}
    new, st = e.generate([5, 6, 7], GenerationConfig(max_new_tokens=8))
    assert new == first[:3] and st.stop_reason == "eos"
    n = [0]
    new, st = e.generate([5, 6, 7], GenerationConfig(max_new_tokens=50, ignore_eos=True),
                         should_stop=lambda: (n.__setitem__(0, n[0] + 1), n[0] > 4)[1])
    assert st.stop_reason == "interrupted" and len(new) == 5
    # a stop string completed by token j ends the reply right after token j, exactly
    for j in range(1, 8):
        stop = b.tokenizer.decode(first[:j + 1])[-2:]
        cut = next(k for k in range(8) if stop in b.tokenizer.decode(first[:k + 1]))
        new, st = e.generate([5, 6, 7], GenerationConfig(max_new_tokens=8, ignore_eos=True, stop=(stop,)))
        assert (new, st.stop_reason) == (first[:cut + 1], "stop"), (j, stop)


def test_context_limits(setup):
    b, _ = setup
    e = Engine(b)
    with pytest.raises(ContextFull, match="the prompt has 256 tokens; the context holds 256"):
        e.generate([5] * 256, GenerationConfig(max_new_tokens=4))
    new, st = e.generate([5] * 250, GenerationConfig(max_new_tokens=40, ignore_eos=True))
    assert st.stop_reason == "context" and len(new) == 6


def test_a_step_from_embeddings_equals_a_step_from_ids(setup):
    """Graph decode with a CPU embedding (KTransformers' files) feeds the step its embeddings, looked up before
    each replay: the same logits as from the token id."""
    b, _ = setup
    e = Engine(b)
    e.prefill(list(range(5, 30)))
    tok, pos = torch.tensor([[17]]), torch.tensor([[25]])
    from_ids = e.forward(tok, pos)
    e.set_len(25)
    from_embeds = e.forward(tok, pos, b.model.get_input_embeddings()(tok))
    assert torch.equal(from_ids, from_embeds)


def test_openmp_sleeps_beside_a_gpu_unless_the_user_says_otherwise():
    """OMP_WAIT_POLICY=PASSIVE where a GPU is visible (torch's spinning OpenMP threads slowed the CPU expert
    kernel's team 2.2×), OpenMP's default without one (torch does the work there); a user's value is kept, and
    bench records the one in force. Decided before torch loads: a fresh interpreter shows it took effect there."""
    import os
    import subprocess
    import sys
    from ktcli.openmp import gpu_visible, settle
    gpu, none = (lambda p: p == "/dev/nvidiactl"), (lambda p: False)
    assert settle({}, gpu) == "PASSIVE" and settle({}, none) == ""
    assert settle({"OMP_WAIT_POLICY": "ACTIVE"}, gpu) == "ACTIVE"
    assert settle({"CUDA_VISIBLE_DEVICES": ""}, gpu) == "" and settle({"CUDA_VISIBLE_DEVICES": "0"}, gpu) == "PASSIVE"
    code = ("import os, ktcli, torch; from ktcli.engine.provenance import machine_info; "
            "print(os.environ.get('OMP_WAIT_POLICY', '-'), machine_info()['omp_wait_policy'] or '-')")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    want = "PASSIVE" if gpu_visible(env) else "-"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [want, want]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["ACTIVE", "ACTIVE"]


class _Trials:
    """A streamer that times its first three chunks for `auto`'s chunk policy."""

    def __init__(self):
        self.log = []

    def trialing(self, T):
        return len(self.log) < 3

    def chunk_policy(self, T):
        return ("plan", "plan", "routed", "routed")[len(self.log)]

    def observe_chunk(self, T, policy, seconds):
        self.log.append((T, policy, seconds > 0))

    def collect(self):
        pass


def test_prefill_times_the_chunks_auto_is_trialing(setup):
    b, _ = setup
    e = Engine(b)
    want = e.prefill(list(range(5, 40)))
    e.reset()
    b.streamer, st = _Trials(), b.streamer
    try:
        got = e.prefill(list(range(5, 40)))     # chunks of 8: 8, 8, 8, 8, 3
        log = b.streamer.log
    finally:
        b.streamer = st
    assert torch.equal(got, want) and log == [(8, "plan", True), (8, "plan", True), (8, "routed", True)]


def test_results_record_the_ktcli_switches_set():
    """A/B knobs (KTCLI_PREFILL_WAYS, KTCLI_SPLIT_JOIN, …) are not in a results file's command: its machine
    record names them; the cache path and the commit are recorded elsewhere or not at all."""
    from ktcli.engine.provenance import ktcli_env
    env = {"KTCLI_PREFILL_WAYS": "routed,split", "KTCLI_CACHE": "/tmp/c", "KTCLI_GIT_COMMIT": "abc", "HOME": "/root",
           "KTCLI_SPLIT_JOIN": "host"}
    assert ktcli_env(env) == {"KTCLI_PREFILL_WAYS": "routed,split", "KTCLI_SPLIT_JOIN": "host"}
