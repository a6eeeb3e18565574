"""The command line: ``nnfiltermatch <command>``; each command's parser lives beside it."""

from nnfiltermatch.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
