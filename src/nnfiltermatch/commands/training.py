"""Running a training: resolve folders, guard earlier results, seed, build the trainer class, resume, validate."""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nnfiltermatch import distributed
from nnfiltermatch.commands.training_checks import (
    LABELED_IDS_KEY,
    check_continue,
    finished_with,
    record_labelled_cases,
    require_unlabeled,
    validation_checkpoint_file,
)
from nnfiltermatch.config import CONFIG_FILENAME, PLANS_KEY, TrainConfig
from nnfiltermatch.data.layout import preprocessed_root
from nnfiltermatch.data.manifest import check_prepared_plans, load_prepared
from nnfiltermatch.data.rounds import check_round_for_training, record_trained_model
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.locks import LOCK_NAME, LockError, run_lock
from nnfiltermatch.nnunet.trainers import trainer_class
from nnfiltermatch.runs import FILTER_DIRNAME, TRAINER_NAMES, current_checkpoint, output_folder_for

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class RunOptions:
    """How a training runs, as opposed to what it learns (``TrainConfig``): device, resume, processes."""

    device: str
    torch_device: torch.device
    continue_training: bool
    overwrite: bool
    final_validation: bool
    explicit_options: frozenset[str]
    num_processes: int
    backend: str | None
    round_number: int | None = None  # annotation round (train --round): its own model folder, see rounds.py
    save_probabilities: bool = False  # train --npz: the final validation also writes nnU-Net's softmax .npz/.pkl
    validation_checkpoint: str = "final"  # train --val_best: validate with checkpoint_best.pth


@dataclass
class TrainResult:
    output_folder: Path
    final_checkpoint: Path
    # mode selftrain: the supervised run it started from, and whether that run was trained now or found finished
    supervised_stage: Path | None = None
    supervised_stage_reused: bool = False


def configure_runtime(device: str) -> torch.device:
    """CPU-friendly nnU-Net defaults (no compile, few workers) unless the user set them; returns the device."""
    if device == "cuda" and not torch.cuda.is_available():
        raise PreparationError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if device == "cpu":
        os.environ.setdefault("nnUNet_compile", "false")
        # augmentation in the training process: as fast as 2 workers on a 2-core machine (benchmarks/determinism.py),
        # and its random numbers come from the seed, so a seed repeats a CPU run
        os.environ.setdefault("nnUNet_n_proc_DA", "0")
        os.environ.setdefault("nnUNet_def_n_proc", "1")
    return torch.device(device)


def make_repeatable(deterministic: bool, device: torch.device) -> None:
    """``--deterministic``: augmentation in this process, and cuDNN's deterministic kernels on CUDA.

    Why: nnU-Net's augmentation workers seed themselves from the operating system and hand batches over in the
    order they finish, so no seed repeats a run that uses them. Without the option, CUDA runs keep nnU-Net's
    ``cudnn.benchmark`` for speed, as its own ``nnUNetv2_train`` does.
    """
    if deterministic:
        os.environ["nnUNet_n_proc_DA"] = "0"
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def model_folder_lock(folders: list[Path], what: str) -> Iterator[None]:
    """Hold the lock of each fold output folder for the block: one training per folder, the second one refused.

    Why: two trainings into one folder both ran, and its checkpoints and configuration came from different runs.
    One process per run takes the lock: the caller of ``train`` (its ``--num-gpus`` workers never lock), or under
    torchrun global rank 0, which tells the other ranks whether it got it, so all ranks stop together.
    """
    with ExitStack() as stack:
        refusal: str | None = None
        cause: BaseException | None = None
        if distributed.rank() == 0:
            try:
                for folder in folders:
                    stack.enter_context(run_lock(folder / LOCK_NAME, what))
            except LockError as exc:
                refusal, cause = str(exc), exc
            except OSError as exc:
                refusal, cause = f"{what}: cannot create the lock in {folder}: {exc}", exc
        refusal = distributed.broadcast_from_rank0(refusal)
        if refusal is not None:
            raise PreparationError(refusal) from cause
        yield
        distributed.barrier()  # rank 0 releases only once every rank is done with the folder (not after an error)


