"""User-facing errors: one line, says what to do, exit code 2 (the CLI turns them into that)."""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A problem the user can fix (bad config, bad data, wrong checkpoint).

    The CLI prints ``error: <message>`` on one line and exits with code 2, without a traceback.
    """


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string.

    Of the few closest spellings, one of the name's own family (the same text before the first
    ``_``: vit_femtoo is a ``vit``, not convnext_femto) wins."""
    close = difflib.get_close_matches(name, list(choices), n=5, cutoff=0.5)
    family = [c for c in close if c.split("_")[0] == name.split("_")[0]]
    best = (family or close or [None])[0]
    return f" (did you mean '{best}'?)" if best else ""
