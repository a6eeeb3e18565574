"""How well does the query's uncertainty ranking find the cases the model gets wrong?

In a label-budget simulation the unlabelled cases' true labels exist (labelsTr), hidden from training. After
training, this script predicts every unlabelled case once (plus the test-time flips for tta-variance), computes its
true mean foreground Dice in the original image space, and compares each query score with it:

* Spearman's rank correlation between the score and 1 - Dice (higher: the ranking puts bad cases first);
* the mean true Dice of the K top-ranked cases vs the K bottom-ranked (a useful query has a low top-K Dice);
* references: the mean Dice of all cases (what a random pick gets) and of the K worst cases (a perfect ranking).

Scores are computed exactly as ``nnfiltermatch query`` does (same predictor, tile step, reductions and ROI box), for
every score type x reduction (mean, topk) x ROI (off, on). Reading the hidden labels is fine here: this is an
evaluation after training, and the labels never reach the model.

Usage:
    # everything on the shipped Hippocampus subset: prepare (20% labelled), a short filtermatch training, the
    # ranking (about 6 minutes on 2 free CPU cores; --quick-epochs/--quick-iters to change the training)
    .venv/bin/python benchmarks/ranking_quality.py --quick-setup /tmp/ranking_quality --out results/ranking_quality
    # an existing model of a budget-simulation dataset (nnUNet_raw/_preprocessed/_results set)
    .venv/bin/python benchmarks/ranking_quality.py --out results/ranking_quality \
        -m $nnUNet_results/Dataset004_Hippocampus/nnFilterMatchTrainer__nnUNetPlans__3d_fullres
Writes ``ranking_quality.json`` and ``ranking_quality.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO / "data" / "Dataset901_HippocampusSubset"
QUICK_CONFIG = "3d_fullres_cpu"


def quick_setup(root: Path, epochs: int, iters: int, device: str, fraction: float, seed: int) -> Path:
    """nnU-Net folders around the shipped subset, prepared with a labelled fraction, and a short filtermatch run."""
    root = root.resolve()
    env = {
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_compile": os.environ.get("nnUNet_compile", "0"),
        "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "1"),
    }
    os.environ.update(env)  # before anything imports nnunetv2 (its paths are read at import)
    for key in ("raw", "preprocessed", "results"):
        (root / key).mkdir(parents=True, exist_ok=True)
    raw = root / "raw" / SUBSET.name
    if not raw.exists():
        shutil.copytree(SUBSET, raw)
    cli = [sys.executable, "-m", "nnfiltermatch.cli"]
    steps = [
        ["prepare", "-d", SUBSET.name, "-c", QUICK_CONFIG, "--labeled-fraction", str(fraction), "--seed", str(seed)]
        + ["-np", "1"],
        ["train", "-d", SUBSET.name, "-c", QUICK_CONFIG, "-f", "all", "--mode", "filtermatch", "--device", device]
        + ["--epochs", str(epochs), "--iters-per-epoch", str(iters), "--val-iters-per-epoch", "2"]
        + ["--seed", str(seed), "--no-final-validation", "--overwrite"],
    ]
    for args in steps:
        print("$ nnfiltermatch " + " ".join(args), flush=True)
        start = time.time()
        done = subprocess.run(cli + args, env={**os.environ, **env}, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        print(f"  done in {time.time() - start:.0f} s", flush=True)
    return root / "results" / SUBSET.name / f"nnFilterMatchTrainer__nnUNetPlans__{QUICK_CONFIG}"


def true_dice(model: Any, logits: Any, properties: dict, reference: Any, labels: list[int]) -> float:
    """Mean foreground Dice of the prediction, in the original image space (nnU-Net's own export)."""
    import numpy as np
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from nnfiltermatch.evaluation.metrics import dice

    predictor = model.predictor
    segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, properties
    )
    segmentation = np.asarray(segmentation)
    if segmentation.shape != reference.shape:
        raise ValueError(f"prediction shape {segmentation.shape} != label shape {reference.shape}")
    return float(np.mean([dice(segmentation == label, reference == label) for label in labels]))


