"""Sampling: each setting draws from the distribution it names (frequencies within ~5σ), and seeds repeat.

A sampler that ignores temperature, top-k or top-p, or the seed, fails here.
"""
import torch

from ktcli.engine.sampling import sample

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
N = 12000


def freqs(n=N, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(LOGITS))
    for _ in range(n):
        counts[int(sample(LOGITS, generator=g, **kw))] += 1
    return counts / n


def close(got, want, sigmas=5.0):
    sd = (want * (1 - want) / N).sqrt().clamp_min(1e-4)
    return bool(((got - want).abs() <= sigmas * sd + 1e-9).all())


def test_temperature_zero_is_argmax():
    for _ in range(5):
        shuffled = LOGITS[torch.randperm(6)]
        assert int(sample(shuffled, 0.0, 0, 1.0)) == int(shuffled.argmax())


def test_temperature_scales_the_distribution():
    for t in (0.5, 1.0, 2.0):
        want = (LOGITS / t).softmax(-1)
        got = freqs(temperature=t, top_k=0, top_p=1.0)
        assert close(got, want), (t, got, want)
    assert not close(freqs(temperature=0.5, top_k=0, top_p=1.0), LOGITS.softmax(-1))   # the test tells them apart


def test_top_k_keeps_the_k_most_likely_renormalised():
    got = freqs(temperature=1.0, top_k=2, top_p=1.0)
    want = torch.zeros(6)
    want[:2] = LOGITS[:2].softmax(-1)
    assert got[2:].sum() == 0 and close(got, want)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    p = LOGITS.softmax(-1)                       # 0.46, 0.28, 0.17, … : mass 0.74 after two tokens
    got = freqs(temperature=1.0, top_k=0, top_p=0.7)
    want = torch.zeros(6)
    want[:2] = p[:2] / p[:2].sum()
    assert got[2:].sum() == 0 and close(got, want)
    got = freqs(temperature=1.0, top_k=0, top_p=0.8)   # 0.74 < 0.8: a third token is needed
    want = torch.zeros(6)
    want[:3] = p[:3] / p[:3].sum()
    assert got[3:].sum() == 0 and close(got, want)


def test_seeds_repeat_and_differ():
    def draw(seed, n=40):
        g = torch.Generator().manual_seed(seed)
        return [int(sample(LOGITS, 1.0, 0, 1.0, g)) for _ in range(n)]
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
