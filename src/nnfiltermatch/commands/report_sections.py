"""The report's sections that read the run beside the checkpoint: the evaluation table, the annotation rounds with
each round model's scores, the latest query ranking, nnU-Net's final validation and the configuration table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nnfiltermatch.plots import annotation_rounds_png, logged_series
from nnfiltermatch.runs import LATEST_QUERY, current_checkpoint, load_checkpoint_safely


def html_table(header: list[str] | None, rows: list[list[str]], numeric_from: int = 1, css: str = "") -> str:
    """An HTML table, every cell escaped; columns from ``numeric_from`` on are right-aligned numbers."""
    import html

    head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{html.escape(str(c))}</td>' if i >= numeric_from else f"<td>{html.escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    cls = f' class="{css}"' if css else ""
    return f"<table{cls}>{head}<tbody>{''.join(body)}</tbody></table>"


# ----- evaluation summaries ---------------------------------------------------------------------------------------
_NOT_EVALUATIONS = {"plans.json", "dataset.json", "dataset_fingerprint.json", "nnfiltermatch_config.json", "debug.json"}


def is_our_evaluation(data: Any) -> bool:
    """``data`` is a summary written by ``nnfiltermatch evaluate -o`` (not another JSON of the folder)."""
    return isinstance(data, dict) and isinstance(data.get("cases"), list) and "per_class" in data and "labels" in data


def find_evaluation(fold_dir: Path) -> Path | None:
    """The newest ``nnfiltermatch evaluate -o`` summary in the fold or model folder, if any."""
    candidates = []
    for folder in (fold_dir, fold_dir.parent):
        for path in folder.glob("*.json"):
            if path.name in _NOT_EVALUATIONS:
                continue
            try:
                if is_our_evaluation(json.loads(path.read_text())):
                    candidates.append(path)
            except (OSError, ValueError):
                continue
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def evaluation_table(data: dict[str, Any], labels: dict[int, str]) -> tuple[list[str], list[list[str]], str]:
    """Per-case rows, worst mean Dice first: (header, rows, note)."""
    by_case: dict[str, dict[int, dict[str, Any]]] = {}
    for row in data.get("cases") or []:
        by_case.setdefault(str(row["case"]), {})[int(row["label"])] = row
    classes = [int(v) for v in data.get("labels") or sorted({k for r in by_case.values() for k in r})]

    def number(value: Any, digits: int) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    def mean_dice(rows: dict[int, dict[str, Any]]) -> float:
        values = [float(rows[c]["dice"]) for c in classes if c in rows and rows[c].get("dice") is not None]
        return sum(values) / len(values) if values else float("nan")

    ordered = sorted(by_case.items(), key=lambda kv: (mean_dice(kv[1]), kv[0]))
    header = ["case", "mean Dice"]
    for c in classes:
        name = labels.get(c, f"class {c}")
        header += [f"{name} Dice", f"{name} HD95"]
    rows = []
    for case, per in ordered:
        cells = [case, number(mean_dice(per), 4)]
        for c in classes:
            cells += [number((per.get(c) or {}).get("dice"), 4), number((per.get(c) or {}).get("hd95"), 2)]
        rows.append(cells)
    means = data.get("per_class") or {}
    summary = "; ".join(
        f"{labels.get(c, f'class {c}')}: Dice {number((means.get(str(c)) or {}).get('mean', {}).get('dice'), 4)}"
        for c in classes
    )
    units = "mm" if data.get("units") == "mm" else "voxels"
    note = f"{len(rows)} cases, distances in {units}; mean per class: {summary}"
    return header, rows, note


# ----- annotation rounds (rounds.json) ---------------------------------------------------------------------------
def _last_finite(values: list[float]) -> tuple[float, int] | None:
    for epoch in range(len(values) - 1, -1, -1):
        if math.isfinite(values[epoch]):
            return values[epoch], epoch
    return None


def model_scores(fold_dir: Path, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """A round model's numbers: validation pseudo-Dice (the moving average at its last epoch) and, when there is
    one, a real Dice: an ``evaluate -o`` summary in the folder first, else nnU-Net's final validation summary."""
    scores: dict[str, Any] = {"pseudo_dice": None, "epoch": None, "dice": None, "dice_source": None, "note": ""}
    if checkpoint is None:
        path = current_checkpoint(fold_dir) if fold_dir.is_dir() else None
        if path is None:
            scores["note"] = "no checkpoint (folder missing or not trained)"
            return scores
        try:
            checkpoint = load_checkpoint_safely(path)
        except ValueError as exc:
            scores["note"] = f"unreadable checkpoint: {exc}"
            return scores
    last = _last_finite(logged_series(checkpoint.get("logging") or {}, "ema_fg_dice"))
    if last is not None:
        scores["pseudo_dice"], scores["epoch"] = last
    evaluation = find_evaluation(fold_dir)
    if evaluation is not None:
        try:
            dice = json.loads(evaluation.read_text()).get("mean_over_classes", {}).get("dice")
            if dice is not None:
                scores["dice"], scores["dice_source"] = float(dice), f"evaluate: {evaluation.name}"
        except (OSError, ValueError, AttributeError):
            pass
    validation = fold_dir / "validation" / "summary.json"
    if scores["dice"] is None and validation.is_file():
        try:
            dice = (json.loads(validation.read_text()).get("foreground_mean") or {}).get("Dice")
            if dice is not None:
                scores["dice"], scores["dice_source"] = float(dice), "nnU-Net final validation"
        except (OSError, ValueError, AttributeError):
            pass
    return scores


