"""The errors a user can fix: each message says what is wrong and what to do, and the CLI reports it (exit 2)."""

from __future__ import annotations

from collections.abc import Sequence

MAX_LISTED_PROBLEMS = 20
LISTED = 8  # how many names an error message lists before "..."


def listed(names: Sequence[str]) -> str:
    """At most ``LISTED`` names, then how many more: error messages name the first offenders, not all 136."""
    return ", ".join(names[:LISTED]) + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


class DataValidationError(ValueError):
    """Raised when the dataset (or a labelled list) cannot be used as given.

    ``problems`` holds every individual problem so callers can show or test them separately.
    """

    def __init__(self, message: str, problems: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems is not None else [message]

    @classmethod
    def from_problems(cls, what: str, problems: Sequence[str]) -> DataValidationError:
        """Build one error listing up to MAX_LISTED_PROBLEMS problems, so users can fix them all at once."""
        if len(problems) == 1:
            return cls(f"{what}: {problems[0]}", problems)
        lines = [f"{what}: {len(problems)} problems found:"]
        lines += [f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
        if len(problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more (fix the ones above and re-run).")
        return cls("\n".join(lines), problems)


class PreparationError(RuntimeError):
    """A preparation step cannot run; the message says what to fix."""
