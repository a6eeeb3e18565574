"""A prepare killed in the middle of its install (issue 14 s.5): the next run leaves exactly the old or exactly the new
preparation, never a mix, and never says "nothing to do" over a half install.

The dataset is prepared twice, once per module (10 s each): with LABELED (the old install), then with three of those
cases (the new one), whose install is snapshotted as it starts (staged plans and lists, ``.partial`` folders, the
old install). Every fault is injected into a copy of that snapshot, in the install phase only: a kill (``os._exit``
in a forked child, a real SIGKILL of a subprocess) or an exception after each number of renames.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CONFIG, DATASET, LABELED, SUBSET, set_nnunet_env
from nnfiltermatch.data import install, install_journal, preparation
from nnfiltermatch.data.add_labels import add_labels
from nnfiltermatch.data.install import PREPARE_STAGING_NAME, PREPARE_TRASH_NAME, UNRECOVERABLE_SUFFIX
from nnfiltermatch.data.install_journal import JOURNAL_NAME
from nnfiltermatch.data.layout import LABELED_LIST_NAME, MANIFEST_NAME
from nnfiltermatch.data.manifest import load_prepared
from nnfiltermatch.data.preparation import prepare
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.locks import LOCK_NAME

NEW_LABELED = LABELED[:3]


def _tree(root: Path) -> dict[str, str]:
    """{relative path: sha256, or 'dir'} of everything under root, hidden entries included."""
    return {
        p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@dataclass
class Installs:
    root: Path
    out: Path
    old: dict[str, str]  # the tree installed with LABELED
    new: dict[str, str]  # the tree installed with NEW_LABELED, uninterrupted
    snapshot: Path  # the tree as the new install starts
    args: Path  # _install's arguments (pickled)
    n_renames: int

    def restore(self) -> None:
        shutil.rmtree(self.out)
        shutil.copytree(self.snapshot, self.out, symlinks=True)

    def listed(self, which: str) -> Path:
        return self.root / f"{which}.txt"


@pytest.fixture(scope="module")
def installs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installs]:
    root = tmp_path_factory.mktemp("journal")
    saved = dict(os.environ)
    set_nnunet_env(root)
    shutil.copytree(SUBSET, root / "raw" / DATASET)
    (root / "old.txt").write_text("\n".join(LABELED) + "\n")
    (root / "new.txt").write_text("\n".join(NEW_LABELED) + "\n")
    out = root / "preprocessed" / DATASET
    try:
        prepare(DATASET, [CONFIG], labeled_list=root / "old.txt", num_processes=1)
        (out / "splits_final.json").write_text("[]\n")  # as training leaves it: the install sets it aside
        old = _tree(out)
        snapshot, args = root / "snapshot", root / "install_args.pkl"
        real = preparation.install_preparation
        renames: list[tuple[Path, Path]] = []

        def snapshot_install(*a, **kw):
            shutil.copytree(out, snapshot, symlinks=True, ignore=shutil.ignore_patterns(LOCK_NAME))  # prepare's
            args.write_bytes(pickle.dumps((a, kw)))
            return real(*a, **kw)

        def counting(source: Path, target: Path) -> None:
            renames.append((source, target))
            os.replace(source, target)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(preparation, "install_preparation", snapshot_install)
            mp.setattr(install_journal, "rename", counting)
            prepare(DATASET, [CONFIG], labeled_list=root / "new.txt", num_processes=1)
        new = _tree(out)
        assert new != old and json.loads((out / MANIFEST_NAME).read_text())["labeled_ids"] == NEW_LABELED
        assert len(renames) == 16, renames  # splits; 5 staged files, the 2 data folders, each set aside; manifest
        yield Installs(root, out, old, new, snapshot, args, len(renames))
    finally:
        os.environ.clear()
        os.environ.update(saved)


class Replanned(Exception):
    """Raised instead of nnU-Net's planning: prepare decided that the installed preparation is not the one asked for."""


