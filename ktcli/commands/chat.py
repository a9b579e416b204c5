"""Chat with a model (not yet built: exits 1)."""
from ..errors import KtcliError


def chat():
    raise KtcliError("chat is not implemented yet")
