"""Cost of one training step per mode: seconds (both modes timed in one process, interleaved) and peak memory.

Usage (after `nnfiltermatch prepare` of the dataset):
    .venv/bin/python benchmarks/step_cost.py -d 901 -c 3d_fullres_cpu --steps 40 --out results/step_cost
Writes ``step_cost.json`` and ``step_cost.md`` into ``--out``. Peak memory is measured in a fresh subprocess per
mode (CUDA: torch's peak allocated memory; CPU: the peak resident memory the steps add to the process, since the
process's own peak is dominated by the libraries). The timing trainers write their logs and a final checkpoint
into a temporary results folder, never into the dataset's real model folders.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnfiltermatch.commands.training import build_trainer, configure_runtime
from nnfiltermatch.config import resolve_config
from nnfiltermatch.data.layout import dataset_name_from_id
from nnfiltermatch.files import atomic_write_text

MODES = ("supervised", "ssl")


def _trainer(dataset: str, configuration: str, mode: str, device: torch.device):
    # warm-up 0 so that every timed step of mode ssl is a semi-supervised one
    config = resolve_config({"mode": mode, "epochs": 10, "warmup_epochs": 0, "rampup_epochs": 0, "ssl_start_dice": 0.0})
    trainer = build_trainer(dataset, configuration, "all", config, device)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    return trainer


def _step(trainer, batch: dict | None = None) -> float:
    start = time.perf_counter()
    trainer.train_step(batch if batch is not None else next(trainer.dataloader_train))
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


class _Repeat:
    """Stands in for the unlabelled loader in compute-only timing: the same augmented batch every step."""

    def __init__(self, loader) -> None:
        self.loader, self.batch = loader, next(loader)

    def __next__(self) -> dict:
        return self.batch


def time_modes(
    dataset: str, configuration: str, device: torch.device, steps: int, warmup: int, compute_only: bool = False
) -> dict:
    """Median seconds per step; ``compute_only`` reuses one batch so augmentation workers cannot be the limit."""
    trainers = {mode: _trainer(dataset, configuration, mode, device) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    fixed: dict[str, dict | None] = {mode: None for mode in MODES}
    if compute_only:
        for mode, trainer in trainers.items():
            fixed[mode] = next(trainer.dataloader_train)
            if trainer.dataloader_unlabeled is not None:
                trainer.dataloader_unlabeled = _Repeat(trainer.dataloader_unlabeled)
    try:
        for i in range(warmup + steps):
            for mode in MODES:  # interleaved, so load on the machine affects both alike
                seconds = _step(trainers[mode], fixed[mode])
                if i >= warmup:
                    times[mode].append(seconds)
    finally:
        for trainer in trainers.values():
            if isinstance(trainer.dataloader_unlabeled, _Repeat):
                trainer.dataloader_unlabeled = trainer.dataloader_unlabeled.loader
            trainer.on_train_end()
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    return {
        "median_seconds": medians,
        "mean_seconds": {mode: statistics.fmean(t) for mode, t in times.items()},
        "ratio_ssl_over_supervised": medians["ssl"] / medians["supervised"],
        "batch_size": trainers["supervised"].batch_size,
        "patch_size": list(trainers["supervised"].configuration_manager.patch_size),
    }


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(dataset: str, configuration: str, device: torch.device, mode: str, steps: int) -> float:
    """MiB: CUDA peak allocated, or on CPU the peak resident memory the steps add (Linux: VmHWM reset through
    /proc/self/clear_refs just before them)."""
    trainer = _trainer(dataset, configuration, mode, device)
    _step(trainer)  # first step: lazy allocations and worker start-up are set-up, not the step's memory
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set size to the current one
        baseline = _proc_status_kib("VmRSS")
    try:
        for _ in range(steps):
            _step(trainer)
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return (_proc_status_kib("VmHWM") - baseline) / 1024
    finally:
        trainer.on_train_end()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_fullres_cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/step_cost"))
    parser.add_argument(
        "--compute-only", action="store_true", help="also time steps on one reused batch (no data-loading waits)"
    )
    parser.add_argument("--memory-only", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.memory_only:
        # The trainers below write logs and a final checkpoint into nnUNet_results/<dataset>/...: point nnU-Net
        # (which reads it on first import, below) at a scratch folder so no real model folder is touched. The
        # memory subprocesses inherit it.
        if "nnunetv2.paths" in sys.modules:
            raise RuntimeError("nnU-Net was imported before its results folder was redirected")
        scratch = Path(tempfile.mkdtemp(prefix="nnfm_step_cost_"))
        os.environ["nnUNet_results"] = str(scratch)
        try:
            device = configure_runtime(args.device)
            measure(args, device, dataset_name_from_id(args.dataset))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    device = configure_runtime(args.device)
    dataset = dataset_name_from_id(args.dataset)
    print(json.dumps({"peak_mib": peak_memory(dataset, args.configuration, device, args.memory_only, 10)}))


def measure(args: argparse.Namespace, device: torch.device, dataset: str) -> None:
    result = time_modes(dataset, args.configuration, device, args.steps, args.warmup)
    if args.compute_only:
        compute = time_modes(dataset, args.configuration, device, args.steps, args.warmup, compute_only=True)
        result["compute_only"] = {k: compute[k] for k in ("median_seconds", "ratio_ssl_over_supervised")}
    result["peak_mib"] = {}
    for mode in MODES:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "-d",
                args.dataset,
                "-c",
                args.configuration,
                "--device",
                args.device,
                "--memory-only",
                mode,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result["peak_mib"][mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
    result.update(
        {
            "dataset": dataset,
            "configuration": args.configuration,
            "device": args.device,
            "steps": args.steps,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        }
    )
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "step_cost.json", json.dumps(result, indent=2))
    med = result["median_seconds"]
    memory_column = "peak allocated MiB" if args.device == "cuda" else "resident memory the steps add, MiB"
    table = "\n".join(
        [
            f"{dataset}, `{args.configuration}` (batch {result['batch_size']} + {result['batch_size']} "
            f"unlabelled, patch {'x'.join(map(str, result['patch_size']))}), {args.device}, "
            f"median of {args.steps} steps",
            "",
            f"| mode | s / step (median) | {memory_column} |",
            "|---|---|---|",
            *(f"| {m} | {med[m]:.3f} | {result['peak_mib'][m]:.0f} |" for m in MODES),
            "",
            f"ssl / supervised step time: {result['ratio_ssl_over_supervised']:.2f}",
        ]
    )
    if "compute_only" in result:
        c = result["compute_only"]
        table += (
            f"\n\nCompute only (one batch reused, no data-loading waits): supervised "
            f"{c['median_seconds']['supervised']:.4f} s, ssl {c['median_seconds']['ssl']:.4f} s, "
            f"ratio {c['ratio_ssl_over_supervised']:.2f}"
        )
    atomic_write_text(args.out / "step_cost.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
