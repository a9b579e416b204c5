"""Profile: YAML → validated dataclasses, with file:line on every error."""
from .schema import Profile, Rule, Runtime, load_profile, apply_overrides

__all__ = ["Profile", "Rule", "Runtime", "load_profile", "apply_overrides"]
