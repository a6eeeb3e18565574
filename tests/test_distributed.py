"""Multi-process (DDP) training on CPU with gloo: the collective helpers, then a real 2-process run with a filter round.

Every rank must end with the same pool, filter rounds, student and EMA-teacher weights, while drawing different data.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import CONFIG, DATASET
from nnfiltermatch import distributed

# ----- the helpers without a process group: the single-process path is unchanged ----------------------------------


def test_helpers_are_noops_without_a_process_group() -> None:
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert distributed.shard(["a", "b", "c"]) == ["a", "b", "c"]
    assert distributed.gather_scores({"a": 1.0}) == {"a": 1.0}
    box = {"x": 1}
    assert distributed.broadcast_from_rank0(box) is box
    distributed.barrier()
    assert distributed.init_from_env("cpu") is False  # no RANK / WORLD_SIZE: nothing to join


def test_merges_and_their_guards() -> None:
    assert distributed.merge_scores([{"a": 1.0}, {"b": 2.0}, {"a": 1.0}]) == {"a": 1.0, "b": 2.0}
    with pytest.raises(RuntimeError, match="scored twice"):
        distributed.merge_scores([{"a": 1.0}, {"a": 1.5}])


def test_backend_choice_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    assert distributed.check_backend("cpu", None) == "gloo"
    assert distributed.check_backend("cuda", None) == "nccl"
    assert distributed.check_backend("cuda", "gloo") == "gloo"
    with pytest.raises(distributed.DistributedSetupError, match="nccl needs --device cuda"):
        distributed.check_backend("cpu", "nccl")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched_by_torchrun()
    with pytest.raises(distributed.DistributedSetupError, match="multi-node"):
        distributed.init_from_env("cuda")


def test_state_digest_sees_every_weight() -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2, affine=True))
    b = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2, affine=True))
    b.load_state_dict(a.state_dict())
    assert distributed.state_digest(a) == distributed.state_digest(b) == distributed.state_digest(a.state_dict())
    with torch.no_grad():
        b[1].bias[0] += 1e-7
    assert distributed.state_digest(a) != distributed.state_digest(b)
    assert distributed.state_digest(None) is None


# ----- the helpers in a real 2-process gloo group ------------------------------------------------------------------


def _helper_worker(out: str) -> None:
    """One rank: joins the group the way training does (env://) and records what every collective returned."""
    assert distributed.init_from_env("cpu") is True
    r = distributed.rank()
    cases = [f"case_{i}" for i in range(5)]
    mine = distributed.shard(cases)
    scores = distributed.gather_scores({c: float(cases.index(c)) for c in mine})
    decision = distributed.broadcast_from_rank0({"decided_by": r})
    # DDP on CPU without device_ids (what the trainer does): different initial weights and different data per rank
    torch.manual_seed(100 + r)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    after_wrap = distributed.state_digest(model)
    optimiser = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        optimiser.zero_grad()
        ddp(torch.randn(5, 4)).square().mean().backward()
        optimiser.step()
    distributed.barrier()
    result = {
        "mine": mine,
        "scores": scores,
        "decision": decision,
        "after_wrap": after_wrap,
        "after_steps": distributed.state_digest(model),
    }
    del ddp, optimiser  # DDP's reducer holds gloo state: release it while the group is alive, as training does
    with distributed.leaving_group(True):
        Path(out, f"helpers_{r}.json").write_text(json.dumps(result))


def test_helpers_in_a_two_process_gloo_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    start = time.time()
    distributed.spawn(2, _helper_worker, (str(tmp_path),))
    ranks = [json.loads((tmp_path / f"helpers_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["mine"] == ["case_0", "case_2", "case_4"] and ranks[1]["mine"] == ["case_1", "case_3"]
    expected = {f"case_{i}": float(i) for i in range(5)}
    assert ranks[0]["scores"] == ranks[1]["scores"] == expected
    assert ranks[0]["decision"] == ranks[1]["decision"] == {"decided_by": 0}
    assert ranks[0]["after_wrap"] == ranks[1]["after_wrap"]  # DDP broadcast rank 0's weights
    assert ranks[0]["after_steps"] == ranks[1]["after_steps"]  # averaged gradients keep them identical
    assert ranks[0]["after_wrap"] != ranks[0]["after_steps"]
    assert "MASTER_PORT" not in os.environ  # spawn restores the environment
    assert time.time() - start < 60


# ----- a real 2-process training with a filter round ---------------------------------------------------------------


def test_two_process_training_keeps_ranks_identical(prepared: Path, tmp_path: Path) -> None:
    """3 epochs x 2 iterations, warm-up 1, filter at epoch 2 (the pool window-scored, shared out over the ranks)."""
    digests = tmp_path / "digests"
    env = {**os.environ, distributed.DIGEST_ENV: str(digests), "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0"}
    args = [
        "train",
        "-d",
        DATASET,
        "-c",
        CONFIG,
        "-f",
        "all",
        "--mode",
        "filtermatch",
        "--device",
        "cpu",
        "--num-gpus",
        "2",
        "--epochs",
        "3",
        "--iters-per-epoch",
        "2",
        "--val-iters-per-epoch",
        "1",
        "--warmup-epochs",
        "1",
        "--ssl-start-dice",
        "0",
        "--filter-start",
        "2",
        "--filter-tile-step",
        "1.0",
        "--no-final-validation",
        "--overwrite",
    ]
    start = time.time()
    # the limit catches a hung process group, not slowness: on 2 loaded cores this run took over 240 s
    run = subprocess.run(
        [sys.executable, "-m", "nnfiltermatch.cli", *args], env=env, capture_output=True, text=True, timeout=900
    )
    seconds = time.time() - start
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("Model written to") == 1

    r0, r1 = (json.loads((digests / f"rank_{r}.json").read_text()) for r in (0, 1))
    for rank, digest in enumerate((r0, r1)):
        assert digest["rank"] == rank and digest["world_size"] == 2
        assert digest["device"] == "cpu"  # nnU-Net would have forced cuda:<rank>
        assert digest["batch_size"] == 1 and digest["unlabeled_batch_size"] == 1  # the plan's batch 2, split
    assert r0["pool"] == r1["pool"] and len(r0["pool"]) == 31
    assert r0["filter_rounds"] == r1["filter_rounds"] and [r["epoch"] for r in r0["filter_rounds"]] == [2]
    assert r0["student"] == r1["student"]
    assert r0["teacher"] == r1["teacher"] and r0["teacher"] is not None and r0["teacher"] != r0["student"]
    # the ranks drew different unlabelled patches in the last epoch (seeded per rank), 2 steps x 1 patch each
    assert r0["unlabeled_drawn"] != r1["unlabeled_drawn"]
    assert 1 <= len(r0["unlabeled_drawn"]) <= 2 and 1 <= len(r1["unlabeled_drawn"]) <= 2

    out = prepared / "results" / DATASET / f"nnFilterMatchTrainer__nnUNetPlans__{CONFIG}" / "fold_all"
    record = json.loads((out / "filter_rounds" / "epoch_0002.json").read_text())
    assert record["world_size"] == 2 and record["pool_before"] == 36 and record["pool_after"] == 31
    dropped = sorted(c["case"] for c in record["cases"] if not c["kept"])
    assert dropped == r0["filter_rounds"][0]["dropped"]
    # the pool was window-scored shared out over the ranks and gathered: every case once, with a finite score
    scored = [c["case"] for c in record["cases"]]
    assert len(set(scored)) == 36 and set(r0["pool"]) < set(scored)
    assert all(math.isfinite(c["score"]) for c in record["cases"])

    from nnfiltermatch.runs import STATE_KEY  # here, not at the top: spawned helper workers import this module

    checkpoint = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    state = checkpoint["init_args"][STATE_KEY]
    assert state["pool"] == r0["pool"] and [r["epoch"] for r in state["filter_rounds"]] == [2]
    assert distributed.state_digest(checkpoint["network_weights"]) == r0["student"]
    assert distributed.state_digest(state["teacher"]) == r0["teacher"]
    assert not list(out.glob("*.partial"))
    print(f"2-process DDP training: {seconds:.1f} s")
