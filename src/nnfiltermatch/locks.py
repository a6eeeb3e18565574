"""One run at a time per folder: a lock file naming its owner, so a second run stops instead of corrupting the first.

Why a file and not ``fcntl.flock``: the lock must say *who* holds it (pid, host, start time, command line) so the
second run can name the first, and it must work the same on network file systems where advisory locks are
unreliable. The price is stale locks after a SIGKILL; they are recognised on the same host (the pid is gone, a
zombie, or now another process; or the machine restarted since) and taken over with a note. A lock from another
host is never assumed stale: its process cannot be checked from here.

Pure standard library, so any command can take a lock before it imports torch or nnU-Net.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

LOCK_NAME = ".nnfiltermatch.lock"
UNREADABLE_STALE_SECONDS = 60.0  # an unreadable lock younger than this may be one being written right now
TAKEOVER_STALE_SECONDS = 30.0  # the take-over guard lives milliseconds; older, its owner died while holding it
_ATTEMPTS = 5

# locks this process holds, so a nested run_lock on the same file (selftrain's stages) does not refuse itself
_HELD: dict[tuple[int, str], tuple[LockHolder, int]] = {}


class LockError(RuntimeError):
    """Another run holds the lock; the message names it and says what to do."""

    def __init__(self, message: str, path: Path, holder: LockHolder | None) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says about the run that holds it."""

    pid: int
    host: str
    started: str  # ISO time with the UTC offset
    command: str
    what: str
    token: str  # random, so "still ours" means this very acquisition, not just this pid
    boot_id: str | None = None  # Linux: tells a lock from before a restart (pids start again from 1)
    pid_start: str | None = None  # Linux: the process's start time in ticks, to tell a reused pid

    @classmethod
    def current(cls, what: str) -> LockHolder:
        argv = [os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.now().astimezone().isoformat(timespec="seconds"),
            command=shlex.join(argv),
            what=what,
            token=uuid.uuid4().hex,
            boot_id=_boot_id(),
            pid_start=_process_start(os.getpid()),
        )

    @classmethod
    def parse(cls, payload: bytes) -> LockHolder | None:
        """The holder a lock file describes, or None when it is not one of ours (empty, half-written, garbage)."""
        try:
            data: Any = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        pid = data.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:  # kill(0 or -1, 0) means a whole group
            return None
        text = {k: str(data.get(k) or "") for k in ("host", "started", "command", "what", "token")}
        optional = {k: (str(data[k]) if data.get(k) else None) for k in ("boot_id", "pid_start")}
        return cls(pid=pid, **text, **optional)

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode("utf-8")

    def describe(self) -> str:
        what = f"{self.what}, " if self.what else ""
        return (
            f"{what}pid {self.pid} on host {self.host or '?'}, started {self.started or '?'}, "
            f"command `{self.command or '?'}`"
        )


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces and parentheses); None off Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None  # field 22, starttime


def stale_reason(holder: LockHolder | None, age_seconds: float) -> str | None:
    """Why the lock of ``holder`` is left over from a run that is gone, or None while that run may still be alive.

    ``holder`` None: the file is not readable as a lock; it counts as stale only once it is older than a minute,
    since a run that just created it may not have written it yet.
    """
    if holder is None:
        if age_seconds > UNREADABLE_STALE_SECONDS:
            return f"the file is not a readable lock and is {age_seconds:.0f} s old"
        return None
    if holder.host != socket.gethostname():
        return None
    here = _boot_id()
    if holder.boot_id and here and holder.boot_id != here:
        return "it was written before this machine last started"
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return f"process {holder.pid} is no longer running"
    except PermissionError:
        pass  # alive, owned by another user
    fields = _proc_stat(holder.pid)
    if fields and fields[0] == "Z":
        return f"process {holder.pid} has exited (a zombie)"
    now = _process_start(holder.pid)
    if holder.pid_start and now and now != holder.pid_start:
        return f"pid {holder.pid} now belongs to another process"
    return None


def _read(path: Path) -> tuple[bytes, float] | None:
    """The lock file's bytes and age in seconds; None when it does not exist (any more)."""
    try:
        with open(path, "rb") as handle:
            payload = handle.read()
            age = time.time() - os.fstat(handle.fileno()).st_mtime
    except FileNotFoundError:
        return None
    return payload, max(0.0, age)


def _held_message(path: Path, what: str, holder: LockHolder | None, age: float) -> str:
    if holder is None:
        return (
            f"{what}: {path} exists but is not a readable lock ({age:.0f} s old): another run may be creating it "
            f"right now. Wait a minute and try again (an unreadable lock older than {UNREADABLE_STALE_SECONDS:.0f} "
            f"s is taken over); if no other run is starting, delete {path}."
        )
    if holder.host != socket.gethostname():
        return (
            f"{what}: {path} is held by another run: {holder.describe()}. That host is not this one "
            f"({socket.gethostname()}), so whether the run is still alive cannot be checked from here and the lock is "
            f"never taken over. Two runs on one folder would overwrite each other's files: wait for it to finish; if "
            f"you are sure it is no longer running, delete {path} and try again."
        )
    return (
        f"{what}: {path} is held by another run: {holder.describe()}. Two runs on one folder would overwrite each "
        f"other's files: wait for it to finish (or stop it: kill {holder.pid}) and try again; if you are sure it is "
        f"no longer running, delete {path}."
    )


