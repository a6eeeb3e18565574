"""Benchmark runner: the arms (modes) on a dataset and a labelled list, several seeds, test-set metrics, cost.

    .venv/bin/python benchmarks/run.py --dataset hippocampus --labeled 10pct --profile cpu-small
    .venv/bin/python benchmarks/run.py --dataset acdc --labeled 3 --profile cpu-small

Writes ``results/<dataset>/<profile>/<labeled>/results.json`` and ``results.md``: mean and standard deviation over
seeds per mode and class, the gain over supervised paired by seed (with a paired t-test when there are at least
two seeds), the paper's numbers where the protocol is the paper's, and the cost of each mode (seconds per
iteration measured in one process, filter-round seconds and their share of training, peak memory).
Work folders (nnU-Net's three folders per experiment) go to ``--work`` (default ``work_dirs/``).
Datasets come from ``../shared/data`` (or ``--shared``); any folder of the same layout works.

The parts, beside this script: ``protocols.py`` (profiles and dataset set-ups), ``arms.py`` (the modes compared and
their configurations), ``arm_runs.py`` (training and evaluating them, resumably) and ``result_tables.py`` (paired
statistics and the tables).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from nnfiltermatch.data.planners import PLANNERS
from nnfiltermatch.files import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arm_runs import code_commit, measure_cost, run_experiment  # noqa: E402
from arms import MODES, VARIANTS, fit_to_budget  # noqa: E402
from protocols import (  # noqa: E402
    PROFILES,
    REPO,
    SETUPS,
    Profile,
    configuration_for,
    prepare_experiment,
    shared_folder,
)
from result_tables import summarise  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(SETUPS), required=True)
    parser.add_argument("--labeled", required=True, help="hippocampus: 10pct|5pct; acdc: 3|7; la: 4|8")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-small")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the profile's seeds")
    parser.add_argument("--epochs", type=int, help="override the profile's epochs (recorded in results.json)")
    parser.add_argument("--iters-per-epoch", type=int, help="override the profile's iterations per epoch")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=[m for m in MODES if m not in VARIANTS])
    parser.add_argument("--device", default=None)
    parser.add_argument("--shared", help="folder with hippocampus/, acdc/, la/ (default ../shared/data)")
    parser.add_argument("--work", type=Path, default=REPO / "work_dirs")
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--cost-steps", type=int, default=30, help="steps of the cost measurement (0: skip it)")
    parser.add_argument(
        "--train-budget",
        type=float,
        metavar="SECONDS",
        help="measure the step cost first, then set iterations per epoch so all runs train in about SECONDS "
        "(gpu-short: 300 by default)",
    )
    parser.add_argument(
        "--planner",
        choices=sorted(PLANNERS),
        metavar="PLANNER",
        help="nnU-Net's planner (its -pl names, e.g. nnUNetPlannerResEncM; default ExperimentPlanner): the plans "
        "get their own work and results folders (<work>/<PLANNER>, results/<dataset>/<profile>_<PLANNER>)",
    )
    parser.add_argument("--num-processes", type=int, default=2, help="preprocessing processes (default 2)")
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="test (final runs: also evaluates the validation cases) or validation (choosing a schedule or a "
        "default: the test cases are not read); validation needs a profile with validation cases (cpu-long)",
    )
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    profile = PROFILES[args.profile]
    if args.seeds:
        profile = Profile(**{**asdict(profile), "seeds": tuple(args.seeds)})
    if args.epochs:
        profile = Profile(**{**asdict(profile), "epochs": args.epochs})
    if args.iters_per_epoch:
        profile = Profile(**{**asdict(profile), "iters_per_epoch": args.iters_per_epoch})
    if profile.validation_cases and args.dataset == "la":
        sys.exit(f"profile {profile.name} holds out validation cases: LA's 16 shared cases have none to spare")
    setup_options = {"validation_cases": profile.validation_cases} if profile.validation_cases else {}
    work = args.work / args.planner if args.planner else args.work
    exp = SETUPS[args.dataset](shared_folder(args.shared), work.resolve(), args.labeled, **setup_options)
    if args.split == "validation" and exp.validation_images is None:
        sys.exit(f"--split validation: profile {profile.name} holds out no validation cases (use cpu-long)")
    # a schedule other than the profile's, or the validation split, gets a folder of its own
    schedule = f"_{profile.epochs}x{profile.iters_per_epoch}" if args.epochs or args.iters_per_epoch else ""
    labeled_dir = args.labeled + ("_validation" if args.split == "validation" else "")
    plans_suffix = f"_{args.planner}" if args.planner else ""
    out = args.results / args.dataset / (profile.name + schedule + plans_suffix) / labeled_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    modes = tuple(args.modes)
    prepared = prepare_experiment(exp, profile, args.num_processes, args.planner)
    cost = None
    budget = args.train_budget or profile.train_budget_seconds
    if budget:
        cost = measure_cost(exp, configuration_for(exp, profile), device, args.cost_steps)
        if "median_seconds" not in cost:
            sys.exit(f"step-cost measurement failed:\n{cost['error']}")
        profile = fit_to_budget(profile, cost, modes, budget)
        print(f"[benchmark] {budget:.0f} s training budget: {profile.epochs} x {profile.iters_per_epoch}", flush=True)
    result = run_experiment(exp, profile, device, out, modes, prepared, args.split)
    if cost is None:
        cost = measure_cost(exp, result["configuration"], device, args.cost_steps) if args.cost_steps else {}
    summary, table = summarise(exp, profile, result, cost)
    command = " ".join(["python", "benchmarks/run.py", *sys.argv[1:]])
    payload = {
        "dataset": exp.dataset_key,
        "labeled": exp.labeled_key,
        "profile": asdict(profile),
        "device": device,
        "machine": platform.platform(),
        "command": command,
        "commit": code_commit(),
        "wall_seconds": time.time() - started,
        **result,
        "summary": summary,
    }
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2, default=float))
    atomic_write_text(out / "results.md", table + f"\nReproduce: `{command}`\n")
    print(table)


if __name__ == "__main__":
    main()
