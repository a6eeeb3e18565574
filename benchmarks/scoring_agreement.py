"""Filter scoring: how far do cheaper scorings of the unlabelled pool agree with the full one, and what do they save?

The entropy filter scores every unlabelled case by the mean voxel entropy of the pseudo-labelling model's softmax.
This script scores the whole preprocessed unlabelled pool of a trained model with the filter's own code path
(``nnFilterMatchTrainer.score_pool``: nnU-Net's sliding window, the EMA teacher when the run had one, the run's
per-case reduction), once per scoring variant:

1. reference: tile step 0.5 + mirroring (every flip of the plan's mirror axes), the reference implementation's cost;
2. tile step 0.5, no mirroring;
3. tile step 1.0 + mirroring;
4. tile step 1.0, no mirroring (our default).

For each: Spearman's rho against the reference, how many of the cases a filter round would drop (the most confident
``filter_drop`` share, :func:`nnfiltermatch.method.uncertainty.select_cases_to_drop`) are also in the reference's drop
set, and seconds for the whole pool. The pool is scored in chunks with the variants interleaved (their order rotated
per chunk), so load from other jobs on a shared machine falls on all variants alike.

The fifth variant once measured here, ``--filter-scoring running`` (the mean entropy of the weak-view predictions
the training steps make anyway), ranked about as well as chance (BENCHMARKS.md section 5) and was removed; the
``running`` part of a ``scoring_agreement.json`` written then is kept in the file but no longer reported.

Usage (nnU-Net's folders are derived from the model folder: ``<root>/nnUNet_results/<dataset>/<model>`` with
``<root>/nnUNet_preprocessed`` beside it, as ``benchmarks/run.py`` lays them out):
    nnUNet_compile=0 nnUNet_n_proc_DA=1 nnUNet_def_n_proc=1 OMP_NUM_THREADS=2 .venv/bin/python \\
        benchmarks/scoring_agreement.py --out results/scoring_agreement -m \\
        work_dirs/hippocampus/10pct/nnUNet_results/Dataset904_HippocampusBench/nnFilterMatchTrainer__nnUNetPlans__3d_fullres_cpu
Writes ``scoring_agreement.json`` and ``scoring_agreement.md`` into ``--out``. The model folder is only read: the
trainer object that scores lives in a scratch ``nnUNet_results`` folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Variant:
    name: str
    tile_step: float
    mirroring: bool


REFERENCE = Variant("reference", 0.5, True)
VARIANTS = (
    REFERENCE,
    Variant("tile 0.5, no mirroring", 0.5, False),
    Variant("tile 1.0 + mirroring", 1.0, True),
    Variant("tile 1.0, no mirroring (default)", 1.0, False),
)
DEFAULT = VARIANTS[-1]


# ----- nnU-Net's folders --------------------------------------------------------------------------------------------
def use_folders(model_dir: Path, scratch: Path, preprocessed: Path | None) -> None:
    """nnU-Net's three variables, set before anything imports nnunetv2 (it reads them at import).

    ``nnUNet_results`` is a scratch folder: nnU-Net's trainer writes a log file into its results folder as soon as it
    is constructed, and the model folder must stay as it is.
    """
    results_root = model_dir.parent.parent
    if preprocessed is None:
        sibling = results_root.parent / "nnUNet_preprocessed"
        preprocessed = sibling if sibling.is_dir() else Path(os.environ.get("nnUNet_preprocessed", sibling))
    if not (preprocessed / model_dir.parent.name).is_dir():
        sys.exit(f"{preprocessed / model_dir.parent.name} not found: pass --preprocessed (nnU-Net's preprocessed root)")
    raw = next(
        (p for p in (results_root.parent / "nnUNet_raw", results_root.parent.parent / "nnUNet_raw") if p.is_dir()),
        Path(os.environ.get("nnUNet_raw", scratch / "raw")),
    )
    (scratch / "results").mkdir(parents=True, exist_ok=True)
    raw.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed), "nnUNet_results": str(scratch / "results")}
    )


# ----- the filter's scorer ------------------------------------------------------------------------------------------
def load_scoring_trainer(model_dir: Path, fold: str, checkpoint: str, device: Any):
    """Our trainer with the model's plans, configuration and checkpoint (student, EMA teacher, mirror axes)."""
    from nnfiltermatch.config import PLANS_KEY, TrainConfig
    from nnfiltermatch.nnunet.trainers import trainer_class
    from nnfiltermatch.runs import STATE_KEY, load_checkpoint_safely, parse_fold

    fold_dir = model_dir / f"fold_{fold}"
    path = fold_dir / f"checkpoint_{checkpoint}.pth"
    if not path.is_file():
        sys.exit(f"{path} not found")
    state = (load_checkpoint_safely(path).get("init_args") or {}).get(STATE_KEY)
    if not state:
        sys.exit(f"{path} was not written by nnfiltermatch: no configuration or teacher in it")
    config = TrainConfig.from_dict(state["config"])
    plans = json.loads((model_dir / "plans.json").read_text())
    dataset_json = json.loads((model_dir / "dataset.json").read_text())
    plans[PLANS_KEY] = config.to_dict()
    plans["continue_training"] = False
    configuration = model_dir.name.split("__")[-1]
    trainer = trainer_class(state["mode"])(
        plans=plans, configuration=configuration, fold=parse_fold(fold), dataset_json=dataset_json, device=device
    )
    trainer.load_checkpoint(str(path))
    if getattr(trainer, "ssl_start_epoch", 0) is None and "ssl_start_epoch" not in state and config.uses_unlabeled:
        # a checkpoint from before the start epoch was recorded: pseudo-labels (and the teacher) began after warm-up
        trainer.ssl_start_epoch = config.warmup_epochs or 0
    return trainer, config, path


