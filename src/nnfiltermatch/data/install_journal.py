"""Installs that survive a kill: a journal of renames, written before the first one and finished by the next run.

``prepare`` installs a finished preparation by renames inside the preprocessed dataset's folder: each installed
file or folder it replaces is set aside into a trash folder, the new one is renamed into its place, the manifest
last; then the trash is deleted. A kill in the middle (SIGKILL, out of memory, power cut of the process) once left
a mix of old and new files under the old manifest, which the next ``prepare`` took for complete ("nothing to do").

Now the whole series is first written to a journal (``.nnfiltermatch_install.journal``, atomically, fsynced), and
every run that reads the folder as installed finds an unfinished journal and finishes it first (``recover``), under
the dataset's lock. Which renames were made is read from the disk, not from a progress record, so a kill between
any two system calls is covered: an "aside" move (installed -> trash) is done when its trash entry exists (the
trash is empty when the journal is written), an "install" move (new -> installed) when its new file is gone (it
has no other way to leave).

Pure standard library.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOURNAL_NAME = ".nnfiltermatch_install.journal"
JOURNAL_FORMAT = 1
ASIDE = "aside"  # an installed file or folder into the trash folder
INSTALL = "install"  # a new file or folder into its installed place


class JournalError(RuntimeError):
    """A journal that can be neither completed nor rolled back (files removed by hand), or one that is unreadable."""


@dataclass(frozen=True)
class Move:
    """One rename, with paths relative to the folder the journal lives in."""

    kind: str  # ASIDE or INSTALL
    source: str
    target: str


@dataclass(frozen=True)
class Recovery:
    """What ``recover`` did with an unfinished journal."""

    direction: str  # "forward" (completed) or "back" (rolled back)
    what: str  # the interrupted run, as its journal describes it
    done_before: int  # renames that run had made
    total: int
    missing: tuple[str, ...] = ()  # back: the new files whose absence made completing impossible

    def describe(self, root: Path) -> str:
        if self.direction == "forward" and self.done_before == self.total:
            return (
                f"{root}: an install was interrupted ({self.what}) after all {self.total} of its renames, while the "
                f"files it replaced were being deleted; deleted the rest, as its journal {JOURNAL_NAME} says"
            )
        if self.direction == "forward":
            return (
                f"{root}: an install was interrupted ({self.what}) after {self.done_before} of its {self.total} "
                f"renames; completed the other {self.total - self.done_before} from its journal {JOURNAL_NAME}, so "
                "what is installed is exactly what that run prepared"
            )
        shown = ", ".join(self.missing[:3]) + (" ..." if len(self.missing) > 3 else "")
        return (
            f"{root}: an install was interrupted ({self.what}) after {self.done_before} of its {self.total} renames, "
            f"and it cannot be completed: its new files are gone ({shown}). Rolled back the {self.done_before} "
            "renames from its journal: the preparation installed before it is back in place, exactly"
        )


def rename(source: Path, target: Path) -> None:
    """The one rename of journalled installs and of their recovery (tests replace it to inject kills)."""
    os.replace(source, target)


def journal_path(root: Path) -> Path:
    return Path(root) / JOURNAL_NAME


def has_journal(root: Path) -> bool:
    return journal_path(root).is_file()


def install(root: Path, moves: list[Move], delete: list[str], what: str) -> None:
    """Make ``moves`` in order, then delete the folders ``delete`` (the trash, emptied staging), journalled.

    Every source must be complete before this is called, and the trash folder of the ASIDE targets must exist and be
    empty. An exception during the renames (in this process) undoes them and removes the journal, so the caller sees
    the previous install unchanged; if the undo fails too, the journal stays for the next run to finish.
    """
    root = Path(root)
    for move in moves:
        for rel in (move.source, move.target):
            _inside(root, rel)
        if move.kind not in (ASIDE, INSTALL):
            raise ValueError(f"unknown move kind {move.kind!r}")
    journal = {
        "format": JOURNAL_FORMAT,
        "what": what,
        "pid": os.getpid(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "moves": [[m.kind, m.source, m.target] for m in moves],
        "delete": list(delete),
    }
    _write_journal(journal_path(root), (json.dumps(journal, indent=1) + "\n").encode("utf-8"))
    try:
        for move in moves:
            rename(root / move.source, root / move.target)
    except BaseException:
        # should this fail too, the journal stays, and the next run completes the install
        _undo(root, moves[: _progress([_state(root, m) for m in moves])])
        _remove_journal(root)
        raise
    _finish(root, delete)


def recover(root: Path) -> Recovery | None:
    """Finish the unfinished install in ``root``, if there is one; the caller holds the folder's lock.

    Completed, not rolled back, because completing is the direction that is possible at every point: all files the
    remaining renames need were complete before the journal was written (and nothing else uses their names), the
    renames need no disk space and no recomputation, and the journal's last step deletes the replaced files, after
    which there is nothing left to roll back to. Rolled back only when the new files were removed by hand; neither
    possible (or the journal unreadable): ``JournalError``.
    """
    root = Path(root)
    path = journal_path(root)
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # a journal that was never written: nothing moved
    if not path.is_file():
        return None
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != JOURNAL_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {JOURNAL_FORMAT}")
        moves = [Move(str(k), str(s), str(t)) for k, s, t in data["moves"]]
        delete = [str(d) for d in data.get("delete") or []]
        what = f"{data.get('what') or '?'}, pid {data.get('pid', '?')}, journal written {data.get('written', '?')}"
        for move in moves:
            _inside(root, move.source)
            _inside(root, move.target)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise JournalError(f"{path}: unreadable install journal ({exc})") from exc
    states = [_state(root, m) for m in moves]
    made = _progress(states)
    later = list(zip(moves[made:], states[made:]))
    if all(state == PENDING for _, state in later):
        for move, _ in later:
            if move.kind == ASIDE and not _exists(root / move.source):
                continue  # an installed file that someone removed meanwhile: nothing to set aside
            rename(root / move.source, root / move.target)
        _finish(root, delete)
        return Recovery("forward", what, made, len(moves))
    missing = tuple(m.source for m, state in later if m.kind == INSTALL and state != PENDING)
    if any(m.kind == ASIDE and state == DONE for m, state in later):
        # replaced files in the trash beyond the first rename that was not made: files were moved or removed by hand
        # in between, and undoing the first renames alone would delete what the others set aside
        raise JournalError(
            f"{path}: the install it describes ({what}) can be neither completed nor rolled back: its new files "
            f"{', '.join(missing[:3]) or '?'} are gone, and the renames on the disk are not the journal's first ones"
        )
    _undo(root, moves[:made])
    for move in moves:  # the interrupted run's new files, back under their temporary names: never used now
        if move.kind == INSTALL:
            _delete(root / move.source)
    _finish(root, delete)
    return Recovery("back", what, made, len(moves), missing)


DONE, PENDING, LOST = "done", "pending", "lost"


def _state(root: Path, move: Move) -> str:
    """Whether ``move`` was made, read from the disk: an ASIDE is made when its trash entry exists (the trash was
    empty when the journal was written); an INSTALL is to be made while its new file is still there, made when it is
    gone and its target exists, and LOST when both are gone (its new file was removed by hand)."""
    if move.kind == ASIDE:
        return DONE if _exists(root / move.target) else PENDING
    if _exists(root / move.source):
        return PENDING
    return DONE if _exists(root / move.target) else LOST


def _progress(states: list[str]) -> int:
    """How many renames were made: they are made one after the other, so the made ones are the leading DONEs."""
    return next((i for i, state in enumerate(states) if state != DONE), len(states))


def _undo(root: Path, made: list[Move]) -> None:
    """Reverse the renames ``made`` (the journal's first ones), last first."""
    for move in reversed(made):
        source = root / move.source
        source.parent.mkdir(parents=True, exist_ok=True)  # a staging folder removed by hand
        rename(root / move.target, source)


def _finish(root: Path, delete: list[str]) -> None:
    for rel in delete:
        _delete(root / rel)
    _remove_journal(root)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif _exists(path):
        path.unlink(missing_ok=True)


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _inside(root: Path, rel: str) -> Path:
    """``root / rel`` for a plain relative path that stays in ``root`` (a journal never moves anything elsewhere)."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"path {rel!r} is not inside the folder")
    return root / rel


def _write_journal(path: Path, payload: bytes) -> None:
    """Write the journal atomically and durably: nothing is renamed before it is on the disk in full."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)


def _remove_journal(root: Path) -> None:
    journal_path(root).unlink(missing_ok=True)
    _fsync_folder(root)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
