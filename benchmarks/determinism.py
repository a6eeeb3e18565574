"""Are paired runs paired? Same seed: supervised twice and ssl with pseudo-labels that never start, per setting.

    nnUNet_preprocessed=... .venv/bin/python benchmarks/determinism.py -d 904 -c 3d_fullres_cpu

For augmentation in the training process (``nnUNet_n_proc_DA=0``, what ``--deterministic`` and the CPU default use)
and in nnU-Net's worker processes (``--workers``, default 2): whether the three final models are bit-identical, and
seconds per iteration (median epoch time / iterations) of supervised and of ssl with pseudo-labels from epoch 1.
Models go to a scratch nnUNet_results; writes ``results/determinism/<dataset>_<configuration>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from nnfiltermatch.commands.training import configure_runtime
from nnfiltermatch.config import resolve_config
from nnfiltermatch.data.layout import dataset_name_from_id
from nnfiltermatch.files import atomic_write_text

# ssl twins: "never" waits for a pseudo-Dice no model reaches; "from epoch 1" starts right after one warm-up epoch
RUNS = (
    ("supervised", {}),
    ("supervised again", {}),
    ("ssl, pseudo-labels never start", {"mode": "ssl", "ssl_start_dice": 1.0}),
    ("ssl, pseudo-labels from epoch 1", {"mode": "ssl", "ssl_start_dice": 0.0}),
)


def weights_digest(checkpoint: dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(checkpoint["network_weights"].items()):
        digest.update(name.encode())
        digest.update(tensor.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def seconds_per_iteration(checkpoint: dict, iterations: int, first_epoch: int) -> float:
    """Median over epochs from ``first_epoch`` of nnU-Net's logged epoch time (training and validation)."""
    log = checkpoint["logging"]
    times = [end - start for start, end in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
    return statistics.median(times[first_epoch:]) / iterations


def run_setting(dataset: str, configuration: str, device: str, workers: int, args: argparse.Namespace) -> dict:
    from nnfiltermatch.commands.training import train

    os.environ["nnUNet_n_proc_DA"] = str(workers)
    runs: dict[str, Any] = {}
    for label, options in RUNS:
        config = resolve_config(
            {
                "mode": "supervised",
                "seed": args.seed,
                "epochs": args.epochs,
                "iters_per_epoch": args.iters,
                "val_iters_per_epoch": 2,
                "warmup_epochs": 1,
                "save_every": args.epochs,
                "deterministic": workers == 0,
                **options,
            }
        )
        print(f"[determinism] {workers} augmentation workers: {label}", flush=True)
        result = train(dataset, configuration, "all", config, device, overwrite=True, final_validation=False)
        checkpoint = torch.load(result.final_checkpoint, map_location="cpu", weights_only=False)
        runs[label] = {
            "weights": weights_digest(checkpoint),
            "seconds_per_iteration": seconds_per_iteration(checkpoint, args.iters, first_epoch=1),
        }
    digests = [runs[label]["weights"] for label, _ in RUNS[:3]]
    return {
        "augmentation_workers": workers,
        "runs": runs,
        "supervised_repeats": digests[0] == digests[1],
        "ssl_never_started_equals_supervised": digests[0] == digests[2],
    }


def table(result: dict) -> str:
    lines = [
        f"Dataset {result['dataset']}, `{result['configuration']}`, {result['epochs']} epochs x {result['iters']} "
        f"iterations, seed {result['seed']}, {result['device']} ({result['machine']}, {result['cpu_count']} cores)",
        "",
        "| augmentation | supervised repeats bit for bit | ssl never started = supervised | s/iter supervised "
        "| s/iter ssl |",
        "|---|---|---|---|---|",
    ]
    for setting in result["settings"]:
        runs = setting["runs"]
        where = (
            "in the training process"
            if setting["augmentation_workers"] == 0
            else (f"{setting['augmentation_workers']} worker processes")
        )
        lines.append(
            f"| {where} | {'yes' if setting['supervised_repeats'] else 'no'} "
            f"| {'yes' if setting['ssl_never_started_equals_supervised'] else 'no'} "
            f"| {runs['supervised']['seconds_per_iteration']:.3f} "
            f"| {runs['ssl, pseudo-labels from epoch 1']['seconds_per_iteration']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--dataset", required=True, help="a prepared dataset (ID or name)")
    parser.add_argument("-c", "--configuration", default="3d_fullres_cpu")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=2, help="augmentation processes of the second setting")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=40, help="iterations per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/determinism"))
    args = parser.parse_args()
    if "nnunetv2.paths" in sys.modules:
        raise RuntimeError("nnU-Net was imported before its results folder was redirected")
    scratch = Path(tempfile.mkdtemp(prefix="nnfm_determinism_"))
    os.environ["nnUNet_results"] = str(scratch)  # the runs below must not touch a real model folder
    try:
        configure_runtime(args.device)
        dataset = dataset_name_from_id(args.dataset)
        settings = [run_setting(dataset, args.configuration, args.device, w, args) for w in (0, args.workers)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "dataset": dataset,
        "configuration": args.configuration,
        "epochs": args.epochs,
        "iters": args.iters,
        "seed": args.seed,
        "device": args.device,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(["python", "benchmarks/determinism.py", *sys.argv[1:]]),
        "settings": settings,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{dataset}_{args.configuration}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(result, indent=2))
    atomic_write_text(stem.with_suffix(".md"), table(result) + f"\nReproduce: `{result['command']}`\n")
    print(table(result))


if __name__ == "__main__":
    main()
