"""The split plan reads the routing earlier prefills measured: the GPU takes the most routed experts, the CPU's
share is costed by the pairs it gets, and a layer's counts are folded per prefill with a uniform prior."""
from __future__ import annotations

import torch
import pytest

from ktcli.ops.costs import PrefillRates, share_seconds, split_order, split_plan
from ktcli.ops.prefill import AutoPrefill
from ktcli.ops.stream import PRIOR
from test_stream import ckpt, routed, streamed_model  # noqa: F401  (ckpt: the module's checkpoint fixture)


def skewed(E, K, hot):
    """Pairs per token: `hot` experts take 3/4 of each token's K pairs, the rest share the last quarter."""
    return [0.75 * K / len(hot) if e in hot else 0.25 * K / (E - len(hot)) for e in range(E)]


def test_the_gpu_takes_the_most_routed_experts_and_the_cpu_share_is_costed_by_its_pairs(tmp_path, ckpt):
    layers, st = streamed_model(tmp_path, ckpt, "bf16")
    m, E, K, T = layers[0], layers[0].num_experts, st.top_k, 512
    rates = PrefillRates(pcie_bps=1e9, cpu_bps=1e9, cpu_flops=1e9)
    order, work = split_order(m, T, K, rates, None)
    assert order == list(range(E - 1, -1, -1)) and work[0] == 1.0 and work[E] == 0.0   # uniform: a tail, fractions
    hot = {1, 4}
    pop = skewed(E, K, hot)
    order, work = split_order(m, T, K, rates, pop)
    assert set(order[:2]) == hot                                   # the hottest first
    per = share_seconds(m, T, K, rates, [p * T for p in pop])
    assert work[0] == pytest.approx(sum(per)) and work[2] == pytest.approx(sum(per) - per[1] - per[4])
    assert all(a >= b for a, b in zip(work, work[1:])) and work[E] == pytest.approx(0.0, abs=1e-12)
    c = split_plan(m, T, K, rates)["cpu_s"]
    rates.pcie_bps = m.stream_src.nbytes() / c                     # copying the layer costs what the CPU does
    uni, aware = split_plan(m, T, K, rates), split_plan(m, T, K, rates, pop=pop)
    assert uni["way"] == aware["way"] == "split"
    assert uni["gpu"] == tuple(range(uni["n_cpu"], E))             # uniform: experts [n, E), as before
    assert hot <= set(aware["gpu"]) and aware["seconds"] < uni["seconds"]   # the hot pair costs two copies only
    assert aware["share_s"] == pytest.approx(work[E - aware["n_cpu"]])
    assert split_plan(m, T, K, rates, pop=[K / E] * E)["gpu"] == uni["gpu"]   # measured uniform: the same plan


def test_routing_is_counted_per_layer_and_folded_with_a_uniform_prior(tmp_path, ckpt):
    layers, st = streamed_model(tmp_path, ckpt, "int8")
    m, E, K = layers[0], layers[0].num_experts, st.top_k
    assert st.popularity(m) is None
    gen = torch.Generator().manual_seed(8)
    idx, _ = routed(300, E, K, gen)
    st.observe_routing(m, idx[:100])
    st.observe_routing(m, idx[100:])                               # two chunks of one prefill
    assert st.popularity(m) is None                                # folded at the prefill's end
    st.collect()
    counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()
    pop = st.popularity(m)
    assert pop == pytest.approx([(c + PRIOR * K / E) / (300 + PRIOR) for c in counts])
    assert sum(pop) == pytest.approx(K) and pop[E - 1] > 0         # never routed: still a little, from the prior
    assert st.popularity(layers[1]) is None
    st.observe_routing(m, idx[:100])
    st.collect()                                                   # the earlier prefill counts half
    again = torch.bincount(idx[:100].reshape(-1), minlength=E).tolist()
    assert st.popularity(m) == pytest.approx([(c / 2 + a + PRIOR * K / E) / (150 + 100 + PRIOR)
                                              for c, a in zip(counts, again)])


def test_auto_plans_with_the_routing_it_saw_and_matches_the_reference(tmp_path, ckpt):
    """A prefill through `auto` counts its routing; the next plans give the GPU the experts it saw most, and the
    split they run is still the eager layer."""
    from ktcli.ops.base import eager_reference
    layers, st = streamed_model(tmp_path, ckpt, "bf16")
    m, E, K, T = layers[0], layers[0].num_experts, st.top_k, 512
    op = m.ops["prefill"] = AutoPrefill(m, None, None)
    op._first = False
    st.rates = PrefillRates(pcie_bps=1e9, cpu_bps=1e9, cpu_flops=1e9)
    st.rates.pcie_bps = m.stream_src.nbytes() / op.plan(T)["cpu_s"]
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(T, m.hidden, generator=gen)
    idx = torch.stack([torch.tensor([2, 5])[torch.randperm(2, generator=gen)][:K] if t % 4 else
                       torch.randperm(E, generator=gen)[:K] for t in range(T)])   # experts 2 and 5: 3/4 of tokens
    w = torch.rand(T, K, generator=gen)
    st.observe_routing(m, idx)
    st.collect()
    p = op.plan(T)
    assert p["way"] == "split" and {2, 5} <= set(p["gpu"]) and op.gpu_set(T) == p["gpu"]
    got = op._route(x, idx, w)
    want = eager_reference(x, idx, w, m.gate_up_proj.float(), m.down_proj.float(), m.act_fn)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
