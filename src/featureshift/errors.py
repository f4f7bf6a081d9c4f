"""User-facing errors: one paragraph saying what is wrong and how to fix it.

The CLI prints these without a traceback and exits with status 2; the Python API
raises them so callers can catch a single type.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class FeatureshiftError(Exception):
    """A problem with the user's input or environment, not a bug in featureshift."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:
        # Substring hits help with module paths ("4c" -> "inception4c...").
        found = [c for c in candidates if name.lower() in c.lower()][:n]
    return found


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    found = closest(name, candidates)
    return f" Did you mean: {', '.join(found)}?" if found else ""
