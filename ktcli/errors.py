"""Known errors: the CLI turns each into one `Error: …` line plus a hint, never a traceback.

Exit codes, one per kind of mistake (docs/reference.md lists them, generated from EXIT_CODES):
"""
from __future__ import annotations

EXIT_CODES = {
    0: "success (validate-config: the plan can run)",
    1: "the run cannot go ahead as configured (a pre-launch check failed, or it failed while running)",
    2: "usage: a flag, argument or output path is wrong",
    3: "profile: the profile file cannot be read or breaks a rule of the schema",
    4: "model: the model or checkpoint is missing, damaged, or lacks what the command needs",
}


class KtcliError(Exception):
    """A known, user-facing failure. `code` is the process exit status."""

    def __init__(self, message: str, hint: str | None = None, code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


class UsageError(KtcliError):
    """Bad flags, arguments or output paths: exit 2, like click's own usage errors."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint, code=2)


class ProfileError(KtcliError):
    """A profile that cannot be read: names file:line."""

    def __init__(self, where: str, message: str, hint: str | None = None):
        super().__init__(f"{where}: {message}", hint, code=3)
        self.where = where


class CheckpointError(KtcliError):
    """A model or checkpoint that is missing, damaged or incomplete."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint, code=4)
