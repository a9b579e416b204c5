"""model/overlap.py: the reordered MoE block forward is transformers' own, operation for operation."""
import inspect

import torch
from transformers.models.qwen2_moe import modeling_qwen2_moe

from ktcli.model.overlap import FORWARDS
from ktcli.ops.base import set_stage
from test_hybrid import PLACEMENTS, built
from tiny import make_checkpoint


def test_patched_blocks_give_the_same_logits_bit_for_bit(tmp_path_factory):
    """A qwen2_moe model built by ktcli (blocks patched) against the same build with transformers' own forward
    put back: identical logits in both stages, and every block was patched."""
    ckpt = make_checkpoint(tmp_path_factory.getbasetemp(), "qwen2_moe")
    b = built(tmp_path_factory.mktemp("p"), ckpt, PLACEMENTS["all-cpu-op"], dtype="bfloat16")
    blocks = [m for m in b.model.modules() if type(m).__name__ == "Qwen2MoeSparseMoeBlock"]
    assert blocks and all("forward" in vars(m) for m in blocks)
    ids = torch.randint(0, b.model.config.vocab_size, (1, 19), generator=torch.Generator().manual_seed(3))
    ids = ids.to(b.model.get_input_embeddings().weight.device)   # the GPU when there is one
    with torch.no_grad():
        for stage in ("prefill", "decode"):
            set_stage(b.model, stage)
            got = b.model(ids).logits
            for m in blocks:
                del m.forward                    # transformers' forward again
            want = b.model(ids).logits
            for m in blocks:                     # and ktcli's
                m.forward = FORWARDS["Qwen2MoeSparseMoeBlock"].__get__(m)
            assert torch.equal(got, want), stage


def test_the_reproduced_forward_is_still_transformers_own():
    """The overlapping forward copies transformers' Qwen2MoeSparseMoeBlock.forward in another order; if
    transformers changes that forward, this fails and the copy must be checked again."""
    src = inspect.getsource(modeling_qwen2_moe.Qwen2MoeSparseMoeBlock.forward)
    for line in ("shared_expert_output = self.shared_expert(hidden_states_reshaped)",
                 "_, routing_weights, selected_experts = self.gate(hidden_states_reshaped)",
                 "expert_output = self.experts(hidden_states_reshaped, selected_experts, routing_weights)",
                 "shared_expert_output = F.sigmoid(self.shared_expert_gate(hidden_states_reshaped)) * shared_expert_output",
                 "expert_output = expert_output + shared_expert_output"):
        assert line in src, line
    assert src.count("self.") == 4   # shared_expert, gate, experts, shared_expert_gate: nothing else


def test_the_shared_expert_goes_to_an_operator_that_takes_side_work_unless_turned_off(monkeypatch):
    """Qwen2's block hands its shared expert to the experts' operator as `side` (streamed or routed prefill runs it
    beside the upload), runs it itself when the operator did not, and KTCLI_PREFILL_SIDE=0 keeps it out."""
    import types
    from ktcli.model import overlap
    from ktcli.ops.base import HybridExperts
    x, idx, w = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2)
    ran = []

    class Op:                                   # an operator that declares it takes side work, and runs it
        takes_side = True

        def __call__(self, x, idx, w, side=None):
            ran.append("side" if side is not None else "none")
            if side is not None:
                side()
            return torch.zeros_like(x)
    experts = types.SimpleNamespace(ops={"prefill": Op()}, stage="prefill")
    experts.submit = lambda *a, side=None: HybridExperts.submit(experts, *a, side=side)
    experts.collect = lambda job: HybridExperts.collect(experts, job)
    calls = []
    block = types.SimpleNamespace(gate=lambda t: (None, w, idx), experts=experts,
                                  shared_expert_gate=lambda t: torch.zeros(t.shape[0], 1),
                                  shared_expert=lambda t: calls.append(1) or torch.ones_like(t))
    for on, want in ((True, "side"), (False, "none")):
        monkeypatch.setattr(overlap, "_SIDE", on)
        ran.clear()
        calls.clear()
        y = overlap._qwen2_moe_forward(block, x[None])
        assert ran == [want] and len(calls) == 1                   # once, by the operator or by the block
        assert torch.equal(y[0], torch.full_like(x, 0.5))          # sigmoid(0) × 1 + the experts' 0
