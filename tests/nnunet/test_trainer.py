"""The trainer on real Hippocampus cases: three modes, the filter on schedule, loaders, checkpoints, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIG, DATASET, overwrite_tensor_bytes
from nnfiltermatch.commands.training import build_trainer, train
from nnfiltermatch.config import CONFIG_FILENAME, TrainConfig, resolve_config
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.runs import STATE_KEY

SHORT = {
    "epochs": 2,
    "iters_per_epoch": 3,
    "val_iters_per_epoch": 1,
    "warmup_epochs": 1,
    "ssl_start_dice": 0.0,  # the gate is tested on its own: these tests need pseudo-labels after warm-up
    "save_every": 1,
    "filter_tile_step": 1.0,
}


def _checkpoint(folder: Path, name: str = "checkpoint_final.pth") -> dict:
    return torch.load(folder / name, map_location="cpu", weights_only=False)


# "ssl+views": every optional strong-view operation on at every step, through nnU-Net's real batches (DS targets)
@pytest.mark.parametrize("mode", ["supervised", "ssl", "ssl+views"])
def test_modes_train_end_to_end(prepared: Path, mode: str) -> None:
    views = {"cutout_p": 1.0, "cutmix_p": 1.0, "copy_paste_p": 1.0} if mode == "ssl+views" else {}
    mode = mode.split("+")[0]
    config = resolve_config({**SHORT, "mode": mode, **views})
    result = train(DATASET, CONFIG, "all", config, "cpu", final_validation=False, overwrite=bool(views))
    out = result.output_folder
    assert out.name == "fold_all" and out.parent.name.endswith(f"__nnUNetPlans__{CONFIG}")
    for name in ("checkpoint_final.pth", "progress.png", "progress_ssl.png", CONFIG_FILENAME):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.partial"))
    assert json.loads((out / CONFIG_FILENAME).read_text())["mode"] == mode
    checkpoint = _checkpoint(out)
    state = checkpoint["init_args"][STATE_KEY]
    logging = checkpoint["logging"]
    assert state["mode"] == mode and checkpoint["current_epoch"] == 2
    if mode == "supervised":
        assert state["pool"] is None and logging["unsup_losses"] == [0.0, 0.0]
    else:
        assert len(state["pool"]) == 36 and state["filter_rounds"] == []
        assert logging["unsup_losses"][0] == 0.0 and logging["unsup_losses"][1] > 0.0  # after warm-up only
        assert state["teacher"] is not None  # EMA teacher by default
    assert len(logging["pool_size"]) == 2 and len(logging["confident_fraction"]) == 2


def test_paired_runs_share_their_random_numbers(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seed, single-process augmentation: ssl sees its supervised twin's labelled batches, and an ssl run whose
    pseudo-labels never start trains the supervised model bit for bit, so a paired difference is the method's."""
    from nnfiltermatch.nnunet.trainer import nnFilterMatchTrainer

    seen: list[bytes] = []
    original = nnFilterMatchTrainer.train_step

    def recording_step(self: nnFilterMatchTrainer, batch: dict) -> dict:
        seen.append(batch["data"].numpy().tobytes())
        return original(self, batch)

    monkeypatch.setattr(nnFilterMatchTrainer, "train_step", recording_step)

    def run(mode: str, **options: object) -> tuple[list[bytes], dict, dict]:
        seen.clear()
        config = resolve_config({**SHORT, "mode": mode, "deterministic": True, **options})
        out = train(DATASET, CONFIG, "all", config, "cpu", overwrite=True, final_validation=False).output_folder
        return list(seen), _checkpoint(out), json.loads((out / CONFIG_FILENAME).read_text())

    supervised_batches, supervised, _ = run("supervised")
    ssl_batches, ssl, written = run("ssl")  # pseudo-labels from epoch 1: unlabelled batches between labelled ones
    assert written["deterministic"] and written["extra"]["augmentation_processes"] == 0
    assert ssl["logging"]["unsup_losses"][1] > 0.0
    assert len(supervised_batches) == 6 and ssl_batches == supervised_batches
    _, never_started, _ = run("ssl", ssl_start_dice=1.0)
    assert never_started["init_args"][STATE_KEY]["ssl_start_epoch"] is None
    weights = supervised["network_weights"]
    assert all(torch.equal(weights[k], never_started["network_weights"][k]) for k in weights)
    assert not all(torch.equal(weights[k], ssl["network_weights"][k]) for k in weights)


