"""Does an evaluation between two trainings change the second one? MKL's alignment-dependent kernels, checked.

    .venv/bin/python benchmarks/mkl_alignment.py --dataset acdc --labeled 7
    MKL_CBWR=COMPATIBLE .venv/bin/python benchmarks/mkl_alignment.py --dataset acdc --labeled 7 --tag compatible

In one process, as ``benchmarks/run.py`` does: train supervised, predict the test split, evaluate it, then train
ssl with pseudo-labels that never start (the same computation as supervised) and supervised again; print and write
the SHA-256 of each model's weights (1 epoch x 50 iterations, seed 0, deterministic). The three digests agree when
MKL's results do not depend on where tensors land in memory. ``MKL_CBWR`` is set on ``import nnfiltermatch`` unless
the environment sets it; set it to ``AUTO`` to see the behaviour without it. Models go to a scratch nnUNet_results;
writes ``results/determinism/mkl_alignment_<dataset>_<labeled>_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nnfiltermatch  # noqa: F401  (sets MKL_CBWR before torch is imported)
from nnfiltermatch.files import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="acdc", choices=("acdc", "hippocampus"))
    parser.add_argument("--labeled", default="7")
    parser.add_argument("--work", type=Path, default=Path("work_dirs"), help="run.py's work folder")
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--tag", default="default", help="names the output file, e.g. the MKL_CBWR tried")
    parser.add_argument("--out", type=Path, default=Path("results/determinism"))
    args = parser.parse_args()

    import protocols  # benchmarks/protocols.py: the experiment layouts
    from determinism import weights_digest

    from nnfiltermatch.commands.predict import predict_folder
    from nnfiltermatch.commands.training import train
    from nnfiltermatch.config import resolve_config
    from nnfiltermatch.evaluation.evaluate import evaluate_folders
    from nnfiltermatch.runs import load_checkpoint_safely

    exp = protocols.SETUPS[args.dataset](args.shared, args.work.resolve(), args.labeled)
    protocols.use_folders(exp)
    scratch = Path(tempfile.mkdtemp(prefix="nnfm_mkl_"))
    os.environ["nnUNet_results"] = str(scratch / "results")  # read by our training code when it runs
    digests: dict[str, str] = {}
    try:
        configuration = "2d_cpu" if exp.dimension == "2d" else "3d_fullres_cpu"

        def train_once(step: str, mode: str) -> Path:
            config = resolve_config(
                {
                    "mode": mode,
                    "seed": 0,
                    "epochs": 1,
                    "iters_per_epoch": 50,
                    "val_iters_per_epoch": 5,
                    "ssl_start_dice": 1.0,  # pseudo-labels never start: the supervised computation
                    "deterministic": True,
                }
            )
            result = train(
                exp.dataset_name, configuration, "all", config, "cpu", overwrite=True, final_validation=False
            )
            digests[step] = weights_digest(load_checkpoint_safely(result.final_checkpoint))
            print(f"[mkl_alignment] {step}: {digests[step]}", flush=True)
            return result.output_folder

        model = train_once("supervised", "supervised")
        predict_folder(exp.test_images, scratch / "pred", model.parent, folds=["all"], device="cpu")
        evaluate_folders(exp.test_labels, scratch / "pred", labels=exp.labels, units="voxel", progress=False)
        train_once("ssl after an evaluation", "ssl")
        train_once("supervised after an evaluation", "supervised")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record = {
        "dataset": exp.dataset_name,
        "labeled": args.labeled,
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
        "digests": digests,
        "all_equal": len(set(digests.values())) == 1,
        "command": " ".join(["python", "benchmarks/mkl_alignment.py", *sys.argv[1:]]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        args.out / f"mkl_alignment_{args.dataset}_{args.labeled}_{args.tag}.json", json.dumps(record, indent=2)
    )
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