def evaluate(
    model_dir: Path, scores: list[str], device: str, step_size: float | None, top_k: int, checkpoint: str
) -> dict[str, Any]:
    import numpy as np
    import SimpleITK as sitk
    import torch
    from scipy.stats import spearmanr
    from tqdm import tqdm

    from nnfiltermatch.commands.query_model import load_query_model, predict_case
    from nnfiltermatch.data.layout import env_folder
    from nnfiltermatch.method.query_scores import REDUCTIONS, case_score, uncertainty_map

    model = load_query_model(model_dir, None, checkpoint, device, step_size)
    ending = model.predictor.dataset_json.get("file_ending", ".nii.gz")
    labels_dir = env_folder("nnUNet_raw") / model.dataset_name / "labelsTr"
    cases = [c for c in model.case_ids() if (labels_dir / f"{c}{ending}").is_file()]
    skipped = len(model.case_ids()) - len(cases)
    if len(cases) < 4:
        sys.exit(f"only {len(cases)} unlabelled case(s) with a hidden label in {labels_dir}: use a budget simulation")
    labels = sorted(model.labels)
    variants = [(s, r, roi) for s in scores for r in REDUCTIONS for roi in (False, True)]
    per_case: list[dict[str, Any]] = []
    start = time.time()
    for case in tqdm(cases, desc="predicting and scoring", unit="case"):
        data, properties = model.load_case(case)
        with torch.no_grad():
            logits = model.predictor.predict_logits_from_preprocessed_data(data).float()
            plain = torch.softmax(logits, dim=0)
            tta = predict_case(model.predictor, data, tta=True) if "tta-variance" in scores else None
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_dir / f"{case}{ending}")))
        row: dict[str, Any] = {"case": case, "dice": true_dice(model, logits, properties, reference, labels)}
        for score, reduce, roi in variants:
            if score == "tta-variance":
                assert tta is not None
                umap, segmentation = uncertainty_map(tta.probs, score, tta.tta_variance), tta.segmentation
            else:
                umap, segmentation = uncertainty_map(plain, score), plain.argmax(0)
            row[_key(score, reduce, roi)] = case_score(umap, segmentation, reduce, 0.1, roi, 5)
        per_case.append(row)
    seconds = time.time() - start

    dice_values = np.array([r["dice"] for r in per_case])
    k = max(1, min(top_k, len(per_case) // 2))
    results = []
    for score, reduce, roi in variants:
        values = np.array([r[_key(score, reduce, roi)] for r in per_case])
        rho, p_value = spearmanr(values, 1.0 - dice_values)
        order = np.argsort(-values, kind="stable")  # most uncertain first, as the query ranks
        results.append(
            {
                "score": score,
                "reduce": reduce,
                "roi": roi,
                "spearman_rho": float(rho),
                "p_value": float(p_value),
                f"top{k}_mean_dice": float(dice_values[order[:k]].mean()),
                f"bottom{k}_mean_dice": float(dice_values[order[-k:]].mean()),
            }
        )
    return {
        "model_dir": str(model_dir),
        "dataset": model.dataset_name,
        "checkpoint": checkpoint,
        "device": device,
        "step_size": model.step_size,
        "n_cases": len(per_case),
        "skipped_without_label": skipped,
        "k": k,
        "mean_dice_all": float(dice_values.mean()),
        f"oracle_worst{k}_mean_dice": float(np.sort(dice_values)[:k].mean()),
        "results": results,
        "cases": per_case,
        "seconds_predicting_and_scoring": round(seconds, 1),
        "platform": f"{platform.platform()}, python {platform.python_version()}, torch {torch.__version__}",
    }


def _key(score: str, reduce: str, roi: bool) -> str:
    return f"{score}/{reduce}{'/roi' if roi else ''}"


def markdown(report: dict[str, Any]) -> str:
    k = report["k"]
    lines = [
        f"Ranking quality on {report['n_cases']} unlabelled cases of {report['dataset']} (true labels hidden from "
        f"training), model `{Path(report['model_dir']).name}` ({report['checkpoint']}), tile step "
        f"{report['step_size']}, {report['device']}.",
        "",
        f"Mean true Dice of all cases (random pick): {report['mean_dice_all']:.4f}; of the {k} worst cases (a perfect "
        f"ranking's top {k}): {report[f'oracle_worst{k}_mean_dice']:.4f}.",
        "",
        f"| score | reduce | ROI | Spearman rho (score vs 1-Dice) | p | top-{k} mean Dice | bottom-{k} mean Dice |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['score']} | {r['reduce']} | {'yes' if r['roi'] else 'no'} | {r['spearman_rho']:.3f} | "
            f"{r['p_value']:.3g} | {r[f'top{k}_mean_dice']:.4f} | {r[f'bottom{k}_mean_dice']:.4f} |"
        )
    lines += ["", f"Prediction and scoring took {report['seconds_predicting_and_scoring']} s ({report['platform']})."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-m", "--model-dir", type=Path, help="trained model folder of a budget-simulation dataset")
    source.add_argument("--quick-setup", type=Path, metavar="DIR", help="prepare and train on the shipped subset")
    parser.add_argument("--out", type=Path, default=Path("results/ranking_quality"))
    parser.add_argument("--scores", nargs="+", default=["entropy", "margin", "tta-variance"])
    parser.add_argument("--top-k", type=int, default=10, help="size of the top / bottom groups (default 10)")
    parser.add_argument("--checkpoint", choices=("final", "best"), default="final")
    parser.add_argument("--step-size", type=float, help="sliding-window step (default: the model's filter tile step)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--quick-epochs", type=int, default=20)
    parser.add_argument("--quick-iters", type=int, default=20)
    parser.add_argument("--quick-fraction", type=float, default=0.2, help="labelled fraction (default 0.2: 8 of 40)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from nnfiltermatch.commands.training import configure_runtime

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    configure_runtime(device)  # CPU: no compile, 1 nnU-Net worker thread pool (set before nnunetv2 is imported)
    total = time.time()
    model_dir = args.model_dir
    if args.quick_setup is not None:
        model_dir = quick_setup(
            args.quick_setup, args.quick_epochs, args.quick_iters, device, args.quick_fraction, args.seed
        )
    report = evaluate(model_dir, args.scores, device, args.step_size, args.top_k, args.checkpoint)
    report["total_seconds"] = round(time.time() - total, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ranking_quality.json").write_text(json.dumps(report, indent=2))
    (args.out / "ranking_quality.md").write_text(markdown(report))
    print(markdown(report))
    print(f"Wrote {args.out / 'ranking_quality.json'} and {args.out / 'ranking_quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
