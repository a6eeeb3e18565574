"""Worker processes die with the process that started them: prepare's pool and nnU-Net's fingerprint pool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnfiltermatch.data.workers import workers_die_with_us

_KILL_SCRIPT = """
import multiprocessing, os, sys, time, types
from pathlib import Path

from nnfiltermatch.data import workers


def job(path):
    Path(path).write_text(str(os.getpid()))
    time.sleep(120)


if __name__ == "__main__":
    out = Path(sys.argv[2])
    jobs = [(str(out / f"worker{i}"),) for i in range(2)]
    if sys.argv[1] == "executor":  # prepare's own pool (preprocessing)
        workers.run_parallel(job, jobs, 2, "test")
    else:  # a pool as nnU-Net's fingerprint extractor makes it, inside the guard prepare puts around it
        module = types.SimpleNamespace(multiprocessing=multiprocessing)
        with workers.workers_die_with_us(module):
            with module.multiprocessing.get_context("spawn").Pool(2) as pool:
                pool.starmap(job, jobs)
"""


def _children(pid: int) -> dict[int, str]:
    """{pid: command line} of the live processes whose parent is ``pid``."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # zombies are dead
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")
@pytest.mark.parametrize("pool", ["executor", "nnunet_pool"])
def test_workers_die_with_a_killed_prepare(pool: str, tmp_path: Path) -> None:
    """SIGKILL of prepare used to leave its spawn workers and multiprocessing's resource tracker running (parent 1)."""
    script = tmp_path / "kill_me.py"
    script.write_text(_KILL_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), pool, str(tmp_path)], stderr=subprocess.DEVNULL)
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 25
        while not all((tmp_path / f"worker{i}").is_file() for i in range(2)):
            assert parent.poll() is None and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        time.sleep(0.2)  # both files are written: the workers sleep in their job
        started = _children(parent.pid)
        workers = {int((tmp_path / f"worker{i}").read_text()) for i in range(2)}
        assert workers <= set(started)
        assert any("resource_tracker" in cmd for cmd in started.values()), started
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [cmd for p, cmd in started.items() if _alive(p)], "processes outlived the killed prepare"
    finally:
        parent.kill()
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_fingerprint_pool_is_guarded() -> None:
    """The guard patches the module attribute nnU-Net's fingerprint extractor really uses (fails if nnU-Net changes)."""
    import multiprocessing

    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor

    assert fingerprint_extractor.multiprocessing is multiprocessing
    with workers_die_with_us(fingerprint_extractor):
        context = fingerprint_extractor.multiprocessing.get_context("spawn")
        assert context.Process is multiprocessing.get_context("spawn").Process and hasattr(context, "Pool")
    assert fingerprint_extractor.multiprocessing is multiprocessing
