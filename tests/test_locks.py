"""Issue 14 s.3: one run per folder. The lock module, and prepare / add-labels / train refusing a held lock.

The refusals come before any work (no planning, no training), so every test here takes well under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import CONFIG, DATASET, LABELED, SUBSET
from nnfiltermatch.locks import LOCK_NAME, LockError, LockHolder, _process_start, run_lock, stale_reason


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not us: the holder of the locks these tests find."""
    proc = subprocess.Popen(["sleep", "3600"])  # outlives any test on a loaded machine; killed at teardown
    yield proc
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid is free (and not reused this quickly)
    return proc.pid


def write_lock(path: Path, pid: int, host: str | None = None, command: str = "nnfiltermatch train -d 901") -> None:
    record = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "started": "2025-01-01T09:00:00+00:00",
        "command": command,
        "what": "train --mode filtermatch",
        "token": "theirs",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


# ----- the module ---------------------------------------------------------------------------------------------------
def test_lock_file_names_its_owner_and_goes_away(tmp_path: Path) -> None:
    lock = tmp_path / "sub" / LOCK_NAME
    with run_lock(lock, "prepare Dataset901") as ours:
        record = json.loads(lock.read_text())
        assert record["pid"] == os.getpid() == ours.pid and record["host"] == socket.gethostname()
        assert record["started"] and record["command"] and record["what"] == "prepare Dataset901"
        assert time.time() - time.mktime(time.strptime(record["started"][:19], "%Y-%m-%dT%H:%M:%S")) < 60
    assert not lock.exists()


