"""Files every layer writes: results written atomically (a temp file in the same folder, then rename), and
ktcli's cache folder (demo checkpoint, compiled kernels, bandwidth readings)."""
from __future__ import annotations

import os
import tempfile


def write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cache_root() -> str:
    """$KTCLI_CACHE, or ~/.cache/ktcli."""
    return os.environ.get("KTCLI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ktcli")
