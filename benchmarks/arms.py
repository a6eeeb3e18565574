"""The benchmark's arms: the modes and candidate variants it compares, each arm's training configuration, and the
schedule the arms of a profile share (fitted to a time budget where the profile has one)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from protocols import Profile

# candidate defaults: a mode plus options, ablated against the mode on validation cases before any becomes a default
VARIANTS: dict[str, dict[str, Any]] = {
    "copypaste": {"mode": "filtermatch", "copy_paste_p": 1.0},  # BCP mixes every unlabelled patch
}
# supervised first: selftrain starts from (reuses) the supervised run of the same seed; "paper" is filtermatch with
# --preset paper at the profile's schedule
MODES = ("supervised", "selftrain", "ssl", "filtermatch", "paper", *VARIANTS)


def arm_config(arm: str, overrides: dict[str, Any], profile: Profile) -> Any:
    """The training configuration of one arm. ``paper``: the reference's recipe (``--preset paper``) at this
    schedule, its epoch-based settings scaled from its 300 epochs (filter rounds at 1/3 and 2/3, warm-up 20 or 5 of
    300, flips from 1/3)."""
    from nnfiltermatch.config import paper_values, resolve_config

    if arm in VARIANTS:
        return resolve_config({**overrides, **VARIANTS[arm]}, preset=profile.preset)
    if arm != "paper":
        return resolve_config({**overrides, "mode": arm}, preset=profile.preset)
    reference = paper_values(overrides.get("labeled_fraction"))
    third = max(1, round(profile.epochs / 3))
    scaled = {
        "filter_start": third,
        "filter_every": third,
        "flip_from_epoch": third,
        "warmup_epochs": max(1, round(reference["warmup_epochs"] * profile.epochs / reference["epochs"])),
    }
    return resolve_config({**overrides, **scaled, "mode": "filtermatch"}, preset="paper")


def shared_schedule(profile: Profile, prepared: Any, seed: int) -> dict[str, Any]:
    """The training settings every arm of a profile shares, for one seed."""
    return {
        "seed": seed,
        "epochs": profile.epochs,
        "iters_per_epoch": profile.iters_per_epoch,
        "val_iters_per_epoch": profile.val_iters_per_epoch,
        "save_every": 10,
        "labeled_fraction": prepared.labeled_fraction,
        **profile.extra,
    }


def fit_to_budget(profile: Profile, cost: dict, modes: tuple[str, ...], seconds: float) -> Profile:
    """Iterations per epoch so that every mode and seed trains within ``seconds`` at the measured step times.

    Why: a GPU lease is counted in minutes and cards differ; 15% is kept back for validation steps, filter rounds
    and the loaders' start-up.
    """
    med = cost["median_seconds"]
    per_iteration = sum(med["supervised"] if mode == "supervised" else med["ssl"] for mode in modes)
    # per epoch and mode: validation steps (forward only, about 0.4 of a supervised step) and ~2 s of epoch-end
    # bookkeeping (nnU-Net's progress plot, logs)
    fixed = len(modes) * (profile.val_iters_per_epoch * 0.4 * med["supervised"] + 2.0)
    per_seed = 0.85 * seconds / len(profile.seeds)
    iterations = (per_seed / profile.epochs - fixed) / per_iteration
    return Profile(**{**asdict(profile), "iters_per_epoch": max(5, int(iterations)), "train_budget_seconds": seconds})
