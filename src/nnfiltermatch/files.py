"""Atomic file writes: a temporary file in the same folder, then ``os.replace``, so a crash or a reader never sees
a half-written result."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> Path:
    """Write ``payload`` to ``path`` via a temporary file in the same folder; the temporary file never outlives a
    failure. The file gets the permissions a plain ``open()`` gives (0666 minus the umask), not ``mkstemp``'s 0600,
    so plans, reports and results stay readable by whoever could read the folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text through ``atomic_write_bytes``."""
    return atomic_write_bytes(path, text.encode("utf-8"))
