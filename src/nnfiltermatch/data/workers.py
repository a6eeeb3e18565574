"""Worker processes that die with the process that started them (see ``_die_with_parent``): prepare's own pool
for preprocessing, and the pool nnU-Net's fingerprint extractor starts itself."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Any

from tqdm import tqdm

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _die_with_parent(parent_pid: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> None:
    """Worker initializer: end this worker as soon as the process that started it dies, even by SIGKILL.

    A spawned worker otherwise waits on its task queue forever (it holds the queue's write end itself), with
    multiprocessing's resource tracker kept alive by it: a killed ``prepare`` left both running with parent 1, still
    writing into folders the next ``prepare`` deletes. Linux: the kernel sends SIGKILL (PR_SET_PDEATHSIG); elsewhere a
    thread polls the parent ID. Then ``initializer(*initargs)``, if one was given.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if initializer is not None:
        initializer(*initargs)


class _ParentBoundContext:
    """A multiprocessing context whose ``Pool`` workers run ``_die_with_parent`` first."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def Pool(
        self, processes: int | None = None, initializer: Any = None, initargs: tuple = (), *args: Any, **kw: Any
    ) -> Any:
        return self._context.Pool(processes, _die_with_parent, (os.getpid(), initializer, initargs), *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _ParentBoundMultiprocessing:
    """Stands in for the ``multiprocessing`` module inside one nnU-Net module: only ``get_context`` differs."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def get_context(self, method: str | None = None) -> _ParentBoundContext:
        return _ParentBoundContext(self._module.get_context(method))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


@contextmanager
def workers_die_with_us(module: Any) -> Iterator[None]:
    """While inside, pools that ``module`` creates with ``multiprocessing.get_context(...).Pool`` get workers that die
    with this process: nnU-Net's fingerprint extractor starts its own spawn pool and takes no initializer."""
    original = getattr(module, "multiprocessing", None)
    if original is None:  # another nnU-Net version: nothing to bind
        yield
        return
    module.multiprocessing = _ParentBoundMultiprocessing(original)
    try:
        yield
    finally:
        module.multiprocessing = original


def run_parallel(fn: Callable[..., Any], jobs: list[tuple], num_processes: int, desc: str) -> None:
    """Run ``fn(*job)`` for every job with a progress bar; in-process for one worker (cheaper than spawning).

    The workers die with this process (``_die_with_parent``), so a killed prepare leaves no process behind.
    """
    if not jobs:
        return
    with tqdm(total=len(jobs), desc=desc, unit="case") as bar:
        if num_processes <= 1:
            for job in jobs:
                fn(*job)
                bar.update()
            return
        with ProcessPoolExecutor(
            max_workers=num_processes,
            mp_context=get_context("spawn"),
            initializer=_die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            for future in [pool.submit(fn, *job) for job in jobs]:
                future.result()
                bar.update()
