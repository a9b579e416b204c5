"""What a run measured of `auto` prefill's ways, per way and chunk-length bucket (a bucket: lengths of one
bit_length), for the plans of the next chunks: the CPU's time against its probed time (a scale and a fixed part),
each way's shortest wait for its inputs, and the routing's skew. Mixed into the Streamer, which owns the layers.

Ways: 'cpu' (a whole layer on the CPU), 'split' (the range split's CPU share, beside the copies), 'routed' (a
routed layer's CPU share, beside its copies).
"""
from __future__ import annotations


TRIAL_GAIN = 0.95    # chunk_policy: routing every layer must save this much of the plan's time


class Calibration:
    def init_calibration(self) -> None:
        self.cpu_scale: dict = {}       # (way, bucket) → measured ÷ probed seconds
        self._splits: list = []         # (way, T, measured s, probed s) of this prefill's layers
        self._obs: dict = {}            # (way, bucket) → [(probed, measured)] of the last prefill that measured it
        self.cpu_fixed: dict = {}       # (way, bucket) → the fitted fixed seconds of a layer's work
        self.waits: dict = {}           # (way, bucket) → the shortest wait a layer of that way had for its inputs
        self.profiles: dict = {}        # bucket → a routed layer's pairs per expert as fractions, most routed first
        self.trials: dict = {}          # bucket → {'plan'/'routed': [s/token] of timed chunks, 'warm': {run once}}

    def observe_cpu(self, way: str, T: int, measured: float, probed: float) -> None:
        """A layer's CPU work ('split': its share of a split layer; 'cpu': the whole layer) took `measured` seconds
        where the probed rates said `probed`."""
        if way == "split":
            self.stats["split_cpu_s"] += measured
        self._splits.append((way, T, measured, probed))

    def _calibrate(self) -> None:
        """The next chunks of each length plan with the CPU time this prefill's layers of each way measured:
        measured = fixed + scale × probed, fitted over this prefill's and the previous one's layers where their
        probed times differ (a split's share changes with the scale), else a scale alone from this prefill's
        (replaced, not averaged: the share changes with the scale, and so may the contention). Why the fixed
        part: a split's CPU time is not proportional to its share (int8 pp2048, 2026-12-06: 3.5× its probe at the
        smaller share, 1× at the larger), so one scale learnt at one share misplans the next."""
        by = {}
        for way, T, m, p in self._splits:
            by.setdefault((way, T.bit_length()), []).append((p, m))
        for key, obs in by.items():
            fit = fit_fixed(self._obs.get(key, []) + obs)
            if fit is not None:
                self.cpu_fixed[key], self.cpu_scale[key] = fit
            elif (p := sum(o[0] for o in obs)) > 0:
                self.cpu_fixed[key], self.cpu_scale[key] = 0.0, max(sum(o[1] for o in obs) / p, 0.25)
            self._obs[key] = obs
        self._splits = []

    def chunk_policy(self, T: int) -> str:
        """'routed' (every `auto` layer of a chunk of T tokens takes the routed way) or 'plan' (each its calibrated
        plan): per chunk-length bucket each policy first runs one chunk cold (allocations, kernels compiled: not
        kept), then one chunk of each is timed whole, then the faster is kept, routed for ≥ 5% less. Why whole
        chunks: the plan's per-layer prediction missed the routed way's host time (int4 pp2048, 2026-12-06:
        calibrated, it streamed at 7,102 t/s where routed layers had run 9,145). Why a cold chunk each: timed in
        its first chunk, routing lost int8 pp512 (1.22 against 0.41 ms a token warm; 1,273 t/s kept, 3,056 routed)."""
        t = self.trials.get(T.bit_length())
        if t is None or not self._routes(T):
            return "plan"
        if t["plan"] and t["routed"]:
            return "routed" if min(t["routed"]) <= TRIAL_GAIN * min(t["plan"]) else "plan"
        if "routed" not in t["warm"]:
            return "routed"
        return "routed" if t["plan"] else "plan"

    def trialing(self, T: int) -> bool:
        """Whether the next chunk of T tokens is timed for chunk_policy (the engine then syncs around it)."""
        t = self.trials.get(T.bit_length())
        return self._routes(T) and (t is None or not (t["plan"] and t["routed"]))

    def trial_report(self, policy=None) -> dict:
        """{shortest chunk length of a bucket: {'plan'/'routed': [ms per token of each timed chunk], 'policy': the
        one kept}}; `policy`: the chunk_policy that decides (several GPUs: Streamers')."""
        policy = policy or self.chunk_policy
        return {str(1 << (b - 1)): {**{k: [1e3 * v for v in t[k]] for k in ("plan", "routed")},
                                    "policy": policy(1 << (b - 1))} for b, t in sorted(self.trials.items())}

    def observe_chunk(self, T: int, policy: str, seconds: float) -> None:
        t = self.trials.setdefault(T.bit_length(), {"plan": [], "routed": [], "warm": set()})
        if policy in t["warm"]:
            t[policy].append(seconds / T)
        else:                       # the policy's first chunk of this bucket: cold, not a measurement
            t["warm"].add(policy)

    def _routes(self, T: int) -> bool:
        from . import kernels
        from .prefill import AutoPrefill, prefill_ways
        return ("routed" in prefill_ways() and T > kernels.MAX_TOKENS
                and any(isinstance(m.ops.get("prefill"), AutoPrefill) for m in self.layers))

    def observe_wait(self, way: str, T: int, seconds: float) -> None:
        """A CPU-way or split layer waited `seconds` for its inputs: the GPU's work before it, which that way runs
        in series with the CPU's (streaming overlaps it with the copies). The shortest wait per bucket is kept: a
        longer one also holds the previous layer's GPU share where that was the slower side (2026-12-06, H100 host:
        the waits were why int8 pp2048 split ran 2,836 t/s against 3,800 streaming)."""
        key = (way, T.bit_length())
        self.waits[key] = min(self.waits.get(key, seconds), seconds)

    def observe_routing(self, T: int, counts: list) -> None:
        """A routed layer's pairs per expert: the plan of the next routed layers of that chunk-length bucket
        predicts with their skew (routed.expected_counts)."""
        n = sum(counts)
        if n:
            self.profiles[T.bit_length()] = [c / n for c in sorted(counts, reverse=True)]

    def profile(self, T: int):
        return self.profiles.get(T.bit_length())

    def wait(self, way: str, T: int) -> float:
        return self.waits.get((way, T.bit_length()), 0.0)

    def observed(self, way: str, T: int) -> bool:
        """Whether layers of this way and chunk-length bucket have measured the CPU, in an earlier prefill or in
        this one (whose measurements replace the scale only after it)."""
        b = T.bit_length()
        return (way, b) in self.cpu_scale or any(w == way and t.bit_length() == b for w, t, _, _ in self._splits)

    def scale(self, way: str, T: int) -> float:
        return self.cpu_scale.get((way, T.bit_length()), 1.0)

    def fixed(self, way: str, T: int) -> float:
        """Seconds a layer of that way spends on the CPU whatever its share (_calibrate's fit; 0 before one)."""
        return self.cpu_fixed.get((way, T.bit_length()), 0.0)

    def calibration(self, way: str = "split") -> dict:
        """{shortest chunk length of a bucket: measured ÷ probed CPU time} of one way (a bucket: lengths of one
        bit_length)."""
        return {1 << (b - 1): v for (w, b), v in sorted(self.cpu_scale.items()) if w == way}


def fit_fixed(obs: list, spread: float = 1.5):
    """(fixed, scale) of measured = fixed + scale × probed by least squares over [(probed, measured)], or None
    where the probed times span less than `spread`× (too little to tell a fixed part from the scale). The scale
    stays ≥ 0.25 and the fixed part ≥ 0 (the fit is then redone for the other)."""
    ps = [p for p, _ in obs if p > 0]
    if len(ps) < 2 or max(ps) < spread * min(ps):
        return None
    n = len(obs)
    mp, mm = sum(p for p, _ in obs) / n, sum(m for _, m in obs) / n
    var = sum((p - mp) ** 2 for p, _ in obs)
    b = max(sum((p - mp) * (m - mm) for p, m in obs) / var, 0.25)
    a = mm - b * mp
    if a < 0:
        a, b = 0.0, max(sum(m for _, m in obs) / sum(p for p, _ in obs), 0.25)
    return a, b