def build_trainer(
    dataset_name: str,
    configuration: str,
    fold: int | str,
    config: TrainConfig,
    device: torch.device,
    *,
    continue_training: bool = False,
    output_folder: Path | None = None,
):
    """Our trainer class for ``config.mode``, constructed the way nnU-Net's run_training does.

    ``output_folder``: the fold folder to train into when it is not the one nnU-Net derives from the class name
    (an annotation round's); see :func:`redirect_output`.
    """
    prepared = load_prepared(dataset_name)
    plans = json.loads((preprocessed_root(dataset_name) / f"{prepared.plans_name}.json").read_text())
    dataset_json = json.loads((preprocessed_root(dataset_name) / "dataset.json").read_text())
    plans[PLANS_KEY] = config.to_dict()
    plans["continue_training"] = continue_training
    default = None
    if output_folder is not None:
        default = output_folder_for(dataset_name, TRAINER_NAMES[config.mode], prepared.plans_name, configuration, fold)
        existed = [p for p in (default, default.parent) if p.exists()]
    trainer = trainer_class(config.mode)(
        plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json, device=device
    )
    if output_folder is not None and default is not None and Path(output_folder) != default:
        redirect_output(trainer, Path(output_folder))
        for folder in (default, default.parent):  # nnU-Net created them (empty) in __init__
            if folder not in existed:
                try:
                    folder.rmdir()
                except OSError:  # not empty (another run), or another rank removed it first
                    pass
    return trainer


def redirect_output(trainer: Any, fold_dir: Path) -> None:
    """Point a constructed nnU-Net trainer at another fold folder (everything it writes goes there).

    Why not a subclass per round: nnU-Net derives the folder from the class name, but the class name is also what
    checkpoints record and what predict builds the network from, so it must stay the real trainer's.
    """
    fold_dir.mkdir(parents=True, exist_ok=True)
    trainer.output_folder_base = str(fold_dir.parent)
    trainer.output_folder = str(fold_dir)
    trainer.log_file = str(fold_dir / Path(trainer.log_file).name)
    trainer.logger.output_folder = str(fold_dir)


def train(
    dataset_name: str,
    configuration: str,
    fold: int | str,
    config: TrainConfig,
    device: str,
    *,
    continue_training: bool = False,
    overwrite: bool = False,
    final_validation: bool = True,
    explicit_options: set[str] | None = None,
    num_processes: int = 1,
    backend: str | None = None,
    round_number: int | None = None,
    plans_name: str | None = None,
    save_probabilities: bool = False,
    validation_checkpoint: str = "final",
) -> TrainResult:
    """Train one fold of one mode; refuses to clobber a finished or running model unless told to.

    The final validation (``final_validation``) is nnU-Net's ``perform_actual_validation``: ``save_probabilities``
    (``--npz``) also writes each case's softmax, ``validation_checkpoint`` "best" (``--val_best``) validates with
    checkpoint_best.pth, as ``nnUNetv2_train`` does.

    ``plans_name`` (``-p``): refused unless it is the plans the dataset is prepared with (None: those plans).

    ``round_number`` (``--round K``): train into annotation round K's folder (``output_folder_for``), after checking
    that the labelled set is round K's in rounds.json, and record the finished model there.

    With ``continue_training`` the run resumes exactly as it would have gone on uninterrupted (on CPU with
    augmentation in this process, bit for bit): with the configuration stored beside the checkpoint, the labelled
    cases it started with, and every random stream seeded per epoch (``seeding.seed_epoch``). An
    explicit option that differs from the stored one (``--epochs`` and ``--seed`` included) and a changed labelled
    set are refused before any training, see :func:`check_continue`.
    ``num_processes`` > 1 spawns that many DDP processes (one per GPU on CUDA, gloo processes on CPU), as nnU-Net's
    ``-num_gpus`` does; a process started by torchrun joins torchrun's process group instead.
    """
    check_prepared_plans(load_prepared(dataset_name), plans_name)
    if round_number is not None:
        if round_number < 0:
            raise PreparationError(f"--round {round_number}: give 0 or more")
        check_round_for_training(dataset_name, round_number, load_prepared(dataset_name).labeled_ids)
    torch_device = configure_runtime(device)  # before nnU-Net's configuration module reads the variables
    owns_group = _check_and_join_group(device, num_processes, backend)
    run = RunOptions(
        device=device,
        torch_device=torch_device,
        continue_training=continue_training,
        overwrite=overwrite,
        final_validation=final_validation,
        explicit_options=frozenset(explicit_options or ()),
        num_processes=num_processes,
        backend=backend,
        round_number=round_number,
        save_probabilities=save_probabilities,
        validation_checkpoint=validation_checkpoint,
    )
    with distributed.leaving_group(owns_group):
        runner = _self_train if config.mode == "selftrain" else _train
        result = runner(dataset_name, configuration, fold, config, run)
        if round_number is not None and distributed.rank() == 0:
            try:
                record_trained_model(
                    dataset_name,
                    round_number,
                    result.output_folder,
                    mode=config.mode,
                    configuration=configuration,
                    labelled=len(load_prepared(dataset_name).labeled_ids),
                    supervised_stage=result.supervised_stage,
                )
            except (OSError, RuntimeError, ValueError) as exc:  # the model is there: say what is missing, do not fail
                print(f"warning: round {round_number}'s model is not recorded in rounds.json: {exc}", file=sys.stderr)
        return result


