"""What several commands' parsers share: the device and the annotation round options."""

from __future__ import annotations

import argparse


def round_number(value: str) -> int:
    """``--round K``: a whole number from 0, refused naming the value otherwise."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"invalid round {value!r}: give 0, 1, 2 ...")
    return number


def add_round(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--round",
        dest="round_number",
        type=round_number,
        metavar="K",
        help=f"annotation round K: {what} <Trainer>_roundK__<Plans>__<configuration> (round 0 and the default: the "
        "plain folder)",
    )


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", "-device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
