"""Multi-process (DistributedDataParallel) support: process-group set-up and the filter's few collectives.

nnU-Net v2 trains under DDP by running one trainer per process; everything it does not synchronise itself is ours
to keep consistent. For the filter that means: score each case once (cases shared out over the ranks), gather the
scores, decide on rank 0 and broadcast the decision, then rebuild every rank's unlabelled loader on the same pool,
with a barrier rather than a sleep. The helpers here are no-ops without an initialised process group, so the
single-process path runs exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
BACKENDS: tuple[str, ...] = ("gloo", "nccl")
DIGEST_ENV = "NNFM_DDP_DIGEST_DIR"


class DistributedSetupError(ValueError):
    """A multi-process request that cannot work (bad backend, too few GPUs, multi-node CUDA)."""


# ----- who am I ---------------------------------------------------------------------------------------------------
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_by_torchrun() -> bool:
    """True when torchrun (or any env:// launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


# ----- set-up -----------------------------------------------------------------------------------------------------
def default_backend(device: str) -> str:
    """NCCL for CUDA, gloo otherwise (NCCL has no CPU tensors)."""
    return "nccl" if device == "cuda" else "gloo"


def check_backend(device: str, backend: str | None) -> str:
    backend = backend or default_backend(device)
    if backend not in BACKENDS:
        raise DistributedSetupError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if backend == "nccl" and device != "cuda":
        raise DistributedSetupError("--backend nccl needs --device cuda; on CPU use gloo (the default there)")
    return backend


def init_from_env(device: str, backend: str | None = None) -> bool:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (torchrun's variables).

    Returns True when this call created the group (the caller then destroys it), False when there is nothing to do.
    nnU-Net maps the global rank to the CUDA device index, so CUDA training is single-node only: refused otherwise.
    """
    if is_distributed() or not launched_by_torchrun():
        return False
    backend = check_backend(device, backend)
    world = int(os.environ["WORLD_SIZE"])
    global_rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", global_rank))
    if device == "cuda":
        if local_rank != global_rank:
            raise DistributedSetupError(
                "nnU-Net's DDP code uses the global rank as the CUDA device index: multi-node CUDA training is not "
                "supported; run one node (torchrun --nnodes 1)"
            )
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"rank {local_rank} has no GPU: {torch.cuda.device_count()} visible, {world} processes requested"
            )
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # N processes on one CPU: share the cores rather than oversubscribe them N times over
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method="env://", rank=global_rank, world_size=world)
    return True


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


@contextmanager
def leaving_group(owns_group: bool) -> Iterator[None]:
    """Leave the process group this process joined when the block ends.

    On success every rank first waits for the others: a rank that tears gloo down while its peer still has work in
    flight can abort at exit (SIGABRT, "terminate called without an active exception"). On an error it leaves at
    once, since a barrier would wait for a peer that may never arrive.
    """
    try:
        yield
    except BaseException:
        if owns_group:
            destroy()
        raise
    if owns_group:
        barrier()
        destroy()


def free_port() -> int:
    """A free TCP port on this machine for the rendezvous (as nnU-Net's run_ddp finds one; without its imports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _spawned(index: int, world: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    # the same variables torchrun sets, so spawned and torchrun-launched processes take one code path
    os.environ.update({"RANK": str(index), "LOCAL_RANK": str(index), "WORLD_SIZE": str(world)})
    fn(*args)
    # A rank that finished (its group left, its files written) exits without interpreter teardown: destroying gloo's
    # objects there aborted now and then (SIGABRT, "terminate called without an active exception"; torch 2.14.1),
    # which mp.spawn reports as a failed run. An exception above still takes mp.spawn's error path.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(num_processes: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run ``fn(*args)`` in ``num_processes`` fresh processes on this machine, as nnU-Net's ``-num_gpus`` does.

    Sets MASTER_ADDR / MASTER_PORT (a free port unless MASTER_PORT is set) and RANK / LOCAL_RANK / WORLD_SIZE in each
    child; the child joins the group with :func:`init_from_env`. Raises if any child fails.
    """
    import torch.multiprocessing as mp

    saved = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    try:
        mp.spawn(_spawned, args=(num_processes, fn, args), nprocs=num_processes, join=True)
    finally:  # a later spawn from this process picks a fresh port
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----- the filter's collectives -----------------------------------------------------------------------------------
def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (every world_size-th from its rank), so each case is scored once."""
    return list(items[rank() :: world_size()])


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def merge_scores(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Union of per-rank score dicts; a case scored by two ranks must have the same score (it is a bug otherwise)."""
    merged: dict[str, float] = {}
    for part in parts:
        for case, score in part.items():
            if case in merged and merged[case] != score:
                raise RuntimeError(f"case {case} was scored twice with different results ({merged[case]}, {score})")
            merged[case] = score
    return merged


def gather_scores(local: dict[str, float]) -> dict[str, float]:
    """All ranks' scores, on every rank."""
    return merge_scores(all_gather(local))


def broadcast_from_rank0(obj: T) -> T:
    """Rank 0's ``obj`` on every rank: the one decision everyone follows. Identity without a process group."""
    if not is_distributed():
        return obj
    box: list[Any] = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----- verification -----------------------------------------------------------------------------------------------
def state_digest(module: nn.Module | Mapping[str, torch.Tensor] | None) -> str | None:
    """SHA-256 over a state dict (names, shapes, dtypes and bytes): equal digests mean identical weights.

    Takes a module or a state dict, so a rank's live network can be compared with a checkpoint's weights.
    """
    if module is None:
        return None
    state = module.state_dict() if isinstance(module, nn.Module) else module
    digest = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def maybe_write_rank_digest(payload: dict[str, Any]) -> Path | None:
    """With NNFM_DDP_DIGEST_DIR set, write this rank's final-state summary there, so tests can compare ranks."""
    folder = os.environ.get(DIGEST_ENV)
    if not folder:
        return None
    path = Path(folder) / f"rank_{rank()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": rank(), "world_size": world_size(), **payload}, indent=2, sort_keys=True))
    return path