def scored_by(trainer) -> str:
    """Which network ``score_pool`` runs: the pseudo-labelling model of the run."""
    model = trainer.pseudo_label_model() if hasattr(trainer, "pseudo_label_model") else trainer.teacher
    return "EMA teacher" if model is not None and model is trainer.teacher else "student"


def score_with(trainer, cases: list[str], variant: Variant) -> tuple[dict[str, float], float]:
    """``score_pool`` with the variant's tile step and mirroring; the trainer's own settings are restored after."""
    saved = (trainer.fm.filter_tile_step, trainer.fm.filter_mirroring)
    trainer.fm.filter_tile_step, trainer.fm.filter_mirroring = variant.tile_step, variant.mirroring
    try:
        start = time.perf_counter()
        scores = trainer.score_pool(cases)
        return scores, time.perf_counter() - start
    finally:
        trainer.fm.filter_tile_step, trainer.fm.filter_mirroring = saved


def score_interleaved(
    trainer, cases: list[str], variants: tuple[Variant, ...], chunk: int
) -> dict[str, tuple[dict[str, float], float]]:
    """Every variant on every case, chunk by chunk, the variants' order rotated per chunk: (scores, seconds) each."""
    out: dict[str, tuple[dict[str, float], float]] = {v.name: ({}, 0.0) for v in variants}
    chunks = [cases[i : i + chunk] for i in range(0, len(cases), chunk)]
    for index, part in enumerate(chunks):
        order = variants[index % len(variants) :] + variants[: index % len(variants)]
        for variant in order:
            scores, seconds = score_with(trainer, part, variant)
            done, total = out[variant.name]
            out[variant.name] = ({**done, **scores}, total + seconds)
        print(f"[scoring] chunk {index + 1}/{len(chunks)} done", file=sys.stderr, flush=True)
    return out