def _chosen_by(query: dict[str, Any] | None) -> str:
    if not query:
        return "-"
    how = str(query.get("strategy") or "?")
    if query.get("strategy") in ("random", "foreground-random"):
        how += f" (seed {query.get('seed')})"
    elif query.get("reduce"):
        how += f" ({query.get('reduce')}{', ROI' if query.get('roi') else ''})"
    if query.get("n") is not None:
        how += f", top {query.get('n')} of {query.get('n_ranked', '?')}"
    folder = Path(str(query.get("model_dir") or "?")).name
    model_round = query.get("model_round")
    return f"{how}; model {folder}" + (f" (round {model_round})" if model_round is not None else "")


def annotation_rounds(
    data: dict[str, Any], fold_dir: Path, checkpoint: dict[str, Any]
) -> tuple[list[str], list[list[str]], list[tuple[int, str, float | None, float | None]]]:
    """The rounds table (one row per round model, a round without one gets one row) and the points to plot:
    (labelled cases, model name without the round, pseudo-Dice, Dice)."""
    from nnfiltermatch.data.rounds import base_trainer_name, split_model_folder_name

    header = ["round", "labelled", "added", "chosen by", "model", "validation pseudo-Dice", "Dice", "Dice from"]
    rows: list[list[str]] = []
    points: list[tuple[int, str, float | None, float | None]] = []
    here = fold_dir.resolve()
    for entry in sorted(data.get("rounds") or [], key=lambda r: int(r["round"])):
        base = [str(entry["round"]), str(entry.get("labelled", "")), str(len(entry.get("added") or []))]
        chosen = _chosen_by(entry.get("query"))
        models = entry.get("models") or []
        if not models:
            rows.append([*base, chosen, "no model recorded yet", "n/a", "n/a", ""])
        for model in models:
            folder = Path(str(model.get("folder")))
            model_fold = folder / f"fold_{model.get('fold')}"
            current = model_fold.resolve() == here
            scores = model_scores(model_fold, checkpoint if current else None)
            pseudo, dice = scores["pseudo_dice"], scores["dice"]
            name = f"{folder.name}/fold_{model.get('fold')}" + (" (this report)" if current else "")
            rows.append(
                [
                    *base,
                    chosen,
                    name + (f": {scores['note']}" if scores["note"] else ""),
                    "n/a" if pseudo is None else f"{pseudo:.4f} (epoch {scores['epoch']})",
                    "n/a" if dice is None else f"{dice:.4f}",
                    scores["dice_source"] or "",
                ]
            )
            parts = split_model_folder_name(folder.name)
            series = folder.name if parts is None else base_trainer_name(parts[0])
            points.append((int(entry.get("labelled") or 0), f"{series} fold {model.get('fold')}", pseudo, dice))
    return header, rows, points


