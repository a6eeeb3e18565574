"""Active learning: the query ranking on a tiny real model, reuse of filter scores, and prepare --add-labels.

The session's prepared Hippocampus tree is copied with 10 of its 36 unlabelled cases (plans come from the labelled
cases only, so the copy is exactly what prepare would write for it); a tiny filtermatch model (2 epochs, one filter
round) is trained on it in a subprocess, so nnU-Net's import-time path globals never point at this copy.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIG, DATASET, LABELED, SUBSET
from model_trees import (
    N_UNLABELED,
    TRAINER_DIR,
    Model,
    nnunet_env,
    run_cli_subprocess,
    small_prepared_tree,
    tiny_model_in_own_tree,
)
from nnfiltermatch.cli import main
from nnfiltermatch.commands.query import decide_reuse, run_query
from nnfiltermatch.commands.query_export import SELECTION_CSV, ranking_columns
from nnfiltermatch.commands.query_model import QueryError
from nnfiltermatch.data.add_labels import add_labels
from nnfiltermatch.data.layout import LABELED_LIST_NAME, MANIFEST_NAME
from nnfiltermatch.errors import DataValidationError, PreparationError
from nnfiltermatch.method.pool_filter import FilterRound
from nnfiltermatch.method.query_scores import bounding_box
from nnfiltermatch.method.query_strategies import random_draw
from nnfiltermatch.runs import LATEST_QUERY, STATE_KEY


@pytest.fixture(scope="module")
def model(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    with tiny_model_in_own_tree(prepared, tmp_path_factory.mktemp("query")) as trained:
        yield trained


def shifted_model(model: Model, folder: Path, shift: float) -> Path:
    """A copy of the model whose background logit is raised by ``shift`` everywhere (the last decoder bias)."""
    from nnfiltermatch.runs import load_checkpoint_safely

    checkpoint = load_checkpoint_safely(model.model_dir / "fold_all" / "checkpoint_final.pth")
    bias = max(
        (k for k in checkpoint["network_weights"] if k.startswith("decoder.seg_layers.") and k.endswith(".bias")),
        key=lambda k: int(k.split(".")[2]),
    )
    checkpoint["network_weights"][bias][0] += shift  # a uniform shift of the background logit
    checkpoint["init_args"][STATE_KEY].pop("weights_digest")  # edited on purpose: the stored checksum no longer holds
    shifted = folder / TRAINER_DIR
    (shifted / "fold_all").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(model.model_dir / name, shifted)
    torch.save(checkpoint, shifted / "fold_all" / "checkpoint_final.pth")
    return shifted


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----- reuse of filter scores -------------------------------------------------------------------------------------
def _state(teacher: str = "student") -> dict:
    return {"init_args": {STATE_KEY: {"config": {"mode": "filtermatch", "teacher": teacher, "topk_fraction": 0.1}}}}


def _round(epoch: int, **extra: object) -> FilterRound:
    cases = [
        {"case": "a", "score": 0.5, "kept": True},
        {"case": "b", "score": 0.7, "kept": True},
        {"case": "c", "score": float("nan"), "kept": True},  # a case the filter could not score
    ]
    record = {"epoch": epoch, "score": "mean", "mirroring": False, "tile_step": 1.0, "seconds": 1.0, "cases": cases}
    return FilterRound.from_json(record | extra)


def test_reuse_decision_requires_the_same_network_and_procedure() -> None:
    ckpt = {**_state(), "current_epoch": 2}
    same = {"score": "entropy", "reduce": "mean", "topk_fraction": 0.1, "roi": False, "step_size": 1.0}
    decision = decide_reuse(ckpt, [_round(1), _round(2)], **same)
    # c has no finite score: recomputed
    assert decision.reused and decision.scores == {"a": 0.5, "b": 0.7} and decision.epoch == 2
    refusals = {
        "changed since": (ckpt | {"current_epoch": 3}, [_round(1), _round(2)], same),
        "EMA teacher": ({**_state("ema"), "current_epoch": 2}, [_round(2)], same),
        "scores margin": (ckpt, [_round(2)], same | {"score": "margin"}),
        "--roi": (ckpt, [_round(2)], same | {"roi": True}),
        "reduced per case by mean": (ckpt, [_round(2)], same | {"reduce": "topk"}),
        "tile step": (ckpt, [_round(2)], same | {"step_size": 0.5}),
        "with mirroring": (ckpt, [_round(2, mirroring=True)], same),
        "no filter round": (ckpt, [], same),
    }
    for reason, (checkpoint, rounds, options) in refusals.items():
        decision = decide_reuse(checkpoint, rounds, **options)
        assert not decision.reused and reason in decision.reason, (reason, decision.reason)
    assert "never" in decide_reuse(ckpt, [_round(2)], **same, policy="never").reason
    assert "ensembles 2" in decide_reuse(ckpt, [_round(2)], **same, n_folds=2).reason
    with pytest.raises(QueryError, match="--reuse-filter-scores"):
        decide_reuse(ckpt, [_round(2)], **same, policy="always")


# ----- the query on a real model ----------------------------------------------------------------------------------
def test_cli_ranking_csv_order_limit_and_pngs(model: Model, capsys: pytest.CaptureFixture[str]) -> None:
    out = model.root / "cli" / "ranking.csv"
    pngs = model.root / "cli" / "png"
    code = main(["query", "-d", "901", "-c", CONFIG, "-f", "all", "-n", "4", "-o", str(out), "--png-dir", str(pngs)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "not reused" in captured.out and "changed since" in captured.out  # round at epoch 1, checkpoint at 2
    assert f"Ranked {N_UNLABELED} unlabelled case(s)" in captured.out
    with open(out, newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ranking_columns({1: "Anterior", 2: "Posterior"})
    assert header == [
        "rank", "case", "score", "Anterior_voxels", "Anterior_ml", "Posterior_voxels", "Posterior_ml", "source",
        "reason",
    ]  # fmt: skip
    rows = _read_csv(out)
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]  # -n 4 of 10
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] <= math.log(3)
    assert {r["source"] for r in rows} == {"computed"} and set(r["case"] for r in rows) <= set(model.cases)
    assert all(r["reason"] == f"per-case mean = {float(r['score']):.4g} (computed)" for r in rows)
    latest = json.loads((model.model_dir / LATEST_QUERY).read_text())  # where the report finds it
    assert latest["ranking"] == str(out.resolve()) and latest["pngs"] == str(pngs.resolve())
    assert (latest["strategy"], latest["n_ranked"], latest["n_listed"], latest["export"]) == ("entropy", 10, 4, None)
    for r in rows:  # the shipped subset has 1 mm voxels after preprocessing: mL = voxels / 1000
        assert float(r["Anterior_ml"]) == pytest.approx(int(r["Anterior_voxels"]) / 1000, abs=1e-4)
    written = sorted(p.name for p in pngs.glob("*.png"))
    assert written == [f"{i:03d}_{rows[i - 1]['case']}.png" for i in range(1, 5)]  # default 5, limited by -n 4
    assert all((pngs / name).stat().st_size > 10_000 for name in written)


def test_score_types_and_reductions(model: Model) -> None:
    cases = model.cases[:3]
    results = {}
    for score, reduce in (("entropy", "mean"), ("margin", "mean"), ("entropy", "topk")):
        result = run_query(
            model.model_dir, strategy=score, reduce=reduce, cases=cases, png_top=0, output=model.root / f"{score}.csv"
        )
        assert sorted(r.case for r in result.ranking) == sorted(cases) and not result.pngs
        results[(score, reduce)] = {r.case: r.score for r in result.ranking}
    assert all(0.0 <= s <= 1.0 for s in results[("margin", "mean")].values())
    for case in cases:  # the top 10% of voxels are at least as uncertain as the average voxel
        assert results[("entropy", "topk")][case] >= results[("entropy", "mean")][case]
    tta = run_query(model.model_dir, strategy="tta-variance", cases=cases[:1], png_top=1, output=model.root / "t.csv")
    assert 0.0 < tta.ranking[0].score <= 0.25 and len(tta.pngs) == 1  # variance of a probability


def test_roi_restricts_the_score_to_the_predicted_foreground(model: Model, tmp_path: Path) -> None:
    """A 2-epoch model predicts foreground everywhere; a background bias keeps only its 0.5% surest voxels."""
    from nnfiltermatch.commands.query_model import load_query_model
    from nnfiltermatch.method.uncertainty import voxel_entropy

    case = model.cases[0]
    loaded = load_query_model(model.model_dir)
    data, _ = loaded.load_case(case)
    logits = loaded.predictor.predict_logits_from_preprocessed_data(data).float()
    shift = float(torch.quantile((logits[1:].max(0).values - logits[0]).flatten(), 0.995))
    shifted = shifted_model(model, tmp_path, shift)

    whole = run_query(shifted, cases=[case], png_top=0, output=tmp_path / "whole.csv").ranking[0].score
    roi = run_query(shifted, cases=[case], roi=True, roi_margin=0, png_top=0, output=tmp_path / "roi.csv")
    # Expected score from the shifted model's own logits: adding `shift` to the unshifted logits differs from the
    # network's float32 bias add by rounding, enough to move a voxel across the box's edge.
    shifted_logits = load_query_model(shifted).predictor.predict_logits_from_preprocessed_data(data).float()
    probs = torch.softmax(shifted_logits, dim=0)
    box = bounding_box(probs.argmax(0) > 0)
    assert box is not None and any(b.stop - b.start < n for b, n in zip(box, probs.shape[1:]))
    assert roi.ranking[0].score == pytest.approx(float(voxel_entropy(probs)[box].double().mean()), rel=1e-4)
    assert not math.isclose(roi.ranking[0].score, whole, rel_tol=1e-3)
    assert "--roi" in roi.decision.reason


# The filter round a third epoch would begin with: the trainer's own round on the finished model's weights.
# (A run extended with `train --continue --epochs 3` is refused: it would not be the run it continues.)
ROUND_ON_FINAL_WEIGHTS = """
import json, sys
from pathlib import Path
from nnfiltermatch.config import CONFIG_FILENAME, TrainConfig
from nnfiltermatch.commands.training import build_trainer, configure_runtime
out = Path(sys.argv[1])
config = TrainConfig.from_dict(json.loads((out / CONFIG_FILENAME).read_text()))
trainer = build_trainer(sys.argv[2], sys.argv[3], "all", config, configure_runtime("cpu"), output_folder=out)
trainer.load_checkpoint(str(out / "checkpoint_final.pth"))
trainer.run_filter_round()
"""


def test_filter_scores_are_reused_when_the_model_is_unchanged(model: Model, capsys: pytest.CaptureFixture) -> None:
    """The filter round at the start of a third epoch scores the final weights of epoch 2.

    Copied into a copy of the model folder, that round holds exactly what a query of the checkpoint computes.
    """
    continued = model.root / "continued"
    shutil.copytree(model.root / "results", continued)
    fold = continued / DATASET / TRAINER_DIR / "fold_all"
    done = subprocess.run(
        [sys.executable, "-c", ROUND_ON_FINAL_WEIGHTS, str(fold), DATASET, CONFIG],
        env={**os.environ, **nnunet_env(model.root), "nnUNet_results": str(continued)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    round_file = fold / "filter_rounds" / "epoch_0002.json"
    record = json.loads(round_file.read_text())
    frozen = model.root / "frozen" / TRAINER_DIR
    shutil.copytree(model.model_dir, frozen)
    shutil.copy(round_file, frozen / "fold_all" / "filter_rounds")

    out = model.root / "reuse.csv"
    code = main(["query", "-m", str(frozen), "-o", str(out), "--png-top", "1"])
    captured = capsys.readouterr().out
    assert code == 0 and "Scores reused for" in captured and "epoch 2" in captured
    rows = {r["case"]: r for r in _read_csv(out)}
    pool = {c["case"] for c in record["cases"]}
    assert {c for c, r in rows.items() if r["source"] == "reused"} == pool  # dropped at epoch 1: computed
    assert len(pool) < N_UNLABELED and len(rows) == N_UNLABELED
    top = min(rows.values(), key=lambda r: int(r["rank"]))
    assert top["Anterior_voxels"] != ""  # the PNG's case was predicted, so its volumes are known
    fresh = run_query(frozen, reuse="never", png_top=0, output=model.root / "fresh.csv")
    assert {r.source for r in fresh.ranking} == {"computed"}
    for row in fresh.ranking:
        assert float(rows[row.case]["score"]) == pytest.approx(row.score, rel=1e-5, abs=1e-7)


def test_errors_name_the_problem(model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["query", "-m", str(tmp_path / "nowhere")]) == 2
    assert "not a trained model folder" in capsys.readouterr().err
    assert main(["query", "-m", str(model.model_dir), "-d", "901"]) == 2
    assert "either -m" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_preprocessed", str(tmp_path))  # a dataset without an unlabelled folder
        with pytest.raises(QueryError, match="no unlabelled cases"):
            run_query(model.model_dir, png_top=0, output=tmp_path / "x.csv")
    with pytest.raises(QueryError, match="not unlabelled cases"):
        run_query(model.model_dir, cases=[LABELED[0]], output=tmp_path / "x.csv")
    with pytest.raises(QueryError, match="--export needs -n N"):
        run_query(model.model_dir, export=tmp_path / "out")
    with pytest.raises(QueryError, match="--roi restricts an uncertainty score"):
        run_query(model.model_dir, strategy="random", roi=True)
    (tmp_path / "a_file").write_text("x")
    assert main(["query", "-m", str(model.model_dir), "-n", "2", "--export", str(tmp_path / "a_file")]) == 2
    assert "a_file is a file, not a folder" in capsys.readouterr().err  # refused before the model loads
    with pytest.raises(SystemExit):  # --add-labels excludes the budget options
        main(["prepare", "-d", "901", "--add-labels", str(tmp_path), "--labeled-fraction", "0.1"])
    assert "not allowed with argument" in capsys.readouterr().err


# ----- strategies and export on the real model --------------------------------------------------------------------
def test_random_strategies_are_seeded_and_foreground_random_leaves_out_empty_cases(
    model: Model, tmp_path: Path
) -> None:
    import nnfiltermatch.commands.query_model as query_model

    def no_prediction(*args: object, **kwargs: object) -> None:
        raise AssertionError("random must not predict")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(query_model, "predict_case", no_prediction)
        first = run_query(model.model_dir, strategy="random", seed=0, png_top=0, output=tmp_path / "r0.csv")
        again = run_query(model.model_dir, strategy="random", seed=0, png_top=0, output=tmp_path / "r0b.csv")
        other = run_query(model.model_dir, strategy="random", seed=1, png_top=0, output=tmp_path / "r1.csv")
    order = [r.case for r in first.ranking]
    assert sorted(order) == sorted(model.cases) and order == [r.case for r in again.ranking]
    assert order != [r.case for r in other.ranking]
    assert order == sorted(model.cases, key=lambda c: -random_draw(0, c))
    assert {r.source for r in first.ranking} == {"drawn"} and all(r.voxels is None for r in first.ranking)
    assert (tmp_path / "r0.csv").read_text() == (tmp_path / "r0b.csv").read_text()

    cases = model.cases[:4]
    everything = run_query(
        model.model_dir, strategy="foreground-random", min_foreground_ml=0.0, cases=cases, png_top=1,
        output=tmp_path / "f.csv",
    )  # fmt: skip
    assert not everything.excluded and [r.case for r in everything.ranking] == [c for c in order if c in cases]
    volumes = {r.case: r.foreground_ml for r in everything.ranking}
    assert all(v is not None and v > 0 for v in volumes.values()) and len(everything.pngs) == 1
    threshold = sorted(volumes.values())[1]  # at least the two smallest predicted volumes are left out
    part = run_query(
        model.model_dir, strategy="foreground-random", min_foreground_ml=threshold, cases=cases, png_top=0,
        output=tmp_path / "p.csv",
    )  # fmt: skip
    assert part.excluded == sorted(c for c, v in volumes.items() if v <= threshold) and len(part.excluded) >= 2
    assert [r.case for r in part.ranking] == [c for c in order if c in cases and c not in part.excluded]

    empty = shifted_model(model, tmp_path, 100.0)  # the background logit far above the others: nothing predicted
    nothing = run_query(
        empty, strategy="foreground-random", min_foreground_ml=0.0, cases=cases[:2], png_top=0,
        output=tmp_path / "e.csv",
    )  # fmt: skip
    assert nothing.ranking == [] and nothing.excluded == sorted(cases[:2])
    assert run_query(empty, strategy="entropy", cases=cases[:1], png_top=0, output=tmp_path / "u.csv").ranking
    with pytest.raises(QueryError, match="nothing to export"):
        run_query(
            empty, strategy="foreground-random", cases=cases[:1], top_n=1, export=tmp_path / "x",
            output=tmp_path / "e2.csv",
        )  # fmt: skip
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_export_a_round_for_the_annotators_and_add_its_labels(
    model: Model, prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import SimpleITK as sitk

    from nnfiltermatch.commands.predict import predict_folder

    out = tmp_path / "round1"
    ranking_csv = tmp_path / "ranking.csv"
    args = ["query", "-m", str(model.model_dir), "-n", "3", "-o", str(ranking_csv), "--export", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    assert f"Exported 3 case(s) for annotation to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranking.csv", "round1"]  # the staging folder was renamed
    ranking, selection = _read_csv(ranking_csv), _read_csv(out / SELECTION_CSV)
    assert [(r["rank"], r["case"], r["score"]) for r in selection] == [
        (r["rank"], r["case"], r["score"]) for r in ranking[:3]
    ]
    for row in selection:
        assert row["strategy"] == "entropy"
        assert row["reason"].startswith(f"rank {row['rank']} of {N_UNLABELED} by entropy: per-case mean = ")
    raw_images = model.root / "raw" / DATASET / "imagesTr"
    for row in selection:
        case = row["case"]
        image = out / row["images"]
        assert row["images"] == f"images/{case}_0000.nii.gz" and not image.is_symlink()
        assert image.read_bytes() == (raw_images / image.name).read_bytes()
        assert row["original_images"] == str(raw_images / image.name)
        assert row["png"] == f"png/{int(row['rank']):03d}_{case}.png" and (out / row["png"]).stat().st_size > 10_000
        assert row["preannotation"] == f"preannotations/{case}.nii.gz"
        assert row["save_label_as"] == f"labelsTr/{case}.nii.gz"
        reference, pre = sitk.ReadImage(str(image)), sitk.ReadImage(str(out / row["preannotation"]))
        assert pre.GetSize() == reference.GetSize()
        assert np.allclose(pre.GetSpacing(), reference.GetSpacing())
        assert np.allclose(pre.GetOrigin(), reference.GetOrigin())
        assert np.allclose(pre.GetDirection(), reference.GetDirection())
        values = set(np.unique(sitk.GetArrayFromImage(pre)).tolist())
        assert values <= {0, 1, 2} and values & {1, 2}
    assert len(list((out / "png").iterdir())) == 3 and list((out / "labelsTr").iterdir()) == []
    readme = (out / "README.txt").read_text()
    assert f"nnfiltermatch prepare -d {DATASET} --add-labels {out.resolve() / 'labelsTr'}" in readme
    assert "ITK-SNAP" in readme and "0 background, 1 Anterior, 2 Posterior" in readme
    assert f"nnfiltermatch train -d {DATASET} -c {CONFIG} -f all --mode filtermatch" in readme

    # the pre-annotation is what nnU-Net's own predict path writes with the query's settings (no mirroring, tile 1)
    first = selection[0]["case"]
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(out / "images" / f"{first}_0000.nii.gz", single)
    predicted = predict_folder(single, tmp_path / "predicted", model.model_dir, mirroring=False, step_size=1.0)
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "preannotations" / f"{first}.nii.gz")))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted[0])))
    assert ours.shape == theirs.shape and (ours == theirs).mean() > 0.999

    # an existing export is refused without --overwrite and replaced with it
    assert main(args) == 2 and "exists and is not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--strategy", "random", "--seed", "5"]) == 0
    capsys.readouterr()
    picked = _read_csv(out / SELECTION_CSV)
    assert [r["case"] for r in picked] == sorted(model.cases, key=lambda c: -random_draw(5, c))[:3]
    assert all("random draw" in r["reason"] and (out / r["preannotation"]).is_file() for r in picked)
    assert len(list((out / "images").iterdir())) == 3 and len(list((out / "png").iterdir())) == 3

    # the annotators' round trip, on a fresh copy of the tree: pre-annotations saved as labels are accepted
    root = tmp_path / "tree"
    root.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in nnunet_env(root).items():
            mp.setenv(key, value)
        assert small_prepared_tree(prepared, root, N_UNLABELED) == model.cases
        for row in picked:
            shutil.copy(out / row["preannotation"], out / row["save_label_as"])
        assert main(["prepare", "-d", "901", "--add-labels", str(out / "labelsTr")]) == 0, capsys.readouterr().err
        manifest = json.loads((root / "preprocessed" / DATASET / MANIFEST_NAME).read_text())
    cases = sorted(r["case"] for r in picked)
    assert manifest["labeled_ids"] == sorted([*LABELED, *cases])
    assert not set(cases) & set(manifest["unlabeled_ids"])
    for case in cases:
        added = root / "raw" / DATASET / "labelsTr" / f"{case}.nii.gz"
        assert added.read_bytes() == (out / "labelsTr" / f"{case}.nii.gz").read_bytes()
    # replacing the export now would lose the corrected masks: refused
    assert main([*args, "--overwrite"]) == 2 and "corrected masks" in capsys.readouterr().err


# ----- prepare --add-labels ---------------------------------------------------------------------------------------
def test_add_labels_moves_cases_without_replanning(prepared: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnfiltermatch.nnunet.unlabeled import UnlabeledDataset

    root = tmp_path / "tree"
    root.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in nnunet_env(root).items():
            mp.setenv(key, value)
        cases = small_prepared_tree(prepared, root, 6, to_unlabeled_folder=1)
        raw, pre = root / "raw" / DATASET, root / "preprocessed" / DATASET
        (pre / "splits_final.json").write_text("[]")
        moved, simulated = cases[0], cases[1]  # imagesUnlabeled/ and a budget-simulation imagesTr case
        annotations = tmp_path / "annotated"
        annotations.mkdir()
        for case in (moved, simulated):
            shutil.copy(SUBSET / "labelsTr" / f"{case}.nii.gz", annotations)
        plans_mtime = (pre / "nnUNetPlans.json").stat().st_mtime_ns

        # errors first: nothing may change
        bad = tmp_path / "bad"
        bad.mkdir()
        shutil.copy(SUBSET / "labelsTr" / f"{LABELED[0]}.nii.gz", bad)
        with pytest.raises(DataValidationError, match="already labelled"):
            add_labels(DATASET, bad)
        label = sitk.ReadImage(str(SUBSET / "labelsTr" / f"{cases[2]}.nii.gz"))
        wrong = sitk.GetArrayFromImage(label)
        wrong[0, 0, 0] = 7
        broken = sitk.GetImageFromArray(wrong)
        broken.CopyInformation(label)
        (bad / f"{LABELED[0]}.nii.gz").unlink()
        sitk.WriteImage(broken, str(bad / f"{cases[2]}.nii.gz"))
        with pytest.raises(DataValidationError, match="value\\(s\\) 7 not declared"):
            add_labels(DATASET, bad)
        with pytest.raises(PreparationError, match="not preprocessed"):
            add_labels(DATASET, annotations, ["2d"])
        assert json.loads((pre / MANIFEST_NAME).read_text())["unlabeled_ids"] == sorted(cases)

        assert main(["prepare", "-d", "901", "--add-labels", str(annotations)]) == 0
        manifest = json.loads((pre / MANIFEST_NAME).read_text())
        assert manifest["labeled_ids"] == sorted([*LABELED, moved, simulated])
        assert manifest["unlabeled_ids"] == sorted(set(cases) - {moved, simulated})
        assert manifest["added_labels"][-1]["moved_from_imagesUnlabeled"] == [moved]
        listed = [ln for ln in (pre / LABELED_LIST_NAME).read_text().splitlines() if not ln.startswith("#")]
        assert listed == manifest["labeled_ids"]
        assert (raw / "imagesTr" / f"{moved}_0000.nii.gz").is_file()
        assert not (raw / "imagesUnlabeled" / f"{moved}_0000.nii.gz").exists()
        for case in (moved, simulated):
            assert (raw / "labelsTr" / f"{case}.nii.gz").read_bytes() == (annotations / f"{case}.nii.gz").read_bytes()
            assert (pre / "gt_segmentations" / f"{case}.nii.gz").is_file()
        assert (raw / "labelsTr" / f"{simulated}.nii.gz.before-add-labels").is_file()  # the garbage stand-in
        assert not (pre / "splits_final.json").exists()

        # what training reads: nnU-Net's dataset class on the labelled folder, ours on the unlabelled one
        data_id = manifest["configurations"][CONFIG]["data_identifier"]
        labelled_folder = str(pre / data_id)
        identifiers = infer_dataset_class(labelled_folder).get_identifiers(labelled_folder)
        assert sorted(identifiers) == manifest["labeled_ids"]
        _, seg, _, properties = infer_dataset_class(labelled_folder)(labelled_folder, [moved]).load_case(moved)
        # -1: nnU-Net's mark for background outside the image's non-zero region
        assert {1, 2} <= set(np.unique(np.asarray(seg[:])).tolist()) <= {-1, 0, 1, 2}
        assert set(properties["class_locations"]) == {1, 2}
        unlabelled = UnlabeledDataset.get_identifiers(str(pre / "unlabeled" / data_id))
        assert unlabelled == manifest["unlabeled_ids"]
        assert (pre / "nnUNetPlans.json").stat().st_mtime_ns == plans_mtime

        # a later prepare with the original list keeps them and does no work (run as a user would, in a process)
        again = run_cli_subprocess(
            ["prepare", "-d", "901", "-c", CONFIG, "--labeled-list", str(root / "labeled.txt"), "-np", "1"],
            nnunet_env(root),
        )
        assert "stay labelled" in again.stdout and "nothing to do" in again.stdout
        assert "re-planning" not in again.stdout
        assert json.loads((pre / MANIFEST_NAME).read_text())["labeled_ids"] == manifest["labeled_ids"]
        assert (pre / "nnUNetPlans.json").stat().st_mtime_ns == plans_mtime


def test_continue_after_add_labels_is_refused(prepared: Path, tmp_path: Path) -> None:
    """Query, annotate, add labels, `train --continue`: refused, naming the case added, before anything trains (the
    epochs already trained learnt from the old labelled set, so no continuation is the run it continues)."""
    root = tmp_path / "tree"
    root.mkdir()
    env = nnunet_env(root)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        cases = small_prepared_tree(prepared, root, 4)
        train = ["train", "-d", "901", "-c", CONFIG, "-f", "all", "--mode", "ssl", "--device", "cpu"]
        short = [
            "--iters-per-epoch",
            "2",
            "--val-iters-per-epoch",
            "1",
            "--warmup-epochs",
            "0",
            "--ssl-start-dice",
            "0",
        ]
        run_cli_subprocess([*train, *short, "--epochs", "1", "--no-final-validation"], env)
        out = root / "results" / DATASET / f"nnFilterMatchTrainer_ssl__nnUNetPlans__{CONFIG}" / "fold_all"
        final = (out / "checkpoint_final.pth").read_bytes()
        annotations = tmp_path / "annotated"
        annotations.mkdir()
        shutil.copy(SUBSET / "labelsTr" / f"{cases[0]}.nii.gz", annotations)
        assert main(["prepare", "-d", "901", "--add-labels", str(annotations)]) == 0

        refused = subprocess.run(
            [sys.executable, "-m", "nnfiltermatch.cli", *train, "--continue", "--no-final-validation"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert refused.stderr.startswith(f"nnfiltermatch train: error: --continue resumes the run in {out} ")
        assert f"the labelled cases of the prepared dataset: 5 now, 4 when the run started (added {cases[0]})" in (
            refused.stderr
        )
        assert "`train --round K` trains round K into its own folder" in refused.stderr
        assert (out / "checkpoint_final.pth").read_bytes() == final
        assert len(list(out.glob("training_log_*.txt"))) == 1  # no trainer was even built
