"""nnU-Net's planners: which planner and plans name ``prepare -pl/-p`` mean, and the ``_cpu`` configurations that
are added to whichever plans are written."""

from __future__ import annotations

import copy
import importlib
import inspect
import json
from pathlib import Path

import numpy as np

from nnfiltermatch.errors import PreparationError

CPU_SUFFIX = "_cpu"
DEFAULT_PLANS = "nnUNetPlans"
DEFAULT_PLANNER = "ExperimentPlanner"
PLANNERS_PACKAGE = "nnunetv2.experiment_planning.experiment_planners"
# nnU-Net's planners by the names its -pl takes, with their modules under PLANNERS_PACKAGE. Imported by path, not
# found by nnU-Net's recursive class search, which imports the whole training tree (and crashes on torchvision).
PLANNERS: dict[str, str] = {
    "ExperimentPlanner": "default_experiment_planner",
    "ResEncUNetPlanner": "residual_unets.residual_encoder_unet_planners",
    "nnUNetPlannerResEncM": "residual_unets.residual_encoder_unet_planners",
    "nnUNetPlannerResEncL": "residual_unets.residual_encoder_unet_planners",
    "nnUNetPlannerResEncXL": "residual_unets.residual_encoder_unet_planners",
    "nnUNetPlannerResEncL_noResampling": "resampling.planners_no_resampling",
    "nnUNetPlannerResEncL_torchres": "resampling.resample_with_torch",
    "nnUNetPlannerResEncL_torchres_sepz": "resampling.resample_with_torch",
    "nnUNetPlanner_torchres": "resampling.resample_with_torch",
}


def planner_class(name: str) -> type:
    """nnU-Net's planner class called ``name`` (as ``-pl`` names it), imported from its module."""
    if name not in PLANNERS:
        raise PreparationError(f"-pl {name}: not one of nnU-Net's planners ({', '.join(PLANNERS)})")
    return getattr(importlib.import_module(f"{PLANNERS_PACKAGE}.{PLANNERS[name]}"), name)


def planner_plans_name(name: str) -> str:
    """The plans name ``name`` writes by default (its ``plans_name`` default, read from nnU-Net, not copied)."""
    return str(inspect.signature(planner_class(name).__init__).parameters["plans_name"].default)


def _planner_of(plans_file: Path) -> str | None:
    """The planner recorded in an existing plans file (nnU-Net's ``experiment_planner_used``), if readable."""
    if not plans_file.is_file():
        return None
    try:
        used = json.loads(plans_file.read_text()).get("experiment_planner_used")
    except (OSError, ValueError):
        return None
    return str(used) if used else None


def resolve_planner(planner: str | None, plans_name: str | None, plans_folder: Path) -> tuple[str, str]:
    """The (planner, plans name) that ``prepare -pl/-p`` means; refuses a pair that does not belong together.

    Why: a fixed planner once wrote a plain U-Net under ``-p nnUNetResEncUNetMPlans``. Rules: ``-pl`` alone writes
    the planner's own plans name; ``-p`` alone takes the planner whose own name it is, else the one that wrote that
    plans file (in ``plans_folder``), else ExperimentPlanner; a name that is another planner's own, or a plans file
    written by another planner, is refused (nnU-Net would merge the two). Other names are custom names, as nnU-Net's
    ``-overwrite_plans_name``.
    """
    if planner is None and plans_name is None:
        return DEFAULT_PLANNER, DEFAULT_PLANS
    own_names = {planner_plans_name(name): name for name in PLANNERS} if plans_name is not None else {}
    if planner is None:
        existing = _planner_of(plans_folder / f"{plans_name}.json")
        planner = own_names.get(str(plans_name)) or (existing if existing in PLANNERS else DEFAULT_PLANNER)
    own = planner_plans_name(planner)
    plans_name = own if plans_name is None else plans_name
    owner = own_names.get(plans_name)
    if owner is not None and owner != planner:
        raise PreparationError(
            f"-p {plans_name} is the plans name of planner {owner}, not of -pl {planner} (which writes {own}): give "
            f"-pl {owner}, or -pl {planner} without -p"
        )
    existing = _planner_of(plans_folder / f"{plans_name}.json")
    if existing is not None and existing != planner:
        raise PreparationError(
            f"{plans_folder / plans_name}.json was planned by {existing}, not {planner}: give -pl {existing} to keep "
            f"it, or another -p, or delete that file and its {plans_name}_* folders to re-plan with {planner}"
        )
    return planner, plans_name


def add_cpu_configuration(plans: dict, base: str) -> str | None:
    """Add ``<base>_cpu``: same preprocessed data, one stage less, half the patch, features 8..64, batch 2.

    Inherits from ``base`` so it reuses its preprocessed folder; trains about ten times faster on a CPU, which is
    what tests, the demo and CPU benchmarks use.
    """
    configs = plans["configurations"]
    if base not in configs or "architecture" not in configs[base]:
        return None
    src = configs[base]
    arch = copy.deepcopy(src["architecture"])
    kwargs = arch["arch_kwargs"]
    n_stages = max(2, int(kwargs["n_stages"]) - 1)
    strides = [list(s) if isinstance(s, (list, tuple)) else [s] * len(src["patch_size"]) for s in kwargs["strides"]]
    strides = strides[:n_stages]
    total_stride = np.prod(np.array(strides), axis=0)
    patch = [max(int(t), int(p // 2 // t * t)) for p, t in zip(src["patch_size"], total_stride)]
    kwargs["n_stages"] = n_stages
    kwargs["strides"] = strides
    kwargs["kernel_sizes"] = kwargs["kernel_sizes"][:n_stages]
    kwargs["features_per_stage"] = [min(8 * 2**i, 64) for i in range(n_stages)]
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in kwargs:
            kwargs[key] = kwargs[key][:n_stages]
    if "n_conv_per_stage_decoder" in kwargs:
        kwargs["n_conv_per_stage_decoder"] = kwargs["n_conv_per_stage_decoder"][: n_stages - 1]
    name = base + CPU_SUFFIX
    configs[name] = {"inherits_from": base, "patch_size": patch, "batch_size": 2, "architecture": arch}
    return name
