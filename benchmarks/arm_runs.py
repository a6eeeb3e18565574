"""Running and evaluating the arms: the resumable loop (a finished run is kept, one trained with other settings is
refused), the test and validation scores of each run, and the step-cost measurement."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from arms import MODES, arm_config, shared_schedule
from protocols import REPO, Experiment, Profile, configuration_for, use_folders

from nnfiltermatch.files import atomic_write_text


def _evaluate(exp: Experiment, images: Path, labels: Path, model: Path, pred_dir: Path, device: str) -> dict:
    """Predict one split with the final model and evaluate it in voxels; the label maps are not kept."""
    from nnfiltermatch.commands.predict import predict_folder
    from nnfiltermatch.evaluation.evaluate import evaluate_folders

    if pred_dir.exists():
        shutil.rmtree(pred_dir)
    t0 = time.time()
    predict_folder(images, pred_dir, model, folds=["all"], device=device, mirroring=False)
    seconds = time.time() - t0
    evaluation = evaluate_folders(labels, pred_dir, labels=exp.labels, units="voxel", progress=False)
    evaluation.to_json(pred_dir.parent / f"evaluation_{pred_dir.name}.json")
    shutil.rmtree(pred_dir)
    return {
        "per_class": {str(k): v for k, v in evaluation.per_class_mean.items()},
        "mean": evaluation.mean_over_classes,
        "n_undefined": {str(k): v for k, v in evaluation.n_undefined.items()},
        "predict_seconds": seconds,
    }


def _teacher_as_model(model: Path, state: dict, target: Path) -> Path | None:
    """A copy of the model folder whose final weights are the run's EMA teacher (None: the run has no teacher).

    Why: whether to predict with the teacher is chosen on the validation cases, and the teacher of the same run
    answers it without training again.
    """
    import torch

    from nnfiltermatch.runs import (
        DIGEST_KEY,
        STATE_KEY,
        checkpoint_weight_sets,
        load_checkpoint_safely,
        weights_digests,
    )

    if state.get("teacher") is None:
        return None
    if target.exists():
        shutil.rmtree(target)
    (target / "fold_all").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(model / name, target / name)
    checkpoint = load_checkpoint_safely(model / "fold_all" / "checkpoint_final.pth")
    checkpoint["network_weights"] = state["teacher"]
    # the weights changed on purpose: store their checksum, or loading the copy would (rightly) refuse it
    checkpoint["init_args"][STATE_KEY][DIGEST_KEY] = weights_digests(checkpoint_weight_sets(checkpoint))
    torch.save(checkpoint, target / "fold_all" / "checkpoint_final.pth")
    return target


def _settings_differ(kept: dict, config: Any) -> list[str]:
    """The training settings in which a finished run differs from ``config`` (a setting added since that run had
    its default value then)."""
    from nnfiltermatch.config import TrainConfig

    defaults, ours, theirs = TrainConfig().to_dict(), config.to_dict(), kept["config"]
    differ = [k for k, v in ours.items() if k != "extra" and theirs.get(k, defaults.get(k, v)) != v]
    # extra holds what training records (the labelled cases): compared where the kept run recorded it too
    their_extra = theirs.get("extra") or {}
    differ += [f"extra.{k}" for k, v in ours["extra"].items() if their_extra.get(k, v) != v]
    return sorted(differ)


def _other_finished_runs(out: Path, profile: Profile, prepared: Any, split: str, taken: set) -> list[dict]:
    """Finished runs of this schedule in ``out`` for arms or seeds not asked for this time (e.g. an arm run on
    fewer seeds), so that results.json holds every run of the schedule; each says its own seed."""
    found = []
    for done in sorted((out / "runs").glob("*/run.json")):
        kept = json.loads(done.read_text())
        arm = next((a for a in MODES if done.parent.name == f"{a}_seed{kept['seed']}"), None)
        if arm is None or (arm, kept["seed"]) in taken or kept.get("split", "test") != split:
            continue
        if not _settings_differ(kept, arm_config(arm, shared_schedule(profile, prepared, kept["seed"]), profile)):
            found.append({**kept, "mode": arm})
    return found


def run_experiment(
    exp: Experiment,
    profile: Profile,
    device: str,
    out: Path,
    modes: tuple[str, ...],
    prepared: Any,
    split: str = "test",
) -> dict:
    """Train every mode and seed, evaluate on ``split`` (``test`` also evaluates the validation cases, if any)."""
    from nnfiltermatch.commands.training import TrainResult, train
    from nnfiltermatch.commands.training_checks import finished_with, record_labelled_cases
    from nnfiltermatch.method.pool_filter import FilterRound
    from nnfiltermatch.runs import FILTER_DIRNAME, STATE_KEY, TRAINER_NAMES, load_checkpoint_safely, output_folder_for

    use_folders(exp)
    configuration = configuration_for(exp, profile)
    runs: list[dict[str, Any]] = []
    for seed in profile.seeds:
        for mode in modes:
            run_dir = out / "runs" / f"{mode}_seed{seed}"
            done = run_dir / "run.json"
            config = arm_config(mode, shared_schedule(profile, prepared, seed), profile)
            record_labelled_cases(config, prepared)
            if done.is_file():  # resumable benchmark: finished runs are kept, if they ran this schedule
                kept = json.loads(done.read_text())
                differs = _settings_differ(kept, config)
                if differs:
                    sys.exit(
                        f"{done} was trained with other settings ({', '.join(differs)}): pass another --results "
                        "folder for this schedule, or delete that run to redo it"
                    )
                if kept.get("split", "test") != split:
                    sys.exit(f"{done} was evaluated on the {kept.get('split', 'test')} split, not {split}")
                runs.append(kept)
                continue
            print(f"[benchmark] {exp.dataset_key} {exp.labeled_key} {profile.name}: {mode} seed {seed}", flush=True)
            folder = output_folder_for(
                exp.dataset_name, TRAINER_NAMES[config.mode], prepared.plans_name, configuration, "all"
            )
            if config.deterministic and finished_with(folder, config):
                # the same deterministic computation finished already (e.g. a learning-curve run that did not read
                # the test cases): reuse the model, with the training time its log recorded
                trained = TrainResult(folder, folder / "checkpoint_final.pth")
                logged = load_checkpoint_safely(trained.final_checkpoint)["logging"]
                train_seconds = logged["epoch_end_timestamps"][-1] - logged["epoch_start_timestamps"][0]
                print(f"[benchmark] reusing the finished identical run in {folder}", flush=True)
            else:
                t0 = time.time()
                trained = train(
                    exp.dataset_name, configuration, "all", config, device, overwrite=True, final_validation=False
                )
                train_seconds = time.time() - t0
            if trained.supervised_stage_reused:  # selftrain's stage 1 is the supervised run: count its time too
                train_seconds += next(
                    (r["train_seconds"] for r in runs if r["mode"] == "supervised" and r["seed"] == seed), 0.0
                )
            model = trained.output_folder.parent
            validation = (
                _evaluate(exp, exp.validation_images, exp.validation_labels, model, run_dir / "validation", device)
                if exp.validation_images is not None
                else None
            )
            # the test cases are read only by final runs (split test), never while choosing a schedule or a default
            test = (
                _evaluate(exp, exp.test_images, exp.test_labels, model, run_dir / "test", device)
                if split == "test"
                else None
            )
            reported = test if test is not None else validation
            assert reported is not None
            rounds = [
                FilterRound.from_json(json.loads(p.read_text()))
                for p in sorted((trained.output_folder / FILTER_DIRNAME).glob("*.json"))
            ]
            state = load_checkpoint_safely(trained.final_checkpoint)["init_args"][STATE_KEY]
            teacher_model = (
                _teacher_as_model(model, state, exp.root / "teacher_model")
                if exp.validation_images is not None
                else None
            )
            validation_teacher = (
                _evaluate(
                    exp,
                    exp.validation_images,
                    exp.validation_labels,
                    teacher_model,
                    run_dir / "validation_teacher",
                    device,
                )
                if teacher_model is not None
                else None
            )
            record = {
                "mode": mode,
                "seed": seed,
                "split": split,
                "train_seconds": train_seconds,
                "predict_seconds": reported["predict_seconds"],
                "filter_seconds": sum(r.seconds for r in rounds),
                "filter_rounds": len(rounds),
                "supervised_stage_reused": trained.supervised_stage_reused,
                "ssl_start_epoch": state.get("ssl_start_epoch"),  # None: pseudo-labels never started
                "per_class": reported["per_class"],
                "mean": reported["mean"],
                "n_undefined": reported["n_undefined"],
                "validation": validation,
                "validation_teacher": validation_teacher,  # the same run predicting with its EMA teacher
                "config": config.to_dict(),
                "commit": code_commit(),  # the code this run trained with (seeds of one table can differ)
            }
            atomic_write_text(done, json.dumps(record, indent=2, default=float))
            runs.append(record)
    runs += _other_finished_runs(out, profile, prepared, split, {(r["mode"], r["seed"]) for r in runs})
    return {
        "configuration": configuration,
        "labeled_ids": prepared.labeled_ids,
        "n_unlabeled": len(prepared.unlabeled_ids),
        "split": split,
        "runs": runs,
    }


def measure_cost(exp: Experiment, configuration: str, device: str, steps: int) -> dict:
    """Seconds per iteration of supervised and ssl in one process (interleaved), and peak memory per mode."""
    import subprocess

    use_folders(exp)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "step_cost.py"),
            "-d",
            exp.dataset_name,
            "-c",
            configuration,
            "--device",
            device,
            "--steps",
            str(steps),
            "--out",
            str(exp.root / "step_cost"),
            *(["--compute-only"] if device == "cuda" else []),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads((exp.root / "step_cost" / "step_cost.json").read_text())


def code_commit() -> str:
    """The code a result was measured with: the commit, marked when the working tree had changes."""
    import subprocess

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--", "src") else "")
