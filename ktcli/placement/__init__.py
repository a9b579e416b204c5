"""Placement: profile rules → a per-module plan (device + operator per stage). Pure functions."""
from .plan import Plan, ExpertsPlacement, StagePlacement, make_plan, normalize_device

__all__ = ["Plan", "ExpertsPlacement", "StagePlacement", "make_plan", "normalize_device"]
