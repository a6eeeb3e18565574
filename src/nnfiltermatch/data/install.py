"""Installing a finished preparation into the dataset's preprocessed folder, by renames only, and finishing an
install that a killed run left half done.

Everything new is written under temporary names first (``.prepare.staging``, ``*.partial``); the install then
sets aside what it replaces, renames the new files into place with the manifest last, and deletes what was set
aside. The renames are journalled (:mod:`nnfiltermatch.data.install_journal`), so a kill in the middle leaves a journal
with which the next run completes the install (or, when its new files are gone, undoes it). Prepare and add-labels
hold the dataset's lock for the whole run, so two of them never interleave their installs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from nnfiltermatch.data.install_journal import (
    ASIDE,
    INSTALL,
    JOURNAL_NAME,
    JournalError,
    Move,
    has_journal,
    install,
    recover,
)
from nnfiltermatch.data.layout import MANIFEST_NAME, PARTIAL_SUFFIX, UNLABELED_DIRNAME, preprocessed_root
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.files import atomic_write_text
from nnfiltermatch.locks import LOCK_NAME, LockError, run_lock

PREPARE_STAGING_NAME = ".prepare.staging"  # new plans, fingerprint, lists until installed
PREPARE_TRASH_NAME = ".prepare.replaced"  # what an install replaced, until the manifest is in
UNRECOVERABLE_SUFFIX = ".unrecoverable"  # the manifest of an install that can be neither completed nor undone
RECOVERY_WAIT_SECONDS = 10.0  # a reader waits this long for a running prepare to finish its renames


@contextmanager
def dataset_lock(out: Path, what: str) -> Iterator[None]:
    """Hold ``out/.nnfiltermatch.lock`` (the preprocessed dataset) for the block: one prepare / add-labels at a time.

    Why: two prepares of one dataset interleave their installs (one once reported success with an empty unlabelled
    folder). A held lock is a PreparationError, so the CLI reports it like any refusal (exit 2).
    """
    with ExitStack() as stack:
        try:
            stack.enter_context(run_lock(out / LOCK_NAME, what))
        except LockError as exc:
            raise PreparationError(str(exc)) from exc
        yield


def recover_interrupted_install(dataset_name: str) -> None:
    """Finish an install that a killed prepare left half done, before anything reads the dataset as installed.

    For the readers (train, anything calling ``load_prepared``); prepare and add-labels do it themselves under the
    lock they hold. A journal lives for milliseconds in a running prepare, so while another run holds the lock and
    the journal is still there, wait briefly for it to go, then refuse, naming the holder.
    """
    out = preprocessed_root(dataset_name)
    if not has_journal(out):
        return
    deadline = time.monotonic() + RECOVERY_WAIT_SECONDS
    while True:
        try:
            with run_lock(out / LOCK_NAME, f"finish the interrupted install of {dataset_name}"):
                recover_install(out)
            return
        except LockError as exc:
            if not has_journal(out):
                return  # the run holding the lock finished it
            if time.monotonic() > deadline:
                raise PreparationError(
                    f"{out / JOURNAL_NAME}: the install of {dataset_name} is unfinished and cannot be finished now "
                    f"({exc})"
                ) from exc
            time.sleep(0.2)


def recover_install(out: Path) -> None:
    """Complete (or, when its new files are gone, undo) an interrupted install of ``out``, saying so on stderr.

    The caller holds the dataset's lock. One that can be neither (files removed by hand) is made harmless: its
    manifest is renamed, so no command takes the half install for a preparation and the next prepare starts afresh.
    """
    try:
        done = recover(out)
    except JournalError as exc:
        manifest = out / MANIFEST_NAME
        kept = manifest.with_name(manifest.name + UNRECOVERABLE_SUFFIX)
        if manifest.is_file():
            os.replace(manifest, kept)
        (out / JOURNAL_NAME).unlink(missing_ok=True)
        _note(
            f"{exc}. Its manifest was renamed to {kept.name}, so that nothing uses the half install: the next prepare "
            f"plans and preprocesses {out.name} afresh"
        )
        return
    if done is not None:
        _note(done.describe(out))


def _note(message: str) -> None:
    print(f"nnfiltermatch: note: {message}", file=sys.stderr, flush=True)


def install_preparation(
    out: Path, manifest: dict[str, Any], staged: Path | None, folders: list[tuple[Path, Path]], what: str = "prepare"
) -> None:
    """Put a finished preparation in place by renames only, the manifest last, journalled (:mod:`install_journal`).

    The new manifest is written first under a temporary name (the one write that needs disk space), so a full disk
    stops before anything is moved. Each installed file or folder that is replaced is first set aside into a trash
    folder, deleted once the manifest is in. An exception during the renames undoes them; a kill leaves the journal,
    with which the next run (prepare, add-labels, train) completes the install before it reads anything.
    """
    trash = out / PREPARE_TRASH_NAME
    if trash.exists():  # left by a failed run (never by an unfinished journal: it was recovered at the start)
        shutil.rmtree(trash)
    trash.mkdir()
    new_manifest = out / f".{MANIFEST_NAME}.new"
    atomic_write_text(new_manifest, json.dumps(manifest, indent=2))
    moves: list[Move] = []

    def rel(path: Path) -> str:
        return path.relative_to(out).as_posix()

    if staged is not None:
        splits = out / "splits_final.json"  # the old split names cases that may no longer be labelled
        if splits.exists():
            moves.append(Move(ASIDE, rel(splits), rel(trash / splits.name)))
        for child in sorted(staged.iterdir()):
            if (out / child.name).exists():
                moves.append(Move(ASIDE, child.name, rel(trash / child.name)))
            moves.append(Move(INSTALL, rel(child), child.name))
    for i, (final, partial) in enumerate(folders):
        if final.exists():
            moves.append(Move(ASIDE, rel(final), rel(trash / f"{i}_{final.name}")))
        moves.append(Move(INSTALL, rel(partial), rel(final)))
    moves.append(Move(INSTALL, rel(new_manifest), MANIFEST_NAME))
    delete = [PREPARE_TRASH_NAME] + ([rel(staged.parent)] if staged is not None else [])
    install(out, moves, delete, what)


def remove_leftovers(out: Path) -> None:
    """Temporary folders of an interrupted or failed prepare (never read by training: they have their own names).

    Not while an install journal is unfinished: its next run needs them (to complete it or to undo it).
    """
    if has_journal(out):
        return
    for folder in (out / PREPARE_STAGING_NAME, out / PREPARE_TRASH_NAME):
        shutil.rmtree(folder, ignore_errors=True)
    (out / f".{MANIFEST_NAME}.new").unlink(missing_ok=True)
    for parent in (out, out / UNLABELED_DIRNAME):
        if parent.is_dir():
            for partial in parent.glob(f"*{PARTIAL_SUFFIX}"):
                if partial.is_dir():
                    shutil.rmtree(partial, ignore_errors=True)


def partial_usage(out: Path) -> tuple[int, int]:
    """Bytes in the ``.partial`` folders of a failed prepare and how many cases they completed (one .pkl each)."""
    written = cases = 0
    for parent in (out, out / UNLABELED_DIRNAME):
        for partial in parent.glob(f"*{PARTIAL_SUFFIX}") if parent.is_dir() else []:
            for f in partial.rglob("*"):
                if f.is_file():
                    written += f.stat().st_size
                    cases += f.suffix == ".pkl"
    return written, cases