def test_lock_is_removed_after_an_exception(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    with pytest.raises(KeyError), run_lock(lock, "x"):
        assert lock.exists()
        raise KeyError("boom")
    assert not lock.exists()


def test_a_live_holder_is_named_and_kept(tmp_path: Path, other_process: subprocess.Popen[bytes]) -> None:
    lock = tmp_path / LOCK_NAME
    write_lock(lock, other_process.pid)
    before = lock.read_bytes()
    with pytest.raises(LockError) as exc, run_lock(lock, "train --mode ssl"):
        pass
    msg = str(exc.value)
    assert f"pid {other_process.pid} on host {socket.gethostname()}" in msg
    assert "started 2025-01-01T09:00:00+00:00" in msg and "`nnfiltermatch train -d 901`" in msg
    assert "wait for it to finish" in msg and f"delete {lock}" in msg and msg.startswith("train --mode ssl: ")
    assert exc.value.holder is not None and exc.value.holder.pid == other_process.pid
    assert lock.read_bytes() == before


def test_a_stale_lock_of_a_dead_pid_is_taken_over_with_a_note(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    dead = _dead_pid()
    write_lock(lock, dead)
    notes: list[str] = []
    with run_lock(lock, "prepare", note=notes.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    assert len(notes) == 1 and f"pid {dead}" in notes[0] and "no longer running" in notes[0]


def test_a_reused_pid_or_an_earlier_boot_is_stale(tmp_path: Path, other_process: subprocess.Popen[bytes]) -> None:
    here = LockHolder.current("x")
    theirs = LockHolder(other_process.pid, here.host, here.started, "c", "w", "t", here.boot_id, None)
    assert stale_reason(theirs, 0) is None  # alive, no start time recorded
    if here.pid_start is None:
        pytest.skip("no /proc: pid reuse and restarts are not detected here")
    their_start = _process_start(other_process.pid)
    assert stale_reason(replace(theirs, pid_start=their_start), 0) is None
    reused = replace(theirs, pid_start=here.pid_start)  # the pid of a live process, the start time of another one
    assert "now belongs to another process" in str(stale_reason(reused, 0))
    assert "last started" in str(stale_reason(LockHolder(os.getpid(), here.host, "", "", "", "", "old-boot"), 0))


def test_a_lock_from_another_host_is_never_stale(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    write_lock(lock, _dead_pid(), host="gpu-node-7")
    old = time.time() - 7 * 86400
    os.utime(lock, (old, old))
    with pytest.raises(LockError) as exc, run_lock(lock, "train"):
        pass
    msg = str(exc.value)
    assert "host gpu-node-7" in msg and "not this one" in msg and "never taken over" in msg
    assert lock.exists()


def test_unreadable_lock_is_stale_only_when_old(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    lock.write_bytes(b"")  # a run that has created the file and not yet written it
    with pytest.raises(LockError, match="not a readable lock"), run_lock(lock, "prepare"):
        pass
    old = time.time() - 120
    os.utime(lock, (old, old))
    notes: list[str] = []
    with run_lock(lock, "prepare", note=notes.append):
        pass
    assert not lock.exists() and "unreadable" in notes[0]


def test_a_lock_that_is_no_longer_ours_is_not_removed(tmp_path: Path, other_process: subprocess.Popen[bytes]) -> None:
    lock = tmp_path / LOCK_NAME
    notes: list[str] = []
    with run_lock(lock, "train", note=notes.append):
        lock.unlink()  # someone deleted ours, and another run took the folder
        write_lock(lock, other_process.pid)
    assert json.loads(lock.read_text())["pid"] == other_process.pid
    assert "belongs to another run" in notes[0]


def test_nested_locks_of_one_process_share_the_outer_one(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    with run_lock(lock, "outer") as outer:
        with run_lock(lock, "inner") as inner:
            assert inner == outer
        assert lock.exists()
    assert not lock.exists()


def test_only_one_of_many_concurrent_runs_gets_the_lock(tmp_path: Path) -> None:
    """Eight processes race for one (stale) lock: exactly one holds it at any time."""
    lock = tmp_path / LOCK_NAME
    write_lock(lock, _dead_pid())
    script = (
        "import sys\n"
        "from nnfiltermatch.locks import LockError, run_lock\n"
        "try:\n"
        "    with run_lock(sys.argv[1], 'race', note=lambda m: None):\n"
        "        print('got', flush=True); sys.stdin.read()\n"  # held until every other run has answered
        "except LockError:\n"
        "    print('refused', flush=True)\n"
    )
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(lock)], **pipes) for _ in range(8)]
    outputs = [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]
    for p in procs:
        p.communicate(timeout=60)
    assert outputs.count("got") == 1 and outputs.count("refused") == 7, outputs
    assert not lock.exists()


# ----- the commands -------------------------------------------------------------------------------------------------
@pytest.fixture
def tree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """nnU-Net folders with the raw subset and a manifest saying it is prepared (no data: nothing may run)."""
    for key in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{key}", str(tmp_path / key))
    for key in ("nnUNet_compile", "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        monkeypatch.setenv(key, os.environ.get(key, "0"))  # train's setdefault() is undone after the test
    shutil.copytree(SUBSET, tmp_path / "raw" / DATASET, ignore=shutil.ignore_patterns("imagesTs", "labelsTs"))
    manifest = {
        "plans_name": "nnUNetPlans",
        "labeled_ids": LABELED,
        "unlabeled_ids": ["hippocampus_007"],
        "configurations": {CONFIG: {"data_identifier": "nnUNetPlans_3d_fullres_cpu"}},
    }
    (tmp_path / "preprocessed" / DATASET).mkdir(parents=True)
    (tmp_path / "preprocessed" / DATASET / "nnfiltermatch_prepare.json").write_text(json.dumps(manifest))
    return tmp_path


def test_prepare_and_add_labels_refuse_a_dataset_in_use(
    tree: Path, other_process: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    from nnfiltermatch.cli import main

    dataset = tree / "preprocessed" / DATASET
    lock = dataset / LOCK_NAME
    write_lock(lock, other_process.pid, command="nnfiltermatch prepare -d 901")
    manifest = (dataset / "nnfiltermatch_prepare.json").read_bytes()
    for argv, what in (
        (["prepare", "-d", "901", "-c", CONFIG], f"prepare {DATASET}: "),
        (["prepare", "-d", "901", "--add-labels", str(tree / "annotated")], f"prepare {DATASET} --add-labels "),
    ):
        assert main(argv) == 2
        msg = capsys.readouterr().err
        assert msg.startswith(f"nnfiltermatch prepare: error: {what}"), msg
        assert f"is held by another run: train --mode filtermatch, pid {other_process.pid} on host" in msg
        assert "`nnfiltermatch prepare -d 901`" in msg and f"delete {lock}" in msg
    assert (dataset / "nnfiltermatch_prepare.json").read_bytes() == manifest
    assert sorted(p.name for p in dataset.iterdir()) == sorted([LOCK_NAME, "nnfiltermatch_prepare.json"])


def test_add_labels_takes_over_a_stale_lock_and_releases_it(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nnfiltermatch.cli import main

    lock = tree / "preprocessed" / DATASET / LOCK_NAME
    dead = _dead_pid()
    write_lock(lock, dead)
    assert main(["prepare", "-d", "901", "--add-labels", str(tree / "annotated")]) == 2
    err = capsys.readouterr().err
    assert f"removed a stale lock (train --mode filtermatch, pid {dead}" in err and "no longer running" in err
    assert "--add-labels " in err and "not a folder" in err  # it went on to the real checks, under its own lock
    assert not lock.exists()


def _fold(tree: Path, trainer: str) -> Path:
    return tree / "results" / DATASET / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_all"


TRAIN = ["train", "-d", "901", "-c", CONFIG, "-f", "all", "--device", "cpu", "--epochs", "1"]


@pytest.mark.parametrize(
    ("mode", "locked"),
    [("supervised", "nnFilterMatchTrainer_supervised"), ("selftrain", "nnFilterMatchTrainer_selftrain")],
)
def test_train_refuses_a_model_folder_in_use(
    tree: Path, other_process: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str], mode: str, locked: str
) -> None:
    """Refused before the overwrite check and before anything is trained (selftrain: before its stage 1)."""
    from nnfiltermatch.cli import main

    lock = _fold(tree, locked) / LOCK_NAME
    write_lock(lock, other_process.pid)
    (lock.parent / "checkpoint_final.pth").write_bytes(b"theirs")
    assert main([*TRAIN, "--mode", mode, "--overwrite"]) == 2
    msg = capsys.readouterr().err
    assert msg.startswith(f"nnfiltermatch train: error: train --mode {mode}: {lock} is held by another run"), msg
    assert f"pid {other_process.pid} on host {socket.gethostname()}" in msg
    assert (lock.parent / "checkpoint_final.pth").read_bytes() == b"theirs"  # --overwrite did not touch it
    assert sorted(p.name for p in lock.parent.iterdir()) == sorted([LOCK_NAME, "checkpoint_final.pth"])
    if mode == "selftrain":  # its stage 1 folder was locked, found the stage 2 folder busy, and was left as it was
        assert not _fold(tree, "nnFilterMatchTrainer_supervised").exists()


def test_train_releases_its_lock_after_refusing_for_another_reason(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nnfiltermatch.cli import main

    fold = _fold(tree, "nnFilterMatchTrainer_supervised")
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"done")
    assert main([*TRAIN, "--mode", "supervised"]) == 2
    assert "already holds checkpoint_final.pth" in capsys.readouterr().err
    assert sorted(p.name for p in fold.iterdir()) == ["checkpoint_final.pth"]


# ----- multi-process runs: one lock per run, every rank told -----------------------------------------------------
def _rank_worker(out: str, busy: str) -> None:
    """One rank of a torchrun-like group (env://): only rank 0 locks, and a refusal stops every rank."""
    from nnfiltermatch import distributed
    from nnfiltermatch.commands.training import model_folder_lock
    from nnfiltermatch.errors import PreparationError

    assert distributed.init_from_env("cpu") is True
    result: dict[str, object] = {}
    free = Path(out) / "free"
    with model_folder_lock([free], "train"):
        result["holder_pid"] = json.loads((free / LOCK_NAME).read_text())["pid"]  # rank 0 took it before telling
    distributed.barrier()
    result["released"] = not (free / LOCK_NAME).exists()
    try:
        with model_folder_lock([Path(busy)], "train"):
            result["refused"] = None
    except PreparationError as exc:
        result["refused"] = str(exc)
    result["pid"] = os.getpid()
    with distributed.leaving_group(True):
        Path(out, f"rank_{distributed.rank()}.json").write_text(json.dumps(result))


def test_under_ddp_only_rank_0_locks_and_every_rank_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_process: subprocess.Popen[bytes]
) -> None:
    from nnfiltermatch import distributed

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    busy = tmp_path / "busy"
    write_lock(busy / LOCK_NAME, other_process.pid)
    distributed.spawn(2, _rank_worker, (str(tmp_path), str(busy)))
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["holder_pid"] == ranks[1]["holder_pid"] == ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["released"] and ranks[1]["released"]
    for rank in ranks:
        assert f"pid {other_process.pid}" in str(rank["refused"]) and "is held by another run" in str(rank["refused"])
    assert json.loads((busy / LOCK_NAME).read_text())["pid"] == other_process.pid
