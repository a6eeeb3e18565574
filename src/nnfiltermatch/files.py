"""Files: atomic writes (a temporary file in the same folder, then ``os.replace``, so a crash or a reader never sees
a half-written result), content hashes, paths in messages, and the checks for a full disk or an unwritable folder."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from pathlib import Path

LOW_DISK_BYTES = 64 * 2**20  # below this much free space, a failed write is taken for a full disk


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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def relative_posix(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """``path`` relative to ``root`` with ``/`` separators, as messages name files; the whole path when it is not
    under ``root``."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def disk_full_reason(exc: BaseException, folder: str | os.PathLike[str]) -> str | None:
    """Why ``exc`` looks like a full disk under ``folder``, or None: ENOSPC/EDQUOT anywhere in its chain, or a plain
    RuntimeError (or an OSError without errno) while almost no space is left.

    The second case is needed because blosc2 (nnU-Net's preprocessed files) reports a full disk as a plain
    RuntimeError. Measure before removing partial output, which frees the space again.
    """
    free = shutil.disk_usage(folder).free
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{seen}; {format_size(free)} free"
        seen = seen.__cause__ or seen.__context__
    unexplained = type(exc) is RuntimeError or (isinstance(exc, OSError) and exc.errno is None)
    if unexplained and free < LOW_DISK_BYTES:
        return f"{type(exc).__name__}: {exc}; only {format_size(free)} free"
    return None


def format_size(n: float) -> str:
    """Bytes for people: 512 bytes, 3.0 MiB, 1.2 GiB."""
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


class NotWritableError(ValueError):
    """An output location this process cannot write to; raised before any work starts."""


def require_writable(path: str | os.PathLike[str], option: str, is_file: bool = False) -> None:
    """Refuse an output folder (or a file's folder) that cannot be created or written in, naming the option.

    A real probe file rather than ``os.access``: root passes every permission check but not a read-only mount, and
    a PermissionError after an hour of training helps nobody.
    """
    target = Path(path).absolute()
    folder = target.parent if is_file else target
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotWritableError(f"{option} {path}: {existing} is a file, not a folder")
    probe = existing / f".nnfm-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise NotWritableError(
            f"{option} {path}: cannot write in {existing} ({exc.strerror}); choose a folder you can write to, or "
            "fix its permissions"
        ) from None
