"""`gpu_static`: graph-safe experts — static shapes, no host sync, no data-dependent control flow.

Shape legend: T tokens, H hidden, I intermediate, E experts, K top-k, S = T*K token-expert pairs.
"""
import torch

from .base import DeviceOp

GATHER_MAX_PAIRS = 64   # up to this many (token, expert) pairs, gathering weights beats looping over E


class GpuStaticExperts(DeviceOp):
    def compute(self, x, idx, w):
        gate_up, down = self.experts.weights_on(self.device)
        T, K = idx.shape
        if T * K <= GATHER_MAX_PAIRS:
            return self._gather(x, idx, w, gate_up, down)
        return self._dense(x, idx, w, gate_up, down)

    def _gather(self, x, idx, w, gate_up, down):
        T, K = idx.shape
        flat = idx.reshape(-1)                                                # [S]
        xs = x.repeat_interleave(K, dim=0).unsqueeze(-1)                     # [S,H,1]
        gu = torch.bmm(gate_up[flat], xs).squeeze(-1)                          # [S,2I]
        gate, up = gu.chunk(2, dim=-1)
        h = (self.experts.act_fn(gate) * up).unsqueeze(-1)                    # [S,I,1]
        y = torch.bmm(down[flat], h).squeeze(-1)                               # [S,H]
        y = y.view(T, K, -1) * w.unsqueeze(-1).to(y.dtype)
        return y.sum(dim=1).to(x.dtype)

    def _dense(self, x, idx, w, gate_up, down):
        """Every expert over every token, weighted by a dense [T,E] routing matrix: fixed work, any T."""
        T, E = x.shape[0], gate_up.shape[0]
        dense = torch.zeros(T, E, dtype=x.dtype, device=x.device).scatter_(1, idx, w.to(x.dtype))   # [T,E]
        out = torch.zeros_like(x)
        for e in range(E):
            gate, up = torch.nn.functional.linear(x, gate_up[e]).chunk(2, dim=-1)
            out += torch.nn.functional.linear(self.experts.act_fn(gate) * up, down[e]) * dense[:, e:e + 1]
        return out
