"""The command line as nnU-Net v2 users type it: its spellings are aliases, prefixes are never guessed.

Only argument parsing: no training, no dataset.
"""

from __future__ import annotations

import argparse

import pytest

from nnfiltermatch.cli import build_parser
from nnfiltermatch.cli.model import CHECKPOINT_FILES

TRAIN = ["train", "-d", "4", "-c", "3d_fullres", "-f", "0"]
PREDICT = ["predict", "-i", "in", "-o", "out", "-m", "model"]
QUERY = ["query", "-m", "model"]
EVALUATE = ["evaluate", "-r", "ref", "--pred", "pred"]
DEMO = ["demo"]


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The message of a parse that must fail (argparse exits with 2)."""
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(all_parsers(sub))
    return found


# (base command, our spelling, nnU-Net's spelling, the attribute both set)
ALIASES = [
    (TRAIN, ["--continue"], ["--c"], "continue_training"),
    (TRAIN, ["--device", "cpu"], ["-device", "cpu"], "device"),
    (TRAIN, ["--num-gpus", "2"], ["-num_gpus", "2"], "num_processes"),
    (TRAIN, ["--save-probabilities"], ["--npz"], "save_probabilities"),  # nnUNetv2_train's, as predict's
    (TRAIN, ["--save-probabilities"], ["--save_probabilities"], "save_probabilities"),
    (TRAIN, ["--val-best"], ["--val_best"], "val_best"),
    (PREDICT, ["--save-probabilities"], ["--npz"], "save_probabilities"),
    (PREDICT, ["--save-probabilities"], ["--save_probabilities"], "save_probabilities"),
    (PREDICT, ["--no-mirroring"], ["--disable_tta"], "mirroring"),
    (PREDICT, ["--device", "cpu"], ["-device", "cpu"], "device"),
    (PREDICT, ["--step-size", "0.75"], ["-step_size", "0.75"], "step_size"),
    (PREDICT, ["--checkpoint", "best"], ["-chk", "checkpoint_best.pth"], "checkpoint"),
    (PREDICT, ["--continue-prediction"], ["--continue_prediction"], "continue_prediction"),
    (PREDICT, ["--continue-prediction"], ["--c"], "continue_prediction"),  # nnUNetv2_predict_from_modelfolder's
    (PREDICT, ["--preprocessing-workers", "2"], ["-npp", "2"], "preprocessing_workers"),
    (PREDICT, ["--export-workers", "2"], ["-nps", "2"], "export_workers"),
    (QUERY, ["--checkpoint", "best"], ["-chk", "checkpoint_best.pth"], "checkpoint"),
    (QUERY, ["--device", "cpu"], ["-device", "cpu"], "device"),
    (DEMO, ["--device", "cpu"], ["-device", "cpu"], "device"),
    (EVALUATE, ["--labels", "1", "2"], ["-l", "1", "2"], "labels"),
    (EVALUATE, ["--allow-missing"], ["--chill"], "allow_missing"),
]


@pytest.mark.parametrize(
    ("base", "ours", "nnunet", "attribute"), ALIASES, ids=lambda v: " ".join(v) if isinstance(v, list) else v
)
def test_nnunet_spelling_parses_like_ours(base: list[str], ours: list[str], nnunet: list[str], attribute: str) -> None:
    ours_args, nnunet_args = parse(*base, *ours), parse(*base, *nnunet)
    assert nnunet_args == ours_args  # the whole Namespace, not only the one attribute
    assert getattr(ours_args, attribute) != getattr(parse(*base), attribute)  # and the flag did something


def test_chk_final_is_the_default_checkpoint() -> None:
    for base in (PREDICT, QUERY):
        assert parse(*base).checkpoint == "final"
        assert parse(*base, "-chk", "checkpoint_final.pth").checkpoint == "final"
        assert parse(*base, "--checkpoint", "final").checkpoint == "final"


def test_checkpoint_names_match_the_run_folders() -> None:
    from nnfiltermatch.runs import CHECKPOINTS

    assert CHECKPOINT_FILES == CHECKPOINTS


def test_device_alias_does_not_swallow_dash_d() -> None:
    """``-device`` is a flag of its own, not ``-d evice``; ``-d`` keeps working next to it."""
    args = parse("train", "-d", "4", "-device", "cpu", "-c", "3d_fullres", "-f", "0")
    assert (args.dataset, args.device) == ("4", "cpu")


def test_evaluate_predictions_spellings() -> None:
    assert (
        parse("evaluate", "-r", "ref", "--pred", "p").pred == parse("evaluate", "-r", "ref", "--predictions", "p").pred
    )


@pytest.mark.parametrize("flag", [["-p", "pred"], ["-ppred"], ["-p"]])
def test_evaluate_dash_p_fails_naming_pred(capsys: pytest.CaptureFixture[str], flag: list[str]) -> None:
    """``-p`` is the plans everywhere else: in evaluate an old habit must fail loudly, saying what to use."""
    err = parse_error(capsys, "evaluate", "-r", "ref", *flag)
    assert "argument -p" in err and "--pred" in err and "--predictions" in err


@pytest.mark.parametrize("base", [PREDICT, QUERY], ids=["predict", "query"])
@pytest.mark.parametrize("value", ["checkpoint_foo.pth", "checkpoint_latest.pth", "latest"])
def test_unknown_checkpoint_names_the_allowed_values(
    capsys: pytest.CaptureFixture[str], base: list[str], value: str
) -> None:
    err = parse_error(capsys, *base, "-chk", value)
    assert repr(value) in err
    for allowed in ("final", "best", "checkpoint_final.pth", "checkpoint_best.pth"):
        assert allowed in err


def test_every_parser_refuses_abbreviations() -> None:
    parsers = all_parsers(build_parser())
    assert len(parsers) == 11  # the top level, 8 commands, convert's 2 formats
    assert all(not p.allow_abbrev for p in parsers)


@pytest.mark.parametrize(
    "argv",
    [
        [*TRAIN, "--val-iters", "5"],  # was --val-iters-per-epoch
        [*TRAIN, "--val", "5"],  # --val is a flag now (nnU-Net's validation only); it takes no value
        [*TRAIN, "--val_b"],
        [*TRAIN, "--iters", "5"],
        [*TRAIN, "--epoch", "3"],
        [*TRAIN, "--cont"],
        [*TRAIN, "--no-final"],
        [*PREDICT, "--save-prob"],
        [*PREDICT, "--no-mirror"],
        [*PREDICT, "--continue"],  # train's flag; predict's is --continue_prediction
        [*PREDICT, "--over"],
        [*QUERY, "--reuse", "never"],
        ["prepare", "-d", "4", "--labeled", "0.1"],  # was ambiguous; now simply unknown
        ["--vers"],
    ],
    ids=" ".join,
)
def test_prefixes_are_rejected_not_guessed(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    err = parse_error(capsys, *argv)
    assert "unrecognized arguments" in err or "the following arguments are required" in err


def test_train_val_and_npz_are_nnunets() -> None:
    """``--val``: validation only (not a prefix of --val-iters-per-epoch); ``--npz`` with it or with a training."""
    args = parse(*TRAIN, "--val", "--npz")
    assert (args.validation_only, args.save_probabilities, args.val_best) == (True, True, False)
    assert args.val_iters_per_epoch is None
    assert parse(*TRAIN, "--val", "--val_best").val_best
    assert not parse(*TRAIN).validation_only and not parse(*TRAIN).save_probabilities


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--val", "--epochs", "3"], "--epochs"),
        (["--val", "--continue"], "--continue"),
        (["--val", "--overwrite"], "--overwrite"),
        (["--val", "--preset", "paper"], "--preset paper"),
        (["--val", "--num-gpus", "2"], "--num-gpus 2"),
        (["--val", "--no-final-validation"], "--val"),
        (["--npz", "--no-final-validation"], "--npz"),
        (["--val_best", "--no-final-validation"], "--val_best"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_train_val_refuses_training_options(capsys: pytest.CaptureFixture[str], extra: list[str], named: str) -> None:
    """Refused before the dataset is read (the -d here does not exist), naming the flag; exit status 2."""
    from nnfiltermatch.cli import main

    assert main([*TRAIN, *extra]) == 2
    err = capsys.readouterr().err
    assert named in err and ("--val only validates" in err or "--no-final-validation skips" in err), err


def test_predict_continue_and_overwrite_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(*PREDICT)
    assert (args.continue_prediction, args.overwrite) == (False, False)  # the default refuses existing outputs
    assert parse(*PREDICT, "--overwrite").overwrite
    err = parse_error(capsys, *PREDICT, "--continue_prediction", "--overwrite")
    assert "argument --overwrite: not allowed with argument --continue_prediction/--continue-prediction/--c" in err


def test_predict_help_states_the_cpu_defaults_and_their_cost(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("predict", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "Default 0.5 for every configuration, _cpu included" in text
    assert "Default: on, for every configuration including the _cpu ones" in text
    assert "about 8x faster" in text and "27 windows per case at 0.5, 8 at 1.0" in text and "3.9 s" in text
    assert "--continue_prediction" in text and "--overwrite" in text
