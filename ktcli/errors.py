"""Known errors: the CLI turns each into one `Error: …` line plus a hint, never a traceback."""
from __future__ import annotations


class KtcliError(Exception):
    """A known, user-facing failure. `code` is the process exit status."""

    def __init__(self, message: str, hint: str | None = None, code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


class UsageError(KtcliError):
    """Bad flags or arguments: exit 2, like click's own usage errors."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint, code=2)


class ProfileError(KtcliError):
    """A profile that cannot be read: names file:line."""

    def __init__(self, where: str, message: str, hint: str | None = None):
        super().__init__(f"{where}: {message}", hint)
        self.where = where


class CheckpointError(KtcliError):
    pass
