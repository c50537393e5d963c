"""User-facing errors: one line, what was wrong and what is allowed, exit code 2, no traceback."""

from __future__ import annotations

import difflib
from typing import Iterable, Sequence


class UserError(ValueError):
    """A mistake in what the user asked for (bad flag, bad file, bad config value).

    Library code raises it; the command-line entry points turn it into one line on stderr and exit code 2.
    """


def nearest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest valid choice, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def one_of(what: str, value: object, allowed: Sequence[str]) -> UserError:
    """The standard 'unknown X' error that lists the allowed values."""
    hint = nearest(str(value), allowed)
    return UserError(f"unknown {what} {value!r}{hint}; choose one of: {', '.join(allowed)}")


def first_line(err: BaseException) -> str:
    """'Type: first line of the message' of a library exception, for wrapping it in a UserError."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
