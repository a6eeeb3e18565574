"""`train --continue` is the run it continues: killed and resumed, the model equals the uninterrupted one bit for bit.

And what `--continue` cannot honour (another --epochs, --seed or labelled set) is refused before any training.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import CONFIG, DATASET
from nnfiltermatch.commands.training import train
from nnfiltermatch.commands.training_checks import finished_with, record_labelled_cases
from nnfiltermatch.config import CONFIG_FILENAME, resolve_config
from nnfiltermatch.data.manifest import PreparedDataset, load_prepared
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.nnunet.trainer import nnFilterMatchTrainer
from nnfiltermatch.runs import FILTER_DIRNAME, STATE_KEY, output_folder_for

# 4 epochs, rounds at the start of epochs 1 and 3, checkpoint_latest after epochs 1 (and 3: the last, so never);
# every strong-view operation on, so the view generator is drawn from at every step
RUN = {
    "mode": "filtermatch",
    "deterministic": True,
    "epochs": 4,
    "iters_per_epoch": 2,
    "val_iters_per_epoch": 1,
    "warmup_epochs": 1,
    "ssl_start_dice": 0.0,
    "save_every": 2,
    "filter_start": 1,
    "filter_every": 2,
    "filter_tile_step": 1.0,
    "cutout_p": 0.5,
    "cutmix_p": 0.5,
    "copy_paste_p": 0.5,
}
TIMESTAMPS = ("epoch_start_timestamps", "epoch_end_timestamps")


class Killed(Exception):
    """Stands in for SIGKILL: the run stops mid-epoch, with what it holds in memory lost."""


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def _tensors(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: student, EMA teacher, optimiser momentum."""
    state = checkpoint["init_args"][STATE_KEY]
    found = {f"network_weights/{k}": v for k, v in checkpoint["network_weights"].items()}
    found.update({f"teacher/{k}": v for k, v in (state["teacher"] or {}).items()})
    for index, entry in checkpoint["optimizer_state"]["state"].items():
        found.update({f"optimizer/{index}/{k}": v for k, v in entry.items() if torch.is_tensor(v)})
    return found


def _without_seconds(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "seconds"}  # wall-clock time of the round, never repeatable


def _rounds_on_disk(out: Path) -> dict[str, dict[str, Any]]:
    return {p.name: _without_seconds(json.loads(p.read_text())) for p in sorted((out / FILTER_DIRNAME).glob("*"))}


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 136
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} of {len(ta)} tensors differ: {differ[:5]}"
    sa, sb = a["init_args"][STATE_KEY], b["init_args"][STATE_KEY]
    assert sa["pool"] == sb["pool"] and sa["ssl_start_epoch"] == sb["ssl_start_epoch"]
    assert [_without_seconds(r) for r in sa["filter_rounds"]] == [_without_seconds(r) for r in sb["filter_rounds"]]
    assert sa["config"] == sb["config"]
    assert a["current_epoch"] == b["current_epoch"] and a["_best_ema"] == b["_best_ema"]
    la, lb = ({k: v for k, v in c["logging"].items() if k not in TIMESTAMPS} for c in (a, b))
    np.testing.assert_equal(la, lb)  # losses, Dice, learning rates, pool sizes: exactly (NaN equal to NaN)


