"""`torch`: transformers' eager expert loop. Not graph safe (nonzero/where → host sync, dynamic shapes)."""
from .base import DeviceOp, eager_reference


class TorchEagerExperts(DeviceOp):
    def compute(self, x, idx, w):
        gate_up, down = self.experts.weights_on(self.device)
        return eager_reference(x, idx, w, gate_up, down, self.experts.act_fn)