def test_filtermatch_filters_on_schedule(prepared: Path) -> None:
    config = resolve_config({**SHORT, "mode": "filtermatch", "epochs": 3, "filter_start": 2})
    assert config.filter_epochs == [2]
    out = train(DATASET, CONFIG, "all", config, "cpu", overwrite=True, final_validation=False).output_folder
    record = json.loads((out / "filter_rounds" / "epoch_0002.json").read_text())
    assert record["pool_before"] == 36 and record["pool_after"] == 31  # floor(0.15 * 36) = 5 dropped
    dropped = sorted(c["case"] for c in record["cases"] if not c["kept"])
    scores = {c["case"]: c["score"] for c in record["cases"]}
    assert max(scores[c] for c in dropped) <= min(s for c, s in scores.items() if c not in dropped)
    assert record["seconds"] > 0
    # every case scored by sliding-window inference, the only scoring (no per-case "source" to tell apart)
    assert len(scores) == 36 and all("source" not in c for c in record["cases"])
    state = _checkpoint(out)["init_args"][STATE_KEY]
    assert len(state["pool"]) == 31 and not set(dropped) & set(state["pool"])
    assert [r["epoch"] for r in state["filter_rounds"]] == [2]
    assert _checkpoint(out)["logging"]["pool_size"] == [36, 36, 31]


def test_rebuilt_loader_draws_only_kept_cases(prepared: Path) -> None:
    config = resolve_config({**SHORT, "mode": "filtermatch", "filter_drop": 0.5})
    trainer = build_trainer(DATASET, CONFIG, "all", config, torch.device("cpu"))
    trainer.on_train_start()
    try:
        assert trainer.pool is not None and len(trainer.pool) == 36
        seen_before = {k for _ in range(20) for k in next(trainer.dataloader_unlabeled)["keys"]}
        record = trainer.run_filter_round()
        dropped = set(record.dropped)
        assert len(dropped) == 18 and len(trainer.pool) == 18
        seen_after = {k for _ in range(30) for k in next(trainer.dataloader_unlabeled)["keys"]}
        assert seen_after <= set(trainer.pool) and not seen_after & dropped
        assert seen_before & dropped  # the old loader did draw them, so the check above is meaningful
    finally:
        trainer.on_train_end()


def test_pseudo_labels_wait_for_every_class_then_the_teacher_copies_the_student(prepared: Path) -> None:
    config = resolve_config({**SHORT, "mode": "ssl", "ssl_start_dice": 0.5})  # warm-up: epoch 0
    trainer = build_trainer(DATASET, CONFIG, "all", config, torch.device("cpu"))
    trainer.on_train_start()
    try:
        student, teacher = trainer.plain_network(), trainer.teacher
        assert teacher is not None
        with torch.no_grad():  # stands in for the warm-up's supervised training
            for parameter in student.parameters():
                parameter.add_(0.5)
        dice = trainer.logger.local_logger.my_fantastic_logging["dice_per_class_or_region"]
        for epoch, last_dice in ((0, [0.9, 0.9]), (1, [0.0, 0.7]), (2, [0.45, 0.8])):  # warm-up, then a class missed
            trainer.current_epoch = epoch
            dice.append(last_dice)
            assert not trainer.start_semi_supervision_if_due() and not trainer.semi_supervised_now()
            assert trainer.pseudo_label_model() is student
        assert not all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
        trainer.current_epoch = 3
        dice.append([0.55, 0.8])
        assert trainer.start_semi_supervision_if_due() and trainer.ssl_start_epoch == 3
        assert trainer.semi_supervised_now() and trainer.pseudo_label_model() is teacher
        assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
        assert trainer.state_for_checkpoint()["ssl_start_epoch"] == 3
        trainer.current_epoch = 4
        assert not trainer.start_semi_supervision_if_due() and trainer.ssl_start_epoch == 3  # decided once
    finally:
        trainer.on_train_end()