def annotation_rounds_section(fold_dir: Path, checkpoint: dict[str, Any]) -> str | None:
    """The report's rounds section, or None when the dataset has no rounds.json (nnUNet_preprocessed not set)."""
    import html

    from nnfiltermatch.data.rounds import load_rounds, rounds_file_for_model

    path = rounds_file_for_model(fold_dir.parent)
    if path is None:
        return None
    try:
        data = load_rounds("", path)
    except ValueError as exc:
        return f"<p>{html.escape(str(exc))}</p>"
    assert data is not None
    header, rows, points = annotation_rounds(data, fold_dir, checkpoint)
    plot = annotation_rounds_png(points)
    image = f'<img alt="annotation rounds" src="{plot}">' if plot else ""
    note = (
        f"{html.escape(str(path))}: per round, the labelled cases (round 0: the set you started from), the cases "
        "added by <code>prepare --add-labels</code>, the query that chose them, and each model trained in the round. "
        "Validation pseudo-Dice: nnU-Net's moving average at the model's last epoch, on its validation patches; "
        "Dice: an <code>evaluate -o</code> summary in the fold or model folder when there is one, else nnU-Net's "
        "final validation."
    )
    return f'<p class="note">{note}</p>' + html_table(header, rows, numeric_from=5) + image


# ----- the latest query ranking (query_latest.json, query_ranking_*.csv) ----------------------------------------
QUERY_TOP = 10  # cases of the ranking shown; the CSV has them all


