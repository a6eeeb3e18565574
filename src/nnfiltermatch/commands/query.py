"""Active learning: which unlabelled cases should be annotated next, and a folder for the annotators.

nnFilterMatch's filter keeps the uncertain cases for training but never tells the user which ones to label. This
module scores every case of the preprocessed unlabelled folder (``imagesUnlabeled`` and, in a label-budget
simulation, the unlabelled ``imagesTr`` cases) with nnU-Net's sliding-window predictor, exactly as the filter does
(no mirroring, the filter's tile step, the same per-case reduction), and writes a ranking: first pick first.

The pieces: :mod:`~nnfiltermatch.commands.query_model` (loading the model, predicting and scoring a case),
:mod:`~nnfiltermatch.method.query_strategies` (the strategies, swapped by name),
:mod:`~nnfiltermatch.method.query_scores` (the per-case uncertainty) and
:mod:`~nnfiltermatch.commands.query_export`
(the ranking CSV, the PNGs and the ``--export`` folder). This module runs a query from them.

Reuse of filter scores: a filter round at the start of epoch ``e`` scores the pool with the weights after ``e``
completed epochs; nnU-Net stores ``current_epoch`` = completed epochs in every checkpoint. So when the last round's
epoch equals the checkpoint's ``current_epoch`` and the round scored the same way (entropy, same reduction, no
mirroring, same tile step, with the student network that the checkpoint holds, not an EMA teacher), its scores
are exactly what a new computation would give, and they are reused. :func:`decide_reuse` spells this out.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnfiltermatch.commands.query_export import (
    EXPORT_FOLDERS,
    check_export_target,
    install_export,
    png_caption,
    raw_image_files,
    render_case_png,
    staging_folder,
    write_export,
    write_ranking_csv,
)
from nnfiltermatch.commands.query_model import QueryError, load_query_model, logits_file, score_cases
from nnfiltermatch.files import atomic_write_bytes
from nnfiltermatch.method.pool_filter import FilterRound
from nnfiltermatch.method.query_scores import REDUCTIONS
from nnfiltermatch.method.query_strategies import (
    DEFAULT_MIN_FOREGROUND_ML,
    DEFAULT_SEED,
    STRATEGIES,
    RankedCase,
    StrategyOptions,
)
from nnfiltermatch.runs import LATEST_QUERY, collect_filter_rounds, trainer_state

REUSE_POLICIES: tuple[str, ...] = ("auto", "never")
DEFAULT_PNG_TOP = 5


# ----- reuse of the last filter round -----------------------------------------------------------------------------
@dataclass
class ReuseDecision:
    """Which scores of a filter round can stand in for new ones, and why (or why not): printed to the user."""

    scores: dict[str, float]
    epoch: int | None
    reason: str

    @property
    def reused(self) -> bool:
        return bool(self.scores)


def decide_reuse(
    checkpoint: Mapping[str, Any],
    rounds: Sequence[FilterRound],
    *,
    score: str,
    reduce: str,
    topk_fraction: float,
    roi: bool,
    step_size: float,
    n_folds: int = 1,
    policy: str = "auto",
) -> ReuseDecision:
    """Reuse the last filter round's scores only when they are what this query would compute.

    Conditions: policy ``auto``; score ``entropy`` without ``--roi``; one fold; the checkpoint holds the network
    that scored (the last round's ``epoch`` == the checkpoint's ``current_epoch``, i.e. no training step since, and
    the run's pseudo-labelling model is the student, not an EMA teacher); same reduction (and top-k fraction), no
    mirroring and the same tile step. Only cases with a finite score are reused.
    """

    def no(reason: str) -> ReuseDecision:
        return ReuseDecision({}, None, reason)

    if policy not in REUSE_POLICIES:
        raise QueryError(f"--reuse-filter-scores {policy!r}: choose one of {', '.join(REUSE_POLICIES)}")
    if policy == "never":
        return no("--reuse-filter-scores never")
    if score != "entropy":
        return no(f"the filter scores entropy, this query scores {score}")
    if roi:
        return no("the filter scored whole images, this query scores the --roi box")
    if n_folds != 1:
        return no(f"filter rounds belong to one fold, this query ensembles {n_folds}")
    if not rounds:
        return no("the model has no filter round")
    last = rounds[-1]
    config = trainer_state(checkpoint).get("config") or {}
    current = checkpoint.get("current_epoch")
    epoch = last.epoch
    if current is None or int(current) != epoch:
        return no(
            f"the last filter round (epoch {epoch}) scored the weights after {epoch} epochs, the checkpoint holds "
            f"those after {current}: the model changed since"
        )
    if config.get("teacher", "ema") != "student" and config.get("mode", "filtermatch") != "supervised":
        return no("the filter scored with the EMA teacher, the checkpoint's network is the student")
    if last.score != reduce:
        return no(f"the filter reduced per case by {last.score}, this query by {reduce}")
    if reduce == "topk" and not math.isclose(float(config.get("topk_fraction", -1.0)), topk_fraction):
        return no(f"the filter's top-k fraction was {config.get('topk_fraction')}, this query's is {topk_fraction}")
    if last.mirroring:
        return no("the filter scored with mirroring, this query without")
    if not math.isclose(last.tile_step, step_size):
        return no(f"the filter's tile step was {last.tile_step}, this query's is {step_size}")
    scores = {c.case: c.score for c in last.cases if math.isfinite(c.score)}
    if not scores:
        return no(f"the filter round at epoch {epoch} scored no case by sliding window")
    return ReuseDecision(scores, epoch, f"the filter round at epoch {epoch} scored this checkpoint's network")


# ----- the query --------------------------------------------------------------------------------------------------
@dataclass
class QueryResult:
    ranking: list[RankedCase]
    total_cases: int
    decision: ReuseDecision
    csv_path: Path | None
    pngs: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    strategy: str = "entropy"
    reduce: str = "mean"
    seed: int = DEFAULT_SEED
    excluded: list[str] = field(default_factory=list)  # cases the strategy left out (foreground-random)
    export_dir: Path | None = None
    latest_error: str | None = None  # why MODEL_DIR/query_latest.json could not be written (None: it was)

    @property
    def n_reused(self) -> int:
        return sum(1 for r in self.ranking if r.source == "reused")


def _validate_options(
    strategy: str,
    reduce: str,
    topk_fraction: float,
    roi_margin: int,
    top_n: int | None,
    roi: bool = False,
    min_foreground_ml: float = DEFAULT_MIN_FOREGROUND_ML,
) -> None:
    problems = []
    if strategy not in STRATEGIES:
        problems.append(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    elif roi and STRATEGIES[strategy].voxel_map is None:
        problems.append(f"--roi restricts an uncertainty score to a box, and {strategy} ranks by a draw: leave it out")
    if reduce not in REDUCTIONS:
        problems.append(f"--reduce {reduce!r}: choose one of {', '.join(REDUCTIONS)}")
    if not 0.0 < topk_fraction <= 1.0:
        problems.append(f"--topk-fraction must be in (0, 1], got {topk_fraction}")
    if roi_margin < 0:
        problems.append(f"--roi-margin must be >= 0, got {roi_margin}")
    if top_n is not None and top_n < 1:
        problems.append(f"-n must be >= 1, got {top_n}")
    if not min_foreground_ml >= 0.0:
        problems.append(f"--min-foreground-ml must be >= 0, got {min_foreground_ml}")
    if problems:
        raise QueryError("; ".join(problems))


def run_query(
    model_dir: Path,
    folds: Sequence[str | int] | None = None,
    checkpoint: str = "final",
    device: str = "cpu",
    strategy: str = "entropy",
    reduce: str = "mean",
    topk_fraction: float = 0.1,
    roi: bool = False,
    roi_margin: int = 5,
    step_size: float | None = None,
    reuse: str = "auto",
    top_n: int | None = None,
    output: Path | None = None,
    png_dir: Path | None = None,
    png_top: int = DEFAULT_PNG_TOP,
    cases: Sequence[str] | None = None,
    progress: bool = True,
    seed: int = DEFAULT_SEED,
    min_foreground_ml: float = DEFAULT_MIN_FOREGROUND_ML,
    export: Path | None = None,
    overwrite: bool = False,
) -> QueryResult:
    """Rank the unlabelled cases, first pick first; write the CSV (atomically), the top cases' PNGs and, with
    ``export``, the annotation folder of the top ``top_n``
    (see :func:`~nnfiltermatch.commands.query_export.write_export`).

    ``output`` None: ``<model_dir>/query_ranking_<strategy>.csv``; ``png_dir`` None: ``<csv stem>_png`` beside it
    (with ``export``: ``export/png``, one PNG per exported case). ``cases`` restricts the query to some unlabelled
    cases (tests, quick looks). Everything that can be refused (options, the export folder, missing raw images) is
    refused before the first prediction.
    """
    start = time.time()
    _validate_options(strategy, reduce, topk_fraction, roi_margin, top_n, roi, min_foreground_ml)
    if png_top < 0:
        raise QueryError(f"--png-top must be >= 0, got {png_top}")
    target = Path(export) if export is not None else None
    if target is not None:
        if top_n is None:
            raise QueryError("--export needs -n N: how many of the top cases to hand to the annotators")
        if png_dir is not None:
            raise QueryError("--export writes one PNG per exported case into DIR/png: leave --png-dir out")
        check_export_target(target, overwrite)
    chosen = STRATEGIES[strategy]
    options = StrategyOptions(seed, min_foreground_ml, reduce, roi)
    model = load_query_model(model_dir, folds, checkpoint, device, step_size)
    available = model.case_ids()
    if cases is not None:
        unknown = sorted(set(cases) - set(available))
        if unknown:
            raise QueryError(f"not unlabelled cases of {model.dataset_name}: {', '.join(unknown[:8])}")
        available = [c for c in available if c in set(cases)]
    originals = raw_image_files(model, available) if target is not None else {}
    if chosen.voxel_map is not None:
        rounds = collect_filter_rounds(model.fold_dir, model.checkpoint)
        decision = decide_reuse(
            model.checkpoint,
            rounds,
            score=chosen.voxel_map,
            reduce=reduce,
            topk_fraction=topk_fraction,
            roi=roi,
            step_size=model.step_size,
            n_folds=len(model.folds),
            policy=reuse,
        )
        wanted = set(available)
        reused = {c: s for c, s in decision.scores.items() if c in wanted}
        if decision.reused and not reused:
            decision = ReuseDecision({}, None, f"the filter round at epoch {decision.epoch} scored none of these cases")
        else:
            decision = ReuseDecision(reused, decision.epoch, decision.reason)
    elif chosen.predicts:
        decision = ReuseDecision({}, None, f"{strategy} needs each case's predicted foreground, which no round records")
    else:
        decision = ReuseDecision({}, None, f"{strategy} draws its order and needs no scores")
    reused = decision.scores
    to_compute = [c for c in available if c not in reused]
    n_show = top_n if target is not None else (min(png_top, top_n) if top_n is not None else png_top)

    staging = staging_folder(target) if target is not None else None
    try:
        logits_dir = staging / ".logits" if staging is not None else None
        if logits_dir is not None:
            logits_dir.mkdir(parents=True)

        def priority(row: RankedCase) -> float | None:
            return chosen.priority(row, options)

        if chosen.predicts:
            computed, slices = score_cases(
                model,
                to_compute,
                chosen.shown_map,
                reduce,
                topk_fraction,
                roi,
                roi_margin,
                keep_slices=n_show,
                progress=progress,
                priority=priority,
                logits_dir=logits_dir,
            )
        else:
            computed, slices = {c: RankedCase(c, math.nan, "drawn") for c in to_compute}, {}
        results = {**{c: RankedCase(c, s, "reused") for c, s in reused.items()}, **computed}
        ranking: list[RankedCase] = []
        excluded: list[str] = []
        for case_id, row in results.items():
            value = priority(row)
            if value is None:
                excluded.append(case_id)
                continue
            row.score = float(value)
            if chosen.voxel_map is None:
                row.source = "drawn"
            ranking.append(row)
        ranking.sort(key=lambda r: (-r.score, r.case))
        for i, row in enumerate(ranking, start=1):
            row.rank = i
        listed = ranking[:top_n] if top_n is not None else ranking

        top = listed[:n_show]
        missing = [
            r.case
            for r in top
            if r.case not in slices or (logits_dir is not None and not logits_file(logits_dir, r.case).is_file())
        ]
        if missing:  # reused scores or random draws: predict the shown cases now (their score stays)
            extra, extra_slices = score_cases(
                model,
                missing,
                chosen.shown_map,
                reduce,
                topk_fraction,
                roi,
                roi_margin,
                keep_slices=len(missing),
                progress=False,
                logits_dir=logits_dir,
            )
            for case_id, row in extra.items():
                results[case_id].voxels, results[case_id].voxel_ml = row.voxels, row.voxel_ml
            slices.update(extra_slices)

        if target is not None and not top:
            raise QueryError(
                f"--export {target}: nothing to export, {strategy} ranked none of the {len(results)} case(s) "
                f"({len(excluded)} left out{': predicted foreground <= --min-foreground-ml' if excluded else ''})"
            )
        csv_path = Path(output) if output is not None else model.model_dir / f"query_ranking_{strategy}.csv"
        write_ranking_csv(listed, model.labels, csv_path, lambda row: chosen.explain(row, options))
        pngs: list[Path] = []
        if top:
            if staging is not None:
                folder = staging / EXPORT_FOLDERS["png"]
            else:
                folder = Path(png_dir) if png_dir is not None else csv_path.with_name(csv_path.stem + "_png")
            folder.mkdir(parents=True, exist_ok=True)
            for row in top:
                png = folder / f"{row.rank:03d}_{row.case}.png"
                render_case_png(
                    slices[row.case], row, png_caption(row, strategy, options), chosen.shown_map, model.labels, png
                )
                pngs.append(png)
        export_dir = None
        if staging is not None and target is not None and logits_dir is not None:
            write_export(
                model,
                top,
                originals,
                staging,
                logits_dir,
                {row.case: png for row, png in zip(top, pngs)},
                strategy=strategy,
                options=options,
                n_ranked=len(ranking),
                excluded=excluded,
                final=target,
            )
            export_dir = install_export(staging, target, overwrite)
            pngs = [export_dir / EXPORT_FOLDERS["png"] / p.name for p in pngs]
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    latest = {
        "ranking": str(csv_path.resolve()),
        "strategy": strategy,
        "reduce": reduce,
        "roi": roi,
        "seed": seed,
        "min_foreground_ml": min_foreground_ml,
        "folds": [str(f) for f in model.folds],
        "checkpoint": model.checkpoint_paths[0].name,
        "n_ranked": len(ranking),
        "n_listed": len(listed),
        "n_excluded": len(excluded),
        "pngs": str(pngs[0].parent.resolve()) if pngs else None,
        "export": str(export_dir.resolve()) if export_dir is not None else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    latest_error = None
    try:  # a read-only model folder must not fail a finished query: the ranking is written
        atomic_write_bytes(model.model_dir / LATEST_QUERY, (json.dumps(latest, indent=2) + "\n").encode())
    except OSError as exc:
        latest_error = f"cannot write {model.model_dir / LATEST_QUERY}: {exc.strerror or exc}"
    return QueryResult(
        ranking=listed,
        total_cases=len(ranking),
        decision=decision,
        csv_path=csv_path,
        pngs=pngs,
        seconds=time.time() - start,
        strategy=strategy,
        reduce=reduce,
        seed=seed,
        excluded=sorted(excluded),
        export_dir=export_dir,
        latest_error=latest_error,
    )


def format_ranking(result: QueryResult, labels: Mapping[int, str] | None = None, limit: int = 10) -> str:
    """A short text table of the top of the ranking, for the terminal."""
    lines = [f"{'rank':>4}  {'case':<24} {'score':>10}  source"]
    for row in result.ranking[:limit]:
        lines.append(f"{row.rank:>4}  {row.case:<24} {row.score:>10.5f}  {row.source}")
    if len(result.ranking) > limit:
        lines.append(f"  ... {len(result.ranking) - limit} more in the CSV")
    return "\n".join(lines)
