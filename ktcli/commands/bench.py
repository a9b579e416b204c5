"""Benchmark a model (not yet built: exits 1)."""
from ..errors import KtcliError


def bench():
    raise KtcliError("bench is not implemented yet")