def test_killed_and_continued_run_equals_the_uninterrupted_one(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 epochs straight, then the same run killed in epoch 3 (after its second filter round) and continued from
    checkpoint_latest (after epoch 1): checkpoint_final, checkpoint_best and the round files are the same."""
    config = resolve_config(dict(RUN))
    straight = train(DATASET, CONFIG, "all", config, "cpu", overwrite=True, final_validation=False).output_folder
    expected = tmp_path / "straight"
    shutil.copytree(straight, expected)
    assert sorted(_rounds_on_disk(expected)) == ["epoch_0001.json", "epoch_0003.json"]

    step = nnFilterMatchTrainer.train_step

    def killed_in_epoch_3(self: nnFilterMatchTrainer, batch: dict) -> dict:
        if self.current_epoch == 3 and self._epoch_stats:  # one step of epoch 3 done, in memory only
            raise Killed
        return step(self, batch)

    monkeypatch.setattr(nnFilterMatchTrainer, "train_step", killed_in_epoch_3)
    with pytest.raises(Killed):
        train(DATASET, CONFIG, "all", resolve_config(dict(RUN)), "cpu", overwrite=True, final_validation=False)
    monkeypatch.undo()
    assert not (straight / "checkpoint_final.pth").exists()
    assert _load(straight / "checkpoint_latest.pth")["current_epoch"] == 2  # epochs 2 and 3 are redone
    assert (straight / FILTER_DIRNAME / "epoch_0003.json").is_file()  # a round the checkpoint does not know of

    resumed = train(
        DATASET,
        CONFIG,
        "all",
        resolve_config(dict(RUN)),
        "cpu",
        continue_training=True,
        final_validation=False,
        explicit_options={"epochs", "seed"},  # given again with their stored values: accepted
    ).output_folder
    assert resumed == straight
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        _same_run(_load(expected / name), _load(resumed / name))
    assert _rounds_on_disk(resumed) == _rounds_on_disk(expected)
    final = _load(resumed / "checkpoint_final.pth")["init_args"][STATE_KEY]
    assert [r["epoch"] for r in final["filter_rounds"]] == [1, 3] and len(final["pool"]) == 36 - 5 - 4


def _stored_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A results tree of its own holding a run's fold folder with its stored configuration, as training writes it."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    out = output_folder_for(DATASET, "nnFilterMatchTrainer", "nnUNetPlans", CONFIG, "all")
    out.mkdir(parents=True)
    config = resolve_config(dict(RUN))
    record_labelled_cases(config, load_prepared(DATASET))
    config.write(out / CONFIG_FILENAME)
    return out


def _one_more_labelled(monkeypatch: pytest.MonkeyPatch) -> PreparedDataset:
    """The prepared dataset as `prepare --add-labels` leaves it, for training: its first unlabelled case labelled."""
    import nnfiltermatch.commands.training

    prepared = load_prepared(DATASET)
    moved = prepared.unlabeled_ids[0]
    changed = dataclasses.replace(
        prepared, labeled_ids=sorted([*prepared.labeled_ids, moved]), unlabeled_ids=prepared.unlabeled_ids[1:]
    )
    monkeypatch.setattr(nnfiltermatch.commands.training, "load_prepared", lambda name: changed)
    return changed


def test_continue_refuses_what_it_cannot_honour(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another --epochs, another --seed, other labelled cases: each refused before anything trains or is written,
    naming the option with its stored and its new value."""
    out = _stored_run(tmp_path, monkeypatch)
    stored = (out / CONFIG_FILENAME).read_text()

    def refusal(options: dict[str, object]) -> str:
        config = resolve_config({**RUN, **options})
        with pytest.raises(PreparationError) as refused:
            train(
                DATASET,
                CONFIG,
                "all",
                config,
                "cpu",
                continue_training=True,
                final_validation=False,
                explicit_options=set(options),
            )
        assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILENAME]  # no log, no lock left, nothing trained
        assert (out / CONFIG_FILENAME).read_text() == stored
        message = str(refused.value)
        assert message.startswith(f"--continue resumes the run in {out} as it would have gone on uninterrupted")
        return message

    epochs = refusal({"epochs": 6})
    assert "--epochs 6 (stored 4): the learning-rate schedule, warm-up, ramp and filter rounds" in epochs
    assert "Leave these options out (or give the stored values) to resume it." in epochs
    both = refusal({"seed": 1, "epochs": 6})
    assert "\n  --epochs 6 (stored 4)" in both and "\n  --seed 1 (stored 0): the epochs already trained drew" in both
    moved = load_prepared(DATASET).unlabeled_ids[0]
    _one_more_labelled(monkeypatch)
    labelled = refusal({})
    assert f"the labelled cases of the prepared dataset: 5 now, 4 when the run started (added {moved})" in labelled
    assert "Leave these options" not in labelled and "`train --round K` trains round K into its own folder" in labelled


def test_selftrain_reuses_its_supervised_stage_only_with_the_same_labelled_cases(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _stored_run(tmp_path, monkeypatch)
    (out / "checkpoint_final.pth").touch()
    config = resolve_config(dict(RUN))
    record_labelled_cases(config, load_prepared(DATASET))
    assert finished_with(out, config)
    record_labelled_cases(config, _one_more_labelled(monkeypatch))
    assert not finished_with(out, config)


def test_a_pool_case_gone_from_the_unlabelled_folder_is_dropped_with_a_note(prepared: Path) -> None:
    """Removed unlabelled images (the one change to the data `--continue` does not refuse): the saved pool goes on
    without them, and the log says that the run no longer draws what the uninterrupted one would."""
    from nnfiltermatch.commands.training import build_trainer

    trainer = build_trainer(DATASET, CONFIG, "all", resolve_config(dict(RUN)), torch.device("cpu"))
    pool = load_prepared(DATASET).unlabeled_ids[:3]
    assert trainer._pool_still_unlabeled([*pool, "hippocampus_999"]) == pool
    log = Path(trainer.log_file).read_text()
    assert "1 case(s) of the saved unlabelled pool are no longer unlabelled" in log and "hippocampus_999" in log
    assert "no longer draws what the uninterrupted one would" in log
