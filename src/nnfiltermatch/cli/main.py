"""The ``nnfiltermatch`` command: prepare, train, predict, evaluate, demo.

This module assembles the parser and runs a command; each command's options and handler live in ``cli_data``
(prepare, convert, evaluate), ``cli_train`` (train, demo) and ``cli_model`` (predict, query, report).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from nnfiltermatch import __version__
from nnfiltermatch.cli.data import add_convert, add_evaluate, add_prepare, cmd_convert, cmd_evaluate, cmd_prepare
from nnfiltermatch.cli.model import (
    CHECKPOINT_FILES,
    add_predict,
    add_query,
    add_report,
    cmd_predict,
    cmd_query,
    cmd_report,
)
from nnfiltermatch.cli.train import add_demo, add_train, cmd_demo, cmd_train

__all__ = ["CHECKPOINT_FILES", "build_parser", "check_outputs_writable", "main"]


class _Parser(argparse.ArgumentParser):
    """No prefix matching, here and in every sub-parser (``add_subparsers`` makes them of this class).

    With abbreviations nnU-Net habits turn into silent surprises: ``--val`` would be ``--val-iters-per-epoch``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


COMMANDS = {
    "demo": cmd_demo,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "convert": cmd_convert,
    "predict": cmd_predict,
    "query": cmd_query,
    "report": cmd_report,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nnfiltermatch",
        description="Semi-supervised nnU-Net training with entropy filtering of the unlabelled pool (nnFilterMatch).",
    )
    parser.add_argument("--version", action="version", version=f"nnfiltermatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare(sub)
    add_train(sub)
    add_evaluate(sub)
    add_predict(sub)
    add_query(sub)
    add_report(sub)
    add_convert(sub)
    add_demo(sub)
    return parser


# where each command writes: (attribute, option named in the error, a file rather than a folder); train and prepare
# write under nnU-Net's folders, named by their variables
OUTPUTS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "evaluate": (("output", "-o", True),),
    "predict": (("output", "-o", False),),
    "query": (("output", "-o", True), ("png_dir", "--png-dir", False), ("export", "--export", False)),
    "report": (("output", "-o", True),),
    "demo": (("out", "--out", False),),
}


ENV_OUTPUTS = {"train": "nnUNet_results", "prepare": "nnUNet_preprocessed"}


def check_outputs_writable(args: argparse.Namespace) -> None:
    """Every output location of the command is writable, checked before any work starts."""
    from nnfiltermatch.files import require_writable

    for attribute, option, is_file in OUTPUTS.get(args.command, ()):
        value = getattr(args, attribute, None)
        if value is not None:
            require_writable(value, option, is_file)
    variable = ENV_OUTPUTS.get(args.command)
    if variable and os.environ.get(variable):
        require_writable(os.environ[variable], f"${variable} =")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nnfiltermatch.errors import DataValidationError, PreparationError
    from nnfiltermatch.evaluation.evaluate import EvaluationError

    try:
        check_outputs_writable(args)
        return COMMANDS[args.command](args)
    except (DataValidationError, PreparationError, EvaluationError, ValueError) as exc:
        print(f"nnfiltermatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # a location the checks above could not foresee (e.g. a file inside the output)
        print(f"nnfiltermatch {args.command}: error: permission denied: {exc.filename or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
