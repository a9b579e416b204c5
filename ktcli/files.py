"""Files every layer writes: results written atomically (a temp file in the same folder, then rename), and
ktcli's cache folder (demo checkpoint, compiled kernels, bandwidth readings)."""
from __future__ import annotations

import os
import tempfile


def output_problem(path: str) -> str | None:
    """Why `path` cannot receive a results file, checked before any work is done; None when it can."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a directory"
    if not os.path.exists(folder):
        parent = folder
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            return f"{parent} is a file, not a directory"
        return f"directory {folder} does not exist"
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a directory"
    if not os.access(folder, os.W_OK):
        return f"directory {folder} is not writable"
    return None


def write_atomic(path: str, text: str, make_dirs: bool = False) -> None:
    """Write `text` to `path` completely or not at all; the file gets the usual mode (0666 less the umask)."""
    folder = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)       # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cache_root() -> str:
    """$KTCLI_CACHE, or ~/.cache/ktcli."""
    return os.environ.get("KTCLI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ktcli")