def find_latest_query(model_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The latest query of this model: what ``query_latest.json`` records (where its CSV went, its settings), else
    the newest ``query_ranking_<strategy>.csv`` in the model folder (a query of an older version). None: no query."""
    pointer = model_dir / LATEST_QUERY
    if pointer.is_file():
        try:
            info = json.loads(pointer.read_text())
            return info, Path(str(info["ranking"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: fall back to the CSVs in the folder
    found = sorted(model_dir.glob("query_ranking_*.csv"), key=lambda p: p.stat().st_mtime_ns)
    if not found:
        return None
    return {"strategy": found[-1].stem.removeprefix("query_ranking_")}, found[-1]


def query_ranking_section(fold_dir: Path, checkpoint_path: Path) -> str | None:
    """The report's section on the latest query ranking: its top cases with score and reason, and where the full
    ranking is. None when the model was never queried."""
    import csv
    import html

    latest = find_latest_query(fold_dir.parent)
    if latest is None:
        return None
    info, csv_path = latest
    strategy = str(info.get("strategy") or "?")
    if not csv_path.is_file():
        return (
            f"<p>The latest query ({html.escape(strategy)}, {html.escape(str(info.get('time', 'time unknown')))}) "
            f"wrote its ranking to {html.escape(str(csv_path))}, which no longer exists. Run <code>nnfiltermatch "
            "query</code> again to rank the unlabelled cases.</p>"
        )
    try:
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        return f"<p>{html.escape(str(csv_path))}: cannot read the ranking ({html.escape(str(exc))}).</p>"
    table = []
    for row in rows[:QUERY_TOP]:
        try:
            score = f"{float(row.get('score') or 'nan'):.5g}"
        except ValueError:
            score = str(row.get("score"))
        # a CSV of an older version has no reason column: say what the score is
        reason = row.get("reason") or f"{strategy} score ({row.get('source') or 'source not recorded'})"
        table.append([str(row.get("rank", "")), str(row.get("case", "")), score, reason])
    how = strategy
    if info.get("reduce") and strategy not in ("random", "foreground-random"):
        how += f" ({info['reduce']}{', ROI' if info.get('roi') else ''})"
    if strategy in ("random", "foreground-random") and info.get("seed") is not None:
        how += f" (seed {info['seed']})"
    ranked = info.get("n_ranked")
    counts = f"{len(rows)} case(s) listed" + (f" of {ranked} ranked" if ranked is not None else "")
    if info.get("n_excluded"):
        counts += f", {info['n_excluded']} left out (predicted foreground <= {info.get('min_foreground_ml')} mL)"
    model = ""
    if info.get("checkpoint"):
        model = f" with {info['checkpoint']} of fold(s) {', '.join(info.get('folds') or ['?'])}"
    when = f" on {str(info['time']).replace('T', ' ')}" if info.get("time") else ""
    parts = [
        f"Latest query: {html.escape(how)}{html.escape(model)}{html.escape(when)}; {html.escape(counts)}. "
        f"The full ranking: <code>{html.escape(str(csv_path))}</code>."
    ]
    if csv_path.stat().st_mtime < checkpoint_path.stat().st_mtime:
        parts.append(
            f"It is older than {html.escape(checkpoint_path.name)} (the training went on since): query again for "
            "the current weights."
        )
    if info.get("pngs"):
        parts.append(f"PNGs of the top cases: <code>{html.escape(str(info['pngs']))}</code>.")
    if info.get("export"):
        parts.append(f"Exported for annotation: <code>{html.escape(str(info['export']))}</code>.")
    shown = f"the first {len(table)}" if len(rows) > len(table) else "every listed case"
    parts.append(f"Shown: {shown}, first pick first.")
    return f'<p class="note">{" ".join(parts)}</p>' + html_table(["rank", "case", "score", "reason"], table, 4)


# ----- nnU-Net's own final validation (fold_X/validation/summary.json) ------------------------------------------
def _label_key(key: str) -> tuple[int, str]:
    try:
        return int(key), key
    except ValueError:  # a region, e.g. "(1, 2)"
        return 1 << 30, key


def nnunet_validation_section(fold_dir: Path, labels: dict[int, str]) -> str | None:
    """Mean Dice (and IoU) per class from nnU-Net's final validation, when ``validation/summary.json`` is there."""
    import html

    folder = fold_dir / "validation"
    summary = folder / "summary.json"
    if not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text())
        means = data["mean"]
        foreground = data.get("foreground_mean") or {}
        cases = len(data.get("metric_per_case") or [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"<p>{html.escape(str(summary))}: not a summary of nnU-Net's validation ({html.escape(str(exc))}).</p>"

    def number(value: Any) -> str:
        try:
            value = float(value)
        except (TypeError, ValueError):
            return "n/a"
        return "n/a" if math.isnan(value) else f"{value:.4f}"

    rows = []
    for key in sorted(means, key=_label_key):
        metrics = means[key] or {}
        name = labels.get(_label_key(key)[0], f"class {key}")
        rows.append([name, key, number(metrics.get("Dice")), number(metrics.get("IoU"))])
    rows.append(["mean over foreground classes", "", number(foreground.get("Dice")), number(foreground.get("IoU"))])
    softmax = len(list(folder.glob("*.npz")))
    parts = [
        f"{html.escape(str(summary))}: nnU-Net's final validation of this fold, {cases} case(s), with the "
        "checkpoint it was run with (checkpoint_final.pth, or checkpoint_best.pth after <code>--val_best</code>; "
        "nnU-Net does not record which)."
    ]
    if softmax:
        parts.append(
            f"Softmax of {softmax} case(s) saved (<code>--npz</code>): nnUNetv2_find_best_configuration and "
            "nnUNetv2_ensemble can use this fold."
        )
    else:
        parts.append("No softmax saved: <code>nnfiltermatch train ... --val --npz</code> writes it for ensembling.")
    if fold_dir.name == "fold_all":
        parts.append(
            "With <code>-f all</code> the validation cases are training cases: these numbers are optimistic; "
            "evaluate on held-out cases (<code>predict</code> + <code>evaluate</code>) for a real estimate."
        )
    return f'<p class="note">{" ".join(parts)}</p>' + html_table(["class", "label", "Dice", "IoU"], rows, 2)


# ----- the configuration table, defaults marked ------------------------------------------------------------------
_NOT_DEFAULTS = {"extra", "labeled_fraction", "mode", "preset"}  # bookkeeping, and the choices defaults follow


def _config_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """Each option's default for this run's mode and preset; options that scale with the schedule (warm-up, ramp,
    filter epochs) at this run's ``--epochs``. Empty when the stored configuration cannot be resolved."""
    from nnfiltermatch.config import resolve_config

    given = {"mode": config.get("mode") or "filtermatch", "labeled_fraction": config.get("labeled_fraction")}
    preset = str(config.get("preset") or "default")
    try:
        defaults = resolve_config(given, preset=preset).to_dict()
        scaled = resolve_config({**given, "epochs": config.get("epochs")}, preset=preset).to_dict()
    except (ValueError, TypeError):
        return {}
    for name in ("warmup_epochs", "rampup_epochs", "filter_epochs"):
        defaults[name] = scaled[name]
    return defaults


def _unset_default(name: str, config: dict[str, Any]) -> tuple[Any, str]:
    """The default of an option whose default is "unset" (None): what it came to in this run (None: nothing to
    show) and how it is derived (the option's ``default_text``, which the help quotes too)."""
    from nnfiltermatch.config import training_options

    how = dict(training_options())[name].default_text or "unset"
    epochs = config.get("epochs")
    mode = config.get("mode") or "filtermatch"
    if name == "batch_size":
        return (config.get("extra") or {}).get("batch_size_used"), how
    if name in ("filter_start", "filter_every"):
        if mode != "filtermatch":
            return None, f"no filter in mode {mode}"
        if not isinstance(epochs, int):
            return None, how
        if name == "filter_start":
            return max(1, round(epochs / 3)), how
        return max(1, math.ceil(epochs / 3)), how
    return None, how


def _config_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else str(value)


def _config_cell(name: str, value: Any, config: dict[str, Any], defaults: dict[str, Any], paper: dict) -> str:
    """One value of the configuration table, with how it relates to its default."""
    if name == "labeled_fraction":
        return "not recorded" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    if name in _NOT_DEFAULTS or name not in defaults:
        return "not set" if value is None else _config_value(value) or '""'
    text = _config_value(value) or '""'
    default = defaults[name]
    if value is None or default is None:  # a default derived from the run (the plan's batch size, the schedule)
        came_to, how = _unset_default(name, config)
        if value is None:
            return f"{how} (default)" if came_to is None else f"{came_to} (default: {how})"
        if name == "batch_size":  # the plan's value is not in the model folder once --batch-size replaced it
            return f"{text} (set with --batch-size; default: {how})"
        if came_to is not None and value == came_to:
            return f"{text} (default: {how})"
        return f"{text} (default: {how}{'' if came_to is None else f' = {came_to}'})"
    if value == default:
        return f"{text} (preset paper)" if name in paper else f"{text} (default)"
    return f"{text} (default {_config_value(default)})"


def config_rows(config: dict[str, Any]) -> list[list[str]]:
    """The configuration table: every option with its value, ``(default)`` when it is the default of the run's mode
    and preset, ``(preset paper)`` when it is the preset's, else ``(default X)``; never an empty cell."""
    from nnfiltermatch.config import paper_values

    defaults = _config_defaults(config)
    paper = paper_values(config.get("labeled_fraction")) if config.get("preset") == "paper" else {}
    return [[name, _config_cell(name, value, config, defaults, paper)] for name, value in sorted(config.items())]