def test_existing_run_is_not_overwritten(prepared: Path) -> None:
    config = resolve_config({**SHORT, "mode": "supervised"})
    train(DATASET, CONFIG, "all", config, "cpu", overwrite=True, final_validation=False)
    with pytest.raises(PreparationError, match="--continue"):
        train(DATASET, CONFIG, "all", config, "cpu", final_validation=False)
    changed = resolve_config({**SHORT, "mode": "supervised", "tau": 0.5})
    with pytest.raises(PreparationError, match="--tau 0.5 \\(stored 0.9\\)"):
        train(
            DATASET,
            CONFIG,
            "all",
            changed,
            "cpu",
            continue_training=True,
            final_validation=False,
            explicit_options={"tau", "epochs"},
        )
    with pytest.raises(PreparationError, match="-f all"):
        train(DATASET, CONFIG, 0, config, "cpu", final_validation=False)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nnfiltermatch.cli", *args]


def test_killed_run_resumes_with_pool_rounds_and_optimiser(prepared: Path) -> None:
    """SIGKILL after the first filter round; --continue must not redo it and must run the second on schedule."""
    env = {**os.environ, "nnUNet_n_proc_DA": "1"}  # real worker processes, rebuilt after the filter round
    args = [
        "train",
        "-d",
        "901",
        "-c",
        CONFIG,
        "-f",
        "all",
        "--mode",
        "filtermatch",
        "--device",
        "cpu",
        "--epochs",
        "5",
        "--iters-per-epoch",
        "3",
        "--val-iters-per-epoch",
        "1",
        "--warmup-epochs",
        "1",
        "--ssl-start-dice",
        "0",
        "--filter-start",
        "2",
        "--filter-every",
        "2",
        "--save-every",
        "1",
        "--filter-tile-step",
        "1.0",
        "--no-final-validation",
    ]
    out = prepared / "results" / DATASET / f"nnFilterMatchTrainer__nnUNetPlans__{CONFIG}" / "fold_all"
    process = subprocess.Popen(
        _cli(*args, "--overwrite"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so the kill below reaches the augmentation workers too
    )
    deadline = time.time() + 480  # about 60 s on an idle 2-core machine; generous for a loaded one
    try:
        while time.time() < deadline:
            logs = list(out.glob("training_log_*.txt"))
            if logs and "Epoch 3" in logs[0].read_text():
                break  # epoch 2 (with its filter round) ended and its checkpoint_latest was written
            assert process.poll() is None, "training ended before it could be interrupted"
            time.sleep(0.2)
        else:
            pytest.fail("training did not reach epoch 3 in time")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and its data-augmentation workers, as a crash would
        process.wait()
    latest = _checkpoint(out, "checkpoint_latest.pth")
    assert latest["current_epoch"] == 3
    assert [r["epoch"] for r in latest["init_args"][STATE_KEY]["filter_rounds"]] == [2]
    first_round = (out / "filter_rounds" / "epoch_0002.json").read_text()

    resumed = subprocess.run(_cli(*args, "--continue"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    final = _checkpoint(out)
    state = final["init_args"][STATE_KEY]
    assert final["current_epoch"] == 5
    assert [r["epoch"] for r in state["filter_rounds"]] == [2, 4]
    assert len(state["pool"]) == 31 - 4  # floor(0.15 * 31) = 4 in the second round
    assert (out / "filter_rounds" / "epoch_0002.json").read_text() == first_round
    assert final["logging"]["pool_size"] == [36, 36, 31, 31, 27]
    assert final["optimizer_state"]["state"], "optimiser momentum restored and carried on"


def test_continue_refuses_a_plain_nnunet_checkpoint(prepared: Path) -> None:
    """A checkpoint without our pool and filter state (plain nnU-Net) must not be resumed as a semi-supervised run."""
    config = resolve_config({**SHORT, "mode": "supervised"})
    out = train(DATASET, CONFIG, "all", config, "cpu", overwrite=True, final_validation=False).output_folder
    checkpoint = _checkpoint(out)
    del checkpoint["init_args"][STATE_KEY]
    checkpoint["trainer_name"] = "nnUNetTrainer"
    torch.save(checkpoint, out / "checkpoint_final.pth")
    with pytest.raises(PreparationError, match="not written by nnfiltermatch"):
        train(DATASET, CONFIG, "all", config, "cpu", continue_training=True, final_validation=False)


def test_nan_loss_stops_the_run_and_damaged_checkpoints_are_refused(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loss gone NaN after epoch 0 stops the run before NaN weights reach a checkpoint, naming the good one; a
    checkpoint damaged on disk (NaN bytes, or a finite change caught by its checksum) is refused by --continue,
    which says how to resume from checkpoint_best.pth; following that advice finishes the run."""
    from nnfiltermatch.method.semi_supervised import SemiSupervisedLoss
    from nnfiltermatch.nnunet.divergence import MAX_NON_FINITE_STEPS, NonFiniteTrainingError, verify_optimizer_state
    from nnfiltermatch.nnunet.trainer import nnFilterMatchTrainer
    from nnfiltermatch.runs import DIGEST_KEY, CheckpointError, load_checkpoint_safely

    trainers: list[nnFilterMatchTrainer] = []
    forward, epoch_start = SemiSupervisedLoss.forward, nnFilterMatchTrainer.on_train_epoch_start

    def nan_after_epoch_0(self: SemiSupervisedLoss, output: object, target: object) -> torch.Tensor:
        loss = forward(self, output, target)
        return loss * float("nan") if getattr(self, "poisoned", False) else loss  # NaN gradients, as divergence

    def start(self: nnFilterMatchTrainer) -> None:
        epoch_start(self)
        trainers.append(self)
        self.loss.poisoned = self.current_epoch >= 1

    monkeypatch.setattr(SemiSupervisedLoss, "forward", nan_after_epoch_0)
    monkeypatch.setattr(nnFilterMatchTrainer, "on_train_epoch_start", start)
    config = resolve_config({**SHORT, "mode": "supervised", "epochs": 3, "iters_per_epoch": 2})
    with pytest.raises(NonFiniteTrainingError) as stopped:
        train(DATASET, CONFIG, "all", config, "cpu", overwrite=True, final_validation=False)
    trainer = trainers[-1]
    out = Path(trainer.output_folder)
    message = str(stopped.value)
    assert message.startswith("training stopped at epoch 1: the weights hold NaN or infinite values in ")
    assert ", after the training loss became non-finite at epoch 1; checkpoint_latest.pth was not written" in message
    assert f"The last good checkpoint is {out / 'checkpoint_latest.pth'} (written at the end of epoch 0)" in message
    assert "`--continue` resumes from it" in message and "lower --lr (now 0.01)" in message
    assert not (out / "checkpoint_final.pth").exists()
    latest = load_checkpoint_safely(out / "checkpoint_latest.pth")  # finite, and equal to its stored digest
    assert latest["current_epoch"] == 1 and latest["init_args"][STATE_KEY][DIGEST_KEY]["network_weights"]

    # the streak: a finite loss resets it; MAX_NON_FINITE_STEPS in a row stop the run
    trainer.watch_loss({"loss": np.float32(0.5)})
    for _ in range(MAX_NON_FINITE_STEPS - 1):
        trainer.watch_loss({"loss": np.float32("nan")})
    with pytest.raises(NonFiniteTrainingError, match=f"non-finite \\(nan\\) for {MAX_NON_FINITE_STEPS} consecutive"):
        trainer.watch_loss({"loss": np.float32("nan")})
    with pytest.raises(CheckpointError, match="2 of 2 tensors of its optimizer_state hold NaN"):
        verify_optimizer_state(
            {
                "optimizer_state": {
                    "state": {
                        0: {"momentum_buffer": torch.tensor([float("nan")])},
                        1: {"b": torch.tensor([float("inf")])},
                    }
                }
            },
            out / "x.pth",
        )

    # 4 KiB of NaN inside one tensor of checkpoint_latest.pth, size unchanged
    path = out / "checkpoint_latest.pth"
    good = path.read_bytes()
    name = overwrite_tensor_bytes(path, latest["network_weights"], np.full(1024, np.nan, np.float32).tobytes())
    assert path.stat().st_size == len(good)
    monkeypatch.undo()  # a healthy loss from here on
    with pytest.raises(CheckpointError) as refused:
        train(DATASET, CONFIG, "all", config, "cpu", continue_training=True, final_validation=False)
    message = str(refused.value)
    damaged = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    nan_names = [k for k, v in damaged.items() if not torch.isfinite(v).all()]  # the tensor and its aliases
    assert name in nan_names
    found = f"{len(nan_names)} of {len(damaged)} tensors of its network_weights hold NaN or infinite values"
    assert f"{path}: unusable weights: {found} ({', '.join(nan_names)})" in message
    assert "checkpoint_best.pth (written at the end of epoch 0)" in message
    advice = "`mv checkpoint_latest.pth checkpoint_latest.pth.bad && cp checkpoint_best.pth checkpoint_latest.pth`"
    assert f"in {out} run {advice}, then train again with --continue" in message

    # a finite change: only the checksum notices
    altered = torch.load(out / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    altered["network_weights"][name] = altered["network_weights"][name] * 1.001
    torch.save(altered, path)
    with pytest.raises(
        CheckpointError, match="network_weights differ from the SHA-256 checksum .*every value is finite"
    ):
        train(DATASET, CONFIG, "all", config, "cpu", continue_training=True, final_validation=False)

    # the advice works: resumed from checkpoint_best.pth, the run finishes with verified weights
    path.rename(out / "checkpoint_latest.pth.bad")
    shutil.copy(out / "checkpoint_best.pth", path)
    train(DATASET, CONFIG, "all", config, "cpu", continue_training=True, final_validation=False)
    assert load_checkpoint_safely(out / "checkpoint_final.pth")["current_epoch"] == 3


def test_checkpoint_with_running_scores_of_an_older_version_resumes(prepared: Path, tmp_path: Path) -> None:
    """Checkpoints from before --filter-scoring running was removed carry "running_scores" and "filter_scoring" in
    their state: both are ignored, the rest resumes."""
    from nnfiltermatch.nnunet.unlabeled import UnlabeledDataset

    config = resolve_config({**SHORT, "mode": "filtermatch"})
    trainer = build_trainer(DATASET, CONFIG, "all", config, torch.device("cpu"))
    trainer.initialize()
    trainer.pool = UnlabeledDataset.get_identifiers(str(trainer.unlabeled_folder))[:-1]
    path = tmp_path / "old.pth"
    trainer.save_checkpoint(str(path))
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint["init_args"][STATE_KEY]
    state["running_scores"] = {trainer.pool[0]: [0.5, 2]}
    state["config"]["filter_scoring"] = "running"
    torch.save(checkpoint, path)
    resumed = build_trainer(DATASET, CONFIG, "all", config, torch.device("cpu"))
    resumed.load_checkpoint(str(path))
    assert resumed.pool == trainer.pool and not hasattr(resumed, "running_scores")
    stored = TrainConfig.from_dict(state["config"])
    assert stored.mode == "filtermatch" and "filter_scoring" not in stored.to_dict()


def test_selftrain_trains_on_the_supervised_models_pseudo_labels(
    prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline self-training as one command: the supervised run, the whole pool pseudo-labelled once by it, stage 2
    from its weights on labelled + pseudo-labelled batches; a second call reuses the finished supervised run."""
    import blosc2
    import numpy as np
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    # a seed no other test trains with, so no finished supervised run of these options exists yet
    config = resolve_config({**SHORT, "mode": "selftrain", "seed": 11})
    batches: list[tuple[str, int, int]] = []  # (trainer, rows nnU-Net's step trains on, labelled batch size)
    original = nnUNetTrainer.train_step

    def recording_step(self: nnUNetTrainer, batch: dict) -> dict:
        batches.append((type(self).__name__, batch["data"].shape[0], self.batch_size))
        return original(self, batch)

    monkeypatch.setattr(nnUNetTrainer, "train_step", recording_step)
    result = train(DATASET, CONFIG, "all", config, "cpu", overwrite=True, final_validation=False)
    out = result.output_folder
    assert out.parent.name.startswith("nnFilterMatchTrainer_selftrain__")
    assert result.supervised_stage is not None and not result.supervised_stage_reused
    supervised_written = json.loads((result.supervised_stage / CONFIG_FILENAME).read_text())
    assert supervised_written["mode"] == "supervised" and supervised_written["iters_per_epoch"] == 3
    written = json.loads((out / CONFIG_FILENAME).read_text())
    assert written["iters_per_epoch"] == 2  # half the iterations, twice the batch: the compute of one ssl run
    assert written["extra"]["selftrain_from"] == str(result.supervised_stage / "checkpoint_final.pth")
    stage1 = [n for name, n, b in batches if name == "nnFilterMatchTrainer_supervised" and n == b]
    stage2 = [n for name, n, b in batches if name == "nnFilterMatchTrainer_selftrain" and n == 2 * b]
    assert len(stage1) == 6 and len(stage2) == 4 and len(batches) == 10  # stage 2: labelled + as many pseudo
    trainer = build_trainer(DATASET, CONFIG, "all", config, torch.device("cpu"))
    labels = sorted((out / "pseudo_labels").glob("*.npy"))
    assert len(labels) == 36 and not list((out / "pseudo_labels").glob("*.partial*"))
    for path in labels[:5]:
        seg = np.load(path)
        image = blosc2.open(str(trainer.unlabeled_folder / path.name.replace(".npy", ".b2nd")), mode="r")
        assert seg.shape == (1, *image.shape[1:]) and set(np.unique(seg)) <= {0, 1, 2}
    state = _checkpoint(out)["init_args"][STATE_KEY]
    assert state["mode"] == "selftrain" and state["ssl_start_epoch"] == 0 and state["teacher"] is None
    assert "self-training starts from the supervised model" in "".join(
        log.read_text() for log in out.glob("training_log_*.txt")
    )
    stage1_mtime = (result.supervised_stage / "checkpoint_final.pth").stat().st_mtime
    again = train(DATASET, CONFIG, "all", config, "cpu", overwrite=True, final_validation=False)
    assert again.supervised_stage_reused
    assert (result.supervised_stage / "checkpoint_final.pth").stat().st_mtime == stage1_mtime
    # a supervised run with other options is not replaced unless asked
    other = resolve_config({**SHORT, "mode": "selftrain", "seed": 11, "lr": 5e-3})
    with pytest.raises(PreparationError, match="pass --overwrite to replace it"):
        train(DATASET, CONFIG, "all", other, "cpu", final_validation=False)
    # --continue once the labelled cases changed (prepare --add-labels): refused at stage 1, naming the case
    import dataclasses

    import nnfiltermatch.commands.training

    real = nnfiltermatch.commands.training.load_prepared(DATASET)
    moved = real.unlabeled_ids[0]
    changed = dataclasses.replace(
        real, labeled_ids=sorted([*real.labeled_ids, moved]), unlabeled_ids=real.unlabeled_ids[1:]
    )
    monkeypatch.setattr(nnfiltermatch.commands.training, "load_prepared", lambda name: changed)
    with pytest.raises(PreparationError, match=f"5 now, 4 when the run started \\(added {moved}\\)") as refused:
        train(DATASET, CONFIG, "all", config, "cpu", continue_training=True, final_validation=False)
    assert f"--continue resumes the run in {result.supervised_stage} " in str(refused.value)


def test_pseudo_labelled_stream_carries_its_fixed_labels(prepared: Path, tmp_path: Path) -> None:
    """The pseudo-labels reach the batches through nnU-Net's loader and augmentation, as a labelled case's do."""
    import blosc2
    import numpy as np

    from nnfiltermatch.nnunet.unlabeled import UnlabeledDataset, save_pseudo_label

    config = resolve_config({**SHORT, "mode": "ssl"})
    trainer = build_trainer(DATASET, CONFIG, "all", config, torch.device("cpu"))
    trainer.initialize()
    trainer.pool = UnlabeledDataset.get_identifiers(str(trainer.unlabeled_folder))
    for case in trainer.pool:
        shape = blosc2.open(str(trainer.unlabeled_folder / f"{case}.b2nd"), mode="r").shape[1:]
        save_pseudo_label(tmp_path, case, np.full((1, *shape), 2, dtype=np.int16))
    stream = trainer._build_unlabeled_loader(pseudo_label_folder=tmp_path)
    batch = next(stream)
    target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    assert target.shape[0] == trainer.unlabeled_batch_size
    assert (target == 2).float().mean() > 0.5  # all 2 but where augmentation padded the border
    plain = next(trainer._build_unlabeled_loader())
    plain_target = plain["target"][0] if isinstance(plain["target"], list) else plain["target"]
    assert not (plain_target == 2).any()


def test_selftrain_stages_match_one_ssl_run_in_compute() -> None:
    """Stage 1 is exactly the supervised run of the same options (so a finished one is reused); stage 2 trains half
    the iterations on a doubled batch, so the two cost what one ssl run costs."""
    from nnfiltermatch.commands.training import selftrain_stages

    config = resolve_config({"mode": "selftrain", "epochs": 10, "iters_per_epoch": 7, "seed": 3, "lr": 5e-3})
    supervised, stage2 = selftrain_stages(config)
    expected = resolve_config({"mode": "supervised", "epochs": 10, "iters_per_epoch": 7, "seed": 3, "lr": 5e-3})
    assert supervised.to_dict() == expected.to_dict()
    assert stage2.mode == "selftrain" and stage2.iters_per_epoch == 4 and stage2.epochs == 10
    assert config.iters_per_epoch == 7  # the caller's configuration is left alone
