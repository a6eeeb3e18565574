"""The HTML report of a trained fold: one self-contained page assembled from its sections and figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nnfiltermatch.commands.report_sections import (
    annotation_rounds_section,
    config_rows,
    evaluation_table,
    find_evaluation,
    html_table,
    is_our_evaluation,
    nnunet_validation_section,
    query_ranking_section,
)
from nnfiltermatch.files import atomic_write_text
from nnfiltermatch.plots import filter_cut, learning_curves_png, logged_series, pool_png, round_histogram_png
from nnfiltermatch.runs import (
    collect_filter_rounds,
    current_checkpoint,
    load_checkpoint_safely,
    resolve_fold_dir,
    trainer_state,
)

REPORT_NAME = "report.html"


class ReportError(ValueError):
    """The report cannot be built; the message names the folder or file and what is missing."""


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1240px;
       color: #222; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 1.8em; }
h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 8px 0 16px 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f3f7; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; }
.meta td:first-child { font-weight: 600; } .note { color: #555; font-size: 0.9em; }
nav a { margin-right: 14px; } .round { display: flex; gap: 18px; align-items: flex-start; flex-wrap: wrap; }
.dropped td { background: #fff4e6 !important; }
"""


def _best(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{max(finite):.4f} (epoch {values.index(max(finite))})" if finite else "n/a"


def build_report(
    model_dir: Path, output: Path | None = None, evaluation: Path | None = None, fold: str | int | None = None
) -> Path:
    """Write one self-contained HTML page about a trained fold; returns its path (default ``fold_X/report.html``)."""
    import html
    import time

    fold_dir = resolve_fold_dir(model_dir, fold)
    checkpoint_path = current_checkpoint(fold_dir)
    assert checkpoint_path is not None
    checkpoint = load_checkpoint_safely(checkpoint_path)
    logging: dict[str, list[Any]] = checkpoint.get("logging") or {}
    state = trainer_state(checkpoint)
    config_file = fold_dir / "nnfiltermatch_config.json"
    config: dict[str, Any] = (
        json.loads(config_file.read_text()) if config_file.is_file() else dict(state.get("config") or {})
    )
    rounds = collect_filter_rounds(fold_dir, checkpoint)
    dataset_json_file = fold_dir.parent / "dataset.json"
    labels: dict[int, str] = {}
    if dataset_json_file.is_file():
        for name, value in (json.loads(dataset_json_file.read_text()).get("labels") or {}).items():
            if isinstance(value, int) and value > 0:
                labels[value] = str(name)
    if evaluation is None:
        evaluation = find_evaluation(fold_dir)
    elif not Path(evaluation).is_file():
        raise ReportError(
            f"--evaluation {evaluation} does not exist: give the JSON written by `nnfiltermatch evaluate -o`"
        )
    evaluation_data = None
    if evaluation is not None:
        try:
            evaluation_data = json.loads(Path(evaluation).read_text())
        except (OSError, ValueError) as exc:
            raise ReportError(f"--evaluation {evaluation}: cannot read it as JSON ({exc})") from exc
        if not is_our_evaluation(evaluation_data):
            raise ReportError(
                f"--evaluation {evaluation} is not a summary of `nnfiltermatch evaluate -o` (no cases/per_class/labels)"
            )

    # where pseudo-labels actually started (they wait for every class, see --ssl-start-dice), else the warm-up
    weights = logging.get("unsup_weight") or []
    started = [epoch for epoch, weight in enumerate(weights) if weight and weight > 0]
    warmup = started[0] if started else config.get("warmup_epochs")
    filter_epochs = [r.epoch for r in rounds]
    epochs_done = len(logging.get("train_losses") or [])
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)

    timestamps = list(zip(logging.get("epoch_start_timestamps") or [], logging.get("epoch_end_timestamps") or []))
    epoch_seconds = [float(b) - float(a) for a, b in timestamps]
    meta = [
        ["model folder", str(fold_dir.parent)],
        ["fold", fold_dir.name.removeprefix("fold_")],
        ["trainer", str(checkpoint.get("trainer_name", ""))],
        ["mode", str(state.get("mode") or config.get("mode") or "")],
        ["configuration", str((checkpoint.get("init_args") or {}).get("configuration", ""))],
        ["checkpoint read", f"{checkpoint_path.name} (epochs completed: {checkpoint.get('current_epoch')})"],
        ["epochs", f"{epochs_done} of {config.get('epochs', '?')} planned"],
        ["labelled fraction", str(config.get("labeled_fraction"))],
        [
            "unlabelled pool",
            f"{int(logged_series(logging, 'pool_size')[0])} at the start, {len(state['pool'])} now"
            if logging.get("pool_size") and state.get("pool") is not None
            else "not used",
        ],
        [
            "best pseudo-Dice (moving average)",
            _best(logged_series(logging, "ema_fg_dice")),
        ],
        [
            "time per epoch (median)",
            f"{sorted(epoch_seconds)[len(epoch_seconds) // 2]:.1f} s" if epoch_seconds else "n/a",
        ],
    ]
    sections.append(("summary", "Summary", html_table(None, meta, numeric_from=2, css="meta")))
    annotation = annotation_rounds_section(fold_dir, checkpoint)
    if annotation is not None:
        sections.append(("annotation-rounds", "Annotation rounds", annotation))

    curves = learning_curves_png(logging, warmup, filter_epochs, labels)
    body = (
        f'<img alt="learning curves" src="{curves}">'
        f'<p class="note">Dotted grey line: end of warm-up; dashed red lines: filter rounds.</p>'
        if curves
        else "<p>No epoch was logged.</p>"
    )
    sections.append(("curves", "Learning curves", body))

    pool = pool_png(logging, rounds)
    sections.append(
        ("pool", "Unlabelled pool", f'<img alt="pool size" src="{pool}">' if pool else "<p>No unlabelled pool.</p>")
    )

    parts = []
    for record in rounds:
        hist = round_histogram_png(record)
        cut = filter_cut(record)
        dropped = sorted((c for c in record.cases if not c.kept), key=lambda c: c.score)
        listing = (
            html_table(["dropped case", "score"], [[c.case, f"{c.score:.5g}"] for c in dropped], css="dropped")
            if dropped
            else "<p>No case dropped.</p>"
        )
        info = (
            f"pool {record.pool_before} &rarr; {record.pool_after}, scored by sliding window in "
            f"{record.seconds:.1f} s; cut {'n/a' if cut is None else f'{cut:.5g}'}"
        )
        image = f'<img alt="filter round {record.epoch}" src="{hist}">' if hist else ""
        parts.append(
            f'<h3>Round at epoch {record.epoch}</h3><p class="note">{info}</p>'
            f'<div class="round"><div>{image}</div><div>{listing}</div></div>'
        )
    sections.append(("rounds", "Filter rounds", "".join(parts) if parts else "<p>No filter round in this run.</p>"))

    source = config_file if config_file.is_file() else "from the checkpoint"
    sections.append(
        (
            "config",
            "Configuration",
            f'<p class="note">{html.escape(str(source))}: "(default)" marks a value the run got by default for its '
            'mode and preset (options that scale with the schedule at its --epochs), "(default X)" one that was '
            "set, with what the default would have been.</p>" + html_table(["option", "value"], config_rows(config), 2),
        )
    )

    validation = nnunet_validation_section(fold_dir, labels)
    if validation is not None:
        sections.append(("nnunet-validation", "nnU-Net's final validation", validation))
    query = query_ranking_section(fold_dir, checkpoint_path)
    if query is not None:
        sections.append(("query", "Latest query ranking (which cases to annotate next)", query))

    if evaluation_data is not None:
        header, rows, note = evaluation_table(evaluation_data, labels)
        sections.append(
            (
                "evaluation",
                "Per-case evaluation (worst first)",
                f'<p class="note">{html.escape(str(evaluation))}: {html.escape(note)}</p>' + html_table(header, rows),
            )
        )
    else:
        sections.append(
            (
                "evaluation",
                "Per-case evaluation",
                "<p>No evaluation summary found: predict a labelled test set and run <code>nnfiltermatch evaluate -r "
                "labelsTs --pred predictions -o summary.json</code>, then pass <code>--evaluation summary.json</code> "
                "(or save it in the model folder).</p>",
            )
        )

    nav = " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in sections)
    content = "".join(f'<section id="{a}"><h2>{html.escape(t)}</h2>{b}</section>' for a, t, b in sections)
    title = f"nnfiltermatch report: {fold_dir.parent.parent.name} / {fold_dir.parent.name} / {fold_dir.name}"
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="note">Written {time.strftime("%Y-%m-%d %H:%M")} from {html.escape(str(checkpoint_path))}</p>'
        f"<nav>{nav}</nav>{content}</body></html>\n"
    )
    return atomic_write_text(Path(output) if output is not None else fold_dir / REPORT_NAME, page)