def _prepare_says(which: str, env: Installs, capsys: pytest.CaptureFixture[str], replans: bool) -> str:
    """Run prepare with the old or new list (planning replaced by ``Replanned``); its stdout and stderr."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(preparation, "_fingerprint_and_plan", _raise_replanned)
        if replans:
            with pytest.raises(Replanned):
                prepare(DATASET, [CONFIG], labeled_list=env.listed(which), num_processes=1)
        else:
            prepare(DATASET, [CONFIG], labeled_list=env.listed(which), num_processes=1)
    captured = capsys.readouterr()
    return captured.out + captured.err


def _raise_replanned(*args, **kwargs):
    raise Replanned


def _run_install(env: Installs) -> None:
    """The interrupted run's install, as prepare does it: under the dataset's lock, from the snapshot's arguments."""
    a, kw = pickle.loads(env.args.read_bytes())
    with install.dataset_lock(env.out, f"prepare {DATASET}"):
        install.install_preparation(*a, **kw)


def _killed_child(env: Installs, prepare_child: Callable[[], None]) -> None:
    """Run the install in a forked child that ``prepare_child`` arms to ``os._exit``; the child must die of it."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            prepare_child()
            _run_install(env)
        except BaseException as exc:  # noqa: B036 - report anything, then exit without running pytest's code
            os.write(2, f"child failed: {exc!r}\n".encode())
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 9, "the child was not killed where it was armed to be"


def _exit_after(k: int) -> Callable[[], None]:
    """Arm the child to exit after k renames, or, after all of them, before the replaced files are deleted."""

    def arm() -> None:
        calls = [0]

        def rename(source: Path, target: Path) -> None:
            if calls[0] == k:
                os._exit(9)
            calls[0] += 1
            os.replace(source, target)

        install_journal.rename = rename
        install_journal._finish = lambda root, delete: os._exit(9)

    return arm


@pytest.mark.parametrize("k", range(17))
def test_killed_after_each_rename_the_next_run_completes_the_install(
    k: int, installs: Installs, capsys: pytest.CaptureFixture[str]
) -> None:
    """os._exit after k renames (k = 16: all made, killed before the replaced files were deleted). The next run
    completes the install from its journal: the new preparation, byte for byte. Even k: a reader does it (train's
    load_prepared), odd k: prepare. Then prepare with the new list has nothing to do; with the old one it re-plans
    (the old code said "nothing to do" here over new plans and fingerprint and no labelled list)."""
    env = installs
    env.restore()
    _killed_child(env, _exit_after(k))
    assert (env.out / JOURNAL_NAME).is_file() and (env.out / LOCK_NAME).is_file()  # the killed run's lock is stale
    if k % 2 == 0:
        assert load_prepared(DATASET).labeled_ids == NEW_LABELED
        said = capsys.readouterr().err
    else:
        said = _prepare_says("new", env, capsys, replans=False)
        assert "nothing to do" in said
    done = f"after {k} of its 16 renames; completed the other {16 - k}" if k < 16 else "after all 16 of its renames"
    assert done in said, said
    assert "removed a stale lock" in said
    assert _tree(env.out) == env.new
    assert "nothing to do" in _prepare_says("new", env, capsys, replans=False)
    said = _prepare_says("old", env, capsys, replans=True)
    assert "nothing to do" not in said and "Inputs changed since the last prepare" in said
    assert _tree(env.out) == env.new  # the failed re-plan left the recovered install alone


@pytest.mark.parametrize("k", range(16))
def test_an_exception_at_each_rename_undoes_the_install(
    k: int, installs: Installs, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exception in this process (a failing rename, Ctrl-C) after k renames: they are undone, the journal goes,
    and prepare's clean-up leaves the old preparation byte for byte; the old list then has nothing to do."""
    env = installs
    env.restore()
    before = _tree(env.out)
    calls = [0]

    def rename(source: Path, target: Path) -> None:  # the (k+1)-th rename fails, once (the undo's renames work)
        calls[0] += 1
        if calls[0] == k + 1:
            raise KeyboardInterrupt if k % 2 else OSError(5, "Input/output error", str(source))
        os.replace(source, target)

    monkeypatch.setattr(install_journal, "rename", rename)
    with pytest.raises(KeyboardInterrupt if k % 2 else OSError):
        _run_install(env)
    monkeypatch.undo()
    assert not (env.out / JOURNAL_NAME).exists()
    assert _tree(env.out) == {**before, PREPARE_TRASH_NAME: "dir", f".{MANIFEST_NAME}.new": env.new[MANIFEST_NAME]}
    install.remove_leftovers(env.out)  # what prepare's failure path does next
    assert _tree(env.out) == env.old
    if k in (0, 10, 15):
        assert "nothing to do" in _prepare_says("old", env, capsys, replans=False)
        assert _tree(env.out) == env.old


