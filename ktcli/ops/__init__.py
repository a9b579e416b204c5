"""Expert operators. Each one declares what it can do in the registry; checks read the declarations."""
from .registry import OPERATORS, Operator, resolve_op, op_names

__all__ = ["OPERATORS", "Operator", "resolve_op", "op_names"]