def selftrain_stages(config: TrainConfig) -> tuple[TrainConfig, TrainConfig]:
    """The two trainings of offline self-training at the compute of one semi-supervised run.

    Stage 1 is the supervised run of the same options. Stage 2 starts from its weights and trains on batches of
    labelled plus as many pseudo-labelled patches for half the iterations per epoch: twice the supervised run's
    compute in all, which is what an ssl step costs (about 2.0-2.3 supervised steps, BENCHMARKS.md s.2).
    """
    supervised = TrainConfig.from_dict({**config.to_dict(), "mode": "supervised", "extra": dict(config.extra)})
    stage2 = TrainConfig.from_dict({**config.to_dict(), "extra": dict(config.extra)})
    stage2.iters_per_epoch = max(1, -(-config.iters_per_epoch // 2))
    return supervised, stage2


def _self_train(
    dataset_name: str,
    configuration: str,
    fold: int | str,
    config: TrainConfig,
    run: RunOptions,
) -> TrainResult:
    """``--mode selftrain``: the supervised run (reused when a finished one has the same options), then stage 2."""
    supervised, stage2 = selftrain_stages(config)
    prepared = load_prepared(dataset_name)
    require_unlabeled(prepared, config, dataset_name)  # before stage 1, not after it
    record_labelled_cases(supervised, prepared)  # finished_with reuses stage 1 only if trained on these cases
    if supervised.labeled_fraction is None:
        supervised.labeled_fraction = prepared.labeled_fraction
    sup_out = output_folder_for(
        dataset_name, TRAINER_NAMES["supervised"], prepared.plans_name, configuration, fold, run.round_number
    )
    out = output_folder_for(
        dataset_name, TRAINER_NAMES["selftrain"], prepared.plans_name, configuration, fold, run.round_number
    )
    # both folders for the whole run: stage 2 reads stage 1's weights, and a busy stage 2 is refused before stage 1
    with model_folder_lock([sup_out, out], f"train --mode {config.mode}"):
        return _self_train_locked(dataset_name, configuration, fold, supervised, stage2, run, sup_out)


def _self_train_locked(
    dataset_name: str,
    configuration: str,
    fold: int | str,
    supervised: TrainConfig,
    stage2: TrainConfig,
    run: RunOptions,
    sup_out: Path,
) -> TrainResult:
    reused = finished_with(sup_out, supervised)
    stored = sup_out / CONFIG_FILENAME
    if not reused and run.continue_training and (sup_out / "checkpoint_final.pth").is_file() and stored.is_file():
        # --continue: the finished stage 1 is this run's, with the options it stored (those left out included),
        # unless the labelled cases or an option given differ: then refused, as a --continue of it would be
        check_continue(TrainConfig.from_dict(json.loads(stored.read_text())), supervised, run.explicit_options, stored)
        reused = True
    if not reused and (sup_out / "checkpoint_final.pth").is_file() and not (run.overwrite or run.continue_training):
        raise PreparationError(
            f"selftrain: its stage 1 is the supervised run with the same options, but {sup_out} holds a supervised "
            f"run with other options ({sup_out / CONFIG_FILENAME}): pass --overwrite to replace it, or give selftrain "
            "that run's options"
        )
    if reused:
        print(f"selftrain: stage 1 is the finished supervised run in {sup_out} (same options and labelled cases)")
    else:
        print(f"selftrain: stage 1, the supervised run, into {sup_out}")
        resume = run.continue_training and (sup_out / "checkpoint_latest.pth").is_file()
        _train(
            dataset_name,
            configuration,
            fold,
            supervised,
            replace(run, continue_training=resume, final_validation=False),
        )
    stage2.extra["selftrain_from"] = str(sup_out / "checkpoint_final.pth")
    print(f"selftrain: stage 2, {stage2.epochs} x {stage2.iters_per_epoch} iterations on labelled + pseudo-labelled")
    result = _train(dataset_name, configuration, fold, stage2, run)
    result.supervised_stage, result.supervised_stage_reused = sup_out, reused
    return result


def _check_and_join_group(device: str, num_processes: int, backend: str | None) -> bool:
    """Refuse impossible multi-process requests before any work; join torchrun's group. True: we created it."""
    if num_processes < 1:
        raise distributed.DistributedSetupError(f"--num-gpus {num_processes}: give 1 or more")
    launched = distributed.launched_by_torchrun()
    if launched and num_processes not in (1, int(os.environ["WORLD_SIZE"])):
        raise distributed.DistributedSetupError(
            f"--num-gpus {num_processes} under torchrun with {os.environ['WORLD_SIZE']} processes: torchrun decides "
            "the number of processes (--nproc-per-node); leave --num-gpus out"
        )
    if launched or num_processes > 1:
        distributed.check_backend(device, backend)
    if not launched and num_processes > 1 and device == "cuda" and num_processes > torch.cuda.device_count():
        raise distributed.DistributedSetupError(
            f"--num-gpus {num_processes}: only {torch.cuda.device_count()} GPUs are visible"
        )
    return distributed.init_from_env(device, backend)


def _train(
    dataset_name: str,
    configuration: str,
    fold: int | str,
    config: TrainConfig,
    run: RunOptions,
) -> TrainResult:
    prepared = load_prepared(dataset_name)
    if configuration not in prepared.configurations:
        plans = json.loads((preprocessed_root(dataset_name) / f"{prepared.plans_name}.json").read_text())
        if configuration not in plans["configurations"]:
            raise PreparationError(f"-c {configuration}: not in the plans ({', '.join(plans['configurations'])})")
        inherits = plans["configurations"][configuration].get("inherits_from")
        if inherits not in prepared.configurations:
            raise PreparationError(
                f"-c {configuration} is not preprocessed: run `nnfiltermatch prepare -d {dataset_name} -c "
                f"{configuration}` first"
            )
    require_unlabeled(prepared, config, dataset_name)
    if fold != "all":
        _check_fold(fold, dataset_name, len(prepared.labeled_ids))
    if config.labeled_fraction is None:
        config.labeled_fraction = prepared.labeled_fraction
    record_labelled_cases(config, prepared)
    out = output_folder_for(
        dataset_name, TRAINER_NAMES[config.mode], prepared.plans_name, configuration, fold, run.round_number
    )
    with model_folder_lock([out], f"train --mode {config.mode}"):  # the checks below and the training, as one
        return _train_into(out, dataset_name, configuration, fold, config, run)


def _check_fold(fold: int, dataset_name: str, n_labeled: int) -> None:
    """A fold nnU-Net can train: in the dataset's own splits_final.json (which nnU-Net reads as it is), or, where
    there is none, one of the 5 nnU-Net would write, which needs 5 labelled cases."""
    splits_file = preprocessed_root(dataset_name) / "splits_final.json"
    if splits_file.is_file():
        try:
            splits = json.loads(splits_file.read_text())
        except json.JSONDecodeError:
            splits = None
        if not _is_nnunet_splits(splits):
            raise PreparationError(
                f"{splits_file}: not a list of {{'train': [...], 'val': [...]}} folds as nnU-Net writes it; fix or "
                "delete it (nnU-Net then writes a 5-fold split)"
            )
        if fold >= len(splits):
            raise PreparationError(f"-f {fold}: {splits_file} has {len(splits)} fold(s), 0-{len(splits) - 1}")
    elif n_labeled < 5:
        raise PreparationError(
            f"-f {fold}: nnU-Net's 5-fold split needs at least 5 labelled cases, {dataset_name} has {n_labeled}; "
            f"train with -f all (all labelled cases for training), or write your own folds to {splits_file}"
        )


def _is_nnunet_splits(splits: object) -> bool:
    """nnU-Net's splits_final.json: a non-empty list of {"train": [...], "val": [...]} folds."""
    return (
        isinstance(splits, list)
        and len(splits) > 0
        and all(isinstance(fold, dict) and {"train", "val"} <= fold.keys() for fold in splits)
    )


def _train_into(
    out: Path,
    dataset_name: str,
    configuration: str,
    fold: int | str,
    config: TrainConfig,
    run: RunOptions,
) -> TrainResult:
    existing = [name for name in ("checkpoint_final.pth", "checkpoint_latest.pth") if (out / name).exists()]
    if existing and not (run.continue_training or run.overwrite):
        raise PreparationError(
            f"{out} already holds {', '.join(existing)}: pass --continue to resume it or --overwrite to start again"
        )
    if run.overwrite and not run.continue_training and out.exists() and distributed.rank() == 0:
        for child in out.iterdir():
            if child.is_file() and (
                child.suffix in (".pth", ".png", ".json", ".txt") or child.name.endswith(".partial")
            ):
                child.unlink()
        filter_dir = out / FILTER_DIRNAME
        if filter_dir.is_dir():
            for child in filter_dir.iterdir():
                child.unlink()

    distributed.barrier()  # under torchrun: no rank starts before rank 0 has cleared the folder

    stored_config = out / CONFIG_FILENAME
    if run.continue_training and stored_config.is_file():
        stored = TrainConfig.from_dict(json.loads(stored_config.read_text()))
        check_continue(stored, config, run.explicit_options, stored_config)  # before anything trains or is written
        stored.validate()
        # a run from before the labelled cases were recorded: from now on they are
        stored.extra.setdefault(LABELED_IDS_KEY, config.extra.get(LABELED_IDS_KEY))
        config = stored

    result = TrainResult(output_folder=out, final_checkpoint=out / "checkpoint_final.pth")
    if run.num_processes > 1 and not distributed.is_distributed():
        job = partial(
            _spawned_worker, dataset_name=dataset_name, configuration=configuration, fold=fold, config=config, out=out
        )
        distributed.spawn(run.num_processes, job, (run,))
        return result
    _run_trainer(dataset_name, configuration, fold, config, out, run)
    return result


def _spawned_worker(
    run: RunOptions, *, dataset_name: str, configuration: str, fold: int | str, config: TrainConfig, out: Path
) -> None:
    """One process of a ``--num-gpus N`` run: the parent checked and cleared the folder; join the group and train."""
    run = replace(run, torch_device=configure_runtime(run.device))  # before nnU-Net is imported in this process
    owns_group = distributed.init_from_env(run.device, run.backend)
    with distributed.leaving_group(owns_group):
        _run_trainer(dataset_name, configuration, fold, config, out, run)


def _run_trainer(
    dataset_name: str, configuration: str, fold: int | str, config: TrainConfig, out: Path, run: RunOptions
) -> None:
    """Seed, build the trainer into ``out``, resume it (``run.continue_training``), train, and run the final
    validation ``run`` asks for (``--npz``: with softmax files; ``--val_best``: from checkpoint_best.pth)."""
    # a different seed per DDP rank, so ranks draw different batches (nnU-Net's loaders sample at random; DDP
    # broadcasts rank 0's initial weights, so the model does not depend on it); rank 0 keeps the single-process seed
    seed_everything(config.seed + distributed.rank())
    make_repeatable(config.deterministic, run.torch_device)
    trainer = build_trainer(
        dataset_name,
        configuration,
        fold,
        config,
        run.torch_device,
        continue_training=run.continue_training,
        output_folder=out,
    )
    if run.continue_training:
        checkpoint = current_checkpoint(out)
        if checkpoint is None:
            print(f"--continue: no checkpoint in {out}, starting a new training")
        else:
            print(f"--continue: resuming from {checkpoint}")
            trainer.load_checkpoint(str(checkpoint))
    trainer.run_training()
    if run.final_validation:
        if run.validation_checkpoint != "final":  # after training the weights are checkpoint_final's
            trainer.load_checkpoint(str(validation_checkpoint_file(out, run.validation_checkpoint, "--val_best")))
        trainer.perform_actual_validation(save_probabilities=run.save_probabilities)