def _note(message: str) -> None:
    print(f"nnfiltermatch: note: {message}", file=sys.stderr, flush=True)


def _remove_if_unchanged(path: Path, seen: bytes) -> bool:
    """Delete the stale lock ``path`` if it still holds ``seen``, under a short take-over guard; True if deleted.

    Why a guard: two runs that both judged the same lock stale must not both delete "it": the slower one would
    delete the lock the faster one has just created. Creating a lock never needs the guard (O_EXCL decides).
    """
    guard = path.with_name(path.name + ".takeover")
    for _ in range(2):
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                guard_age = time.time() - guard.stat().st_mtime
            except FileNotFoundError:
                continue
            if guard_age > TAKEOVER_STALE_SECONDS:
                guard.unlink(missing_ok=True)
                continue
            time.sleep(0.1)
            return False  # another run is taking it over right now; the caller tries O_EXCL again and sees who won
        os.close(fd)
        try:
            current = _read(path)
            if current is None or current[0] != seen:
                return False
            path.unlink()
            return True
        finally:
            guard.unlink(missing_ok=True)
    return False


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; the ones this call created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    created = []
    for p in missing:
        try:
            p.mkdir()
            created.append(p)
        except FileExistsError:
            pass
    return created


def _remove_if_empty(folders: list[Path]) -> None:
    """Folders the lock created and nothing else filled (a refused run leaves no empty model folder behind)."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def _acquire(path: Path, what: str, note: Callable[[str], None], created: list[Path]) -> LockHolder:
    ours = LockHolder.current(what)
    payload = ours.to_bytes()
    holder: LockHolder | None = None
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # a refused run removed the empty folder it had created, just now
            created += _make_folders(path.parent)
            continue
        except FileExistsError:
            try:
                found = _read(path)
            except OSError as exc:
                raise LockError(
                    f"{what}: {path} exists but cannot be read ({exc}): if no other run is using this folder, "
                    f"delete {path} and try again",
                    path,
                    None,
                ) from exc
            if found is None:
                continue  # released between our open and our read
            seen, age = found
            holder = LockHolder.parse(seen)
            reason = stale_reason(holder, age)
            if reason is None:
                raise LockError(_held_message(path, what, holder, age), path, holder) from None
            try:
                removed = _remove_if_unchanged(path, seen)
            except OSError as exc:
                raise LockError(
                    f"{what}: {path} is a stale lock ({reason}) but cannot be removed ({exc}); delete it and try again",
                    path,
                    holder,
                ) from exc
            if removed:
                left_by = holder.describe() if holder is not None else "an unreadable lock"
                note(f"{path}: removed a stale lock ({left_by}): {reason}")
            continue
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return ours
    raise LockError(
        f"{what}: could not take {path}: other runs keep taking it ({holder.describe() if holder else 'unknown'}); "
        "wait for them to finish and try again",
        path,
        holder,
    )


def _release(path: Path, ours: LockHolder, note: Callable[[str], None]) -> None:
    """Remove the lock only if it is still this acquisition's: never another run's, never one a forked child saw."""
    if os.getpid() != ours.pid:
        return
    found = _read(path)
    if found is None:
        note(f"{path}: the lock of this run was removed by someone else while it ran")
        return
    if found[0] != ours.to_bytes():
        theirs = LockHolder.parse(found[0])
        note(f"{path}: the lock now belongs to another run ({theirs.describe() if theirs else 'unreadable'}); left")
        return
    path.unlink(missing_ok=True)


@contextmanager
def run_lock(path: str | os.PathLike[str], what: str, note: Callable[[str], None] = _note) -> Iterator[LockHolder]:
    """Hold the lock file ``path`` for the block; raises ``LockError`` naming the holder when another run has it.

    ``what`` says what this run does (e.g. "prepare Dataset904_X"); it goes into the lock and into the messages.
    The file is created atomically (O_CREAT | O_EXCL) with the owner's pid, host, start time and command line as
    JSON, and removed when the block ends, an exception included, but only if it is still ours. A stale lock (see
    ``stale_reason``) is replaced, with ``note`` saying so. Nested calls for the same file in one process share the
    outer lock. Missing folders are created, and removed again if the run leaves them empty.
    """
    lock = Path(path)
    created = _make_folders(lock.parent)
    key = (os.getpid(), os.path.join(os.path.realpath(lock.parent), lock.name))
    if key in _HELD:
        outer, depth = _HELD[key]
        _HELD[key] = (outer, depth + 1)
        try:
            yield outer
        finally:
            _HELD[key] = (outer, depth)
        return
    try:
        ours = _acquire(lock, what, note, created)
    except BaseException:
        _remove_if_empty(created)
        raise
    _HELD[key] = (ours, 1)
    try:
        yield ours
    finally:
        del _HELD[key]
        _release(lock, ours, note)
        _remove_if_empty(created)
