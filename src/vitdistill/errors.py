"""User-facing errors: one line, says what to do, exit code 2 (the CLI turns them into that)."""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A problem the user can fix (bad config, bad data, wrong checkpoint).

    The CLI prints ``error: <message>`` on one line and exits with code 2, without a traceback.
    """


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