# ----- agreement ----------------------------------------------------------------------------------------------------
def agreement(scores: dict[str, float], reference: dict[str, float], drop_fraction: float) -> dict[str, Any]:
    """Spearman's rho on the common cases, the share of the reference's drop set this scoring drops too, and the
    reference's confidence rank (1 = most confident) of the least confident case this scoring drops."""
    from scipy.stats import spearmanr

    from nnfiltermatch.method.uncertainty import select_cases_to_drop

    common = sorted(set(scores) & set(reference))
    rho, p = spearmanr([scores[c] for c in common], [reference[c] for c in common])
    ours = set(select_cases_to_drop({c: scores[c] for c in common}, drop_fraction))
    theirs = set(select_cases_to_drop({c: reference[c] for c in common}, drop_fraction))
    rank = {c: i for i, c in enumerate(sorted(common, key=lambda c: (reference[c], c)), start=1)}
    return {
        "cases": len(common),
        "spearman_rho": float(rho),
        "spearman_p": float(p),
        "drop_count": len(theirs),
        "drop_overlap": len(ours & theirs),
        "drop_agreement": len(ours & theirs) / len(theirs) if theirs else float("nan"),
        "worst_reference_rank_dropped": max((rank[c] for c in ours), default=0),
    }


def code_state() -> dict[str, Any]:
    """The commit measured, and the files under src/ and benchmarks/ that differed from it (a shared working tree)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=repo, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "src", "benchmarks").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "uncommitted": dirty}


def machine() -> dict[str, Any]:
    import importlib.metadata

    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nnunetv2": importlib.metadata.version("nnunetv2"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# ----- the variants on the final model ----------------------------------------------------------------------
def window_part(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    from nnfiltermatch.nnunet.unlabeled import UnlabeledDataset

    trainer, config, path = load_scoring_trainer(args.model, args.fold, args.checkpoint, device)
    cases = UnlabeledDataset.get_identifiers(str(trainer.unlabeled_folder))  # the pool a run starts from
    if args.cases:
        cases = cases[: args.cases]
    load_before = os.getloadavg()
    results = score_interleaved(trainer, cases, VARIANTS, args.chunk)
    load_after = os.getloadavg()
    reference, ref_seconds = results[REFERENCE.name]
    rows = []
    for variant in VARIANTS:
        scores, seconds = results[variant.name]
        rows.append(
            {
                **asdict(variant),
                **agreement(scores, reference, config.filter_drop),
                "seconds": seconds,
                "seconds_per_case": seconds / len(cases),
                "speedup": ref_seconds / seconds,
                "scores": scores,
            }
        )
    return {
        "model": str(args.model),
        "checkpoint": str(path),
        "checkpoint_epoch": int(trainer.current_epoch),
        "scored_by": scored_by(trainer),
        "configuration": trainer.configuration_name,
        "patch_size": list(trainer.configuration_manager.patch_size),
        "mirror_axes": list(trainer.inference_allowed_mirroring_axes or []),
        "reduction": config.score,
        "filter_drop": config.filter_drop,
        "unlabeled_folder": str(trainer.unlabeled_folder),
        "pool": len(cases),
        "chunk": args.chunk,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "variants": rows,
    }


# ----- the report ---------------------------------------------------------------------------------------------------
def _worst_rank(row: dict[str, Any], scores: dict[str, float], reference: dict[str, float], drop: float) -> int:
    """From the stored result, or recomputed from the stored scores (results written before it was recorded)."""
    if "worst_reference_rank_dropped" in row:
        return int(row["worst_reference_rank_dropped"])
    return int(agreement(scores, reference, drop)["worst_reference_rank_dropped"])


def _shown(path: str) -> str:
    repo = Path(__file__).resolve().parents[1]
    return os.path.relpath(path, repo) if Path(path).is_relative_to(repo) else path


def markdown(result: dict[str, Any]) -> str:
    env = result["machine"]
    lines: list[str] = []
    window = result.get("window")
    if window:
        lines += [
            f"Scoring agreement on the {window['pool']} unlabelled cases of `{_shown(window['model'])}` "
            f"(checkpoint after {window['checkpoint_epoch']} epochs, scored by the {window['scored_by']}, "
            f"`{window['configuration']}`, patch {'x'.join(map(str, window['patch_size']))}, mirror axes "
            f"{window['mirror_axes']}, per-case reduction {window['reduction']}); drop set = the "
            f"{window['variants'][0]['drop_count']} most confident cases ({window['filter_drop']:.0%} of the pool, "
            "as one filter round drops them). Worst rank: the reference's confidence rank (1 = most confident) of "
            "the least confident case this scoring drops.",
            "",
            "| scoring | tile step | mirroring | Spearman rho vs reference | drop set shared with reference | "
            "worst rank dropped | s whole pool | s / case | speed-up |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        reference = window["variants"][0]["scores"]
        for row in window["variants"]:
            worst = _worst_rank(row, row["scores"], reference, window["filter_drop"])
            lines.append(
                f"| {row['name']} | {row['tile_step']} | {'yes' if row['mirroring'] else 'no'} | "
                f"{row['spearman_rho']:.4f} | {row['drop_overlap']}/{row['drop_count']} "
                f"({row['drop_agreement']:.0%}) | {worst} | {row['seconds']:.1f} | {row['seconds_per_case']:.3f} | "
                f"{row['speedup']:.1f}x |"
            )
        lines += [
            "",
            f"Variants interleaved in chunks of {window['chunk']} cases; load average before / after: "
            f"{' '.join(f'{x:.2f}' for x in window['loadavg_before'])} / "
            f"{' '.join(f'{x:.2f}' for x in window['loadavg_after'])}.",
            "",
        ]
    lines.append(
        f"Machine: {env['platform']}, {env['cpu_count']} cores ({env['torch_threads']} torch threads), python "
        f"{env['python']}, torch {env['torch']}, nnU-Net {env['nnunetv2']}, device {result['device']}"
        f"{', ' + env['gpu'] if env['gpu'] else ''}."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", type=Path, help="model folder (<Trainer>__<Plans>__<config>)")
    parser.add_argument("-f", "--fold", default="all")
    parser.add_argument("--checkpoint", default="final", choices=("final", "best", "latest"))
    parser.add_argument("--preprocessed", type=Path, help="nnU-Net's preprocessed root (default: beside the results)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--chunk", type=int, default=10, help="cases per interleaving chunk")
    parser.add_argument("--cases", type=int, default=0, help="score only the first N cases (a quick check)")
    parser.add_argument("--out", type=Path, default=Path("results/scoring_agreement"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json in --out, no work")
    args = parser.parse_args()
    if args.report_only:
        from nnfiltermatch.files import atomic_write_text

        text = markdown(json.loads((args.out / "scoring_agreement.json").read_text()))
        atomic_write_text(args.out / "scoring_agreement.md", text)
        print(text)
        return
    if args.model is None:
        parser.error("-m/--model is required (except with --report-only)")
    args.model = args.model.resolve()
    args.out = args.out.resolve()

    with tempfile.TemporaryDirectory(prefix="scoring_agreement_") as scratch:
        use_folders(args.model, Path(scratch), args.preprocessed)
        import torch

        from nnfiltermatch.commands.training import configure_runtime
        from nnfiltermatch.files import atomic_write_text

        device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        device = configure_runtime(device_name)
        json_path = args.out / "scoring_agreement.json"
        command = " ".join(["python", *sys.argv])
        shared = {"device": device_name, "machine": machine(), "code": code_state()}

        def save(part: str, value: dict[str, Any]) -> dict[str, Any]:
            # re-read first: a part written meanwhile by another invocation (same --out) is kept
            result = json.loads(json_path.read_text()) if json_path.is_file() else {}
            result.update(shared)
            result[part] = {**value, "command": command}
            atomic_write_text(json_path, json.dumps(result, indent=2))
            atomic_write_text(args.out / "scoring_agreement.md", markdown(result))
            return result

        print(markdown(save("window", window_part(args, device))))


if __name__ == "__main__":
    main()