def test_killed_while_deleting_the_replaced_files(installs: Installs, capsys: pytest.CaptureFixture[str]) -> None:
    """All renames made, the kill comes while the trash is being deleted: the next run deletes the rest."""
    env = installs
    env.restore()

    def arm() -> None:
        def delete(path: Path) -> None:
            next(p for p in sorted(path.rglob("*")) if p.is_file()).unlink()
            os._exit(9)

        install_journal._delete = delete

    _killed_child(env, arm)
    assert (env.out / PREPARE_TRASH_NAME).is_dir()
    said = _prepare_says("new", env, capsys, replans=False)
    assert "after all 16 of its renames, while the files it replaced were being deleted" in said
    assert "nothing to do" in said
    assert _tree(env.out) == env.new


def test_killed_while_writing_the_journal(installs: Installs, capsys: pytest.CaptureFixture[str]) -> None:
    """Before the journal is in place nothing has been moved: the next run removes the temporary files."""
    env = installs
    env.restore()

    def arm() -> None:
        def write(path: Path, payload: bytes) -> None:
            path.with_name(path.name + ".tmp").write_bytes(payload[: len(payload) // 2])
            os._exit(9)

        install_journal._write_journal = write

    _killed_child(env, arm)
    assert not (env.out / JOURNAL_NAME).exists() and (env.out / f"{JOURNAL_NAME}.tmp").exists()
    said = _prepare_says("old", env, capsys, replans=False)
    assert "nothing to do" in said and "interrupted" not in said
    assert _tree(env.out) == env.old


_SIGKILL_SCRIPT = """
import os, pickle, sys, time
from pathlib import Path
from nnfiltermatch.data import install
from nnfiltermatch.data import install_journal

out, args, marker, k = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
calls = [0]
def rename(source, target):
    if calls[0] == k:
        marker.write_text(str(os.getpid()))
        time.sleep(120)
    calls[0] += 1
    os.replace(source, target)
install_journal.rename = rename
a, kw = pickle.loads(args.read_bytes())
with install.dataset_lock(out, "prepare " + out.name):
    install.install_preparation(*a, **kw)
"""


def test_sigkill_after_the_tenth_rename(installs: Installs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case with a real SIGKILL: a subprocess stopped after 10 renames (the old labelled list set aside,
    the new one not yet in). The next prepare with the old list used to say "nothing to do"; it now completes the
    install it finds and, the old list no longer being what is installed, re-plans."""
    env = installs
    env.restore()
    script, marker = tmp_path / "install.py", tmp_path / "renamed10"
    script.write_text(_SIGKILL_SCRIPT)
    child = subprocess.Popen(
        [sys.executable, str(script), str(env.out), str(env.args), str(marker), "10"], stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.is_file():
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            assert time.monotonic() < deadline, "the install did not reach its 11th rename"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    assert not (env.out / LABELED_LIST_NAME).exists()  # the half install the old code took for complete
    assert json.loads((env.out / MANIFEST_NAME).read_text())["labeled_ids"] == LABELED
    said = _prepare_says("old", env, capsys, replans=True)
    assert "after 10 of its 16 renames; completed the other 6" in said and "nothing to do" not in said
    assert _tree(env.out) == env.new


def test_new_files_removed_by_hand_roll_back(installs: Installs, capsys: pytest.CaptureFixture[str]) -> None:
    """Completing needs the staged files; when someone deleted them, the install is rolled back instead, exactly."""
    env = installs
    env.restore()
    _killed_child(env, _exit_after(5))
    (env.out / PREPARE_STAGING_NAME / DATASET / "nnUNetPlans.json").unlink()
    said = _prepare_says("old", env, capsys, replans=False)
    assert "it cannot be completed: its new files are gone (.prepare.staging/" in said
    assert "Rolled back the 5 renames" in said and "nothing to do" in said
    assert _tree(env.out) == env.old


def test_neither_completable_nor_undoable(installs: Installs, capsys: pytest.CaptureFixture[str]) -> None:
    """New and installed files both removed by hand: the manifest is renamed, so nothing takes the mix for a
    preparation; readers are told to prepare, prepare re-plans."""
    env = installs
    env.restore()
    _killed_child(env, _exit_after(8))  # the new dataset.json, fingerprint and gt are in, the old plans set aside
    (env.out / PREPARE_STAGING_NAME / DATASET / LABELED_LIST_NAME).unlink()
    (env.out / "dataset_fingerprint.json").unlink()
    with pytest.raises(PreparationError, match="not found: run `nnfiltermatch prepare"):
        load_prepared(DATASET)
    said = capsys.readouterr().err
    assert "can be neither completed nor rolled back" in said and UNRECOVERABLE_SUFFIX in said
    assert not (env.out / MANIFEST_NAME).exists() and (env.out / (MANIFEST_NAME + UNRECOVERABLE_SUFFIX)).is_file()
    assert not (env.out / JOURNAL_NAME).exists()
    _prepare_says("old", env, capsys, replans=True)


@pytest.mark.parametrize("k", [5, 10])
def test_a_half_install_without_journal_is_not_taken_for_complete(
    k: int, installs: Installs, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the version without a journal left (its next run deleted the replaced files): the old manifest over a
    new fingerprint (k = 5) or without a labelled list (k = 10). Prepare checks the installed files against the
    manifest before it says "nothing to do", and re-plans."""
    env = installs
    env.restore()
    _killed_child(env, _exit_after(k))
    (env.out / JOURNAL_NAME).unlink()
    install.remove_leftovers(env.out)
    said = _prepare_says("old", env, capsys, replans=True)
    assert "do not match its manifest" in said and "nothing to do" not in said
    expected = "dataset_fingerprint.json is not the one planned with" if k == 5 else f"{LABELED_LIST_NAME} is missing"
    assert expected in said


def test_add_labels_finishes_an_interrupted_install_first(
    installs: Installs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """add-labels checks the manifest under the lock: it completes the install before it reads it."""
    env = installs
    env.restore()
    _killed_child(env, _exit_after(12))
    (tmp_path / "labels").mkdir()
    with pytest.raises(PreparationError, match="no CASE.nii.gz label files"):
        add_labels(DATASET, tmp_path / "labels")
    assert "after 12 of its 16 renames" in capsys.readouterr().err
    assert _tree(env.out) == env.new


def test_a_reader_waits_for_a_running_install_and_refuses_a_held_one(
    installs: Installs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a live run holds the lock over an unfinished journal (it is installing), a reader does not touch it:
    it waits for it, and refuses, naming the holder, when it does not end."""
    env = installs
    env.restore()
    _killed_child(env, _exit_after(3))
    lock = env.out / LOCK_NAME
    lock.unlink()
    monkeypatch.setattr(install, "RECOVERY_WAIT_SECONDS", 0.5)
    with install.dataset_lock(env.out, "prepare that is installing"):
        child = os.fork()
        if child == 0:
            try:
                load_prepared(DATASET)
            except PreparationError as exc:
                os._exit(3 if "prepare that is installing" in str(exc) and "unfinished" in str(exc) else 4)
            os._exit(5)
        _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 3
    assert (env.out / JOURNAL_NAME).is_file()
    assert load_prepared(DATASET).labeled_ids == NEW_LABELED
