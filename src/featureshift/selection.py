"""The one channel selection: `--columns N`, `--channels 0-4,17` and `--most-changed N`
mean the same in every command, and so do index lists like '0,1,5-10'."""
from __future__ import annotations

import re
from typing import Sequence

from .errors import FeatureshiftError

DEFAULT_COLUMNS = 5  # channels a command shows when none are chosen
# compare alone shows more by default: its sheet is only two rows (A above B) where a timeline
# has a row per snapshot, so more channels still make a small picture. Kept at 8 so that its
# sheets stay as they were.
COMPARE_COLUMNS = 8


def parse_indices(spec: str | int | Sequence[int], what: str = "index") -> list[int]:
    """'0,1,5-10' -> [0, 1, 5, 6, 7, 8, 9, 10]; order kept, duplicates dropped."""
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        return list(dict.fromkeys(int(i) for i in spec))
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise FeatureshiftError(f"'{spec}' is not a valid {what} list: use numbers and ranges like 0,1,5-10.")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise FeatureshiftError(f"The range '{part}' in '{spec}' runs backwards; write it as {hi}-{lo}.")
        out.extend(range(lo, hi + 1))
    return list(dict.fromkeys(out))


def check_exclusive(columns=None, channels=None, most_changed=None) -> None:
    """At most one of the three ways to choose channels."""
    given = [flag for flag, v in (("--columns", columns), ("--channels", channels), ("--most-changed", most_changed))
             if v is not None]
    if len(given) > 1:
        raise FeatureshiftError(f"Give one of {' and '.join(given)}, not both: --columns N takes the first N "
                                "channels, --channels LIST the ones listed, --most-changed N the N that changed most.")
    for flag, v in (("--columns", columns), ("--most-changed", most_changed)):
        if v is not None and v < 1:
            raise FeatureshiftError(f"{flag} must be at least 1, not {v}.")


def select_channels(count: int, columns: int | None = None, channels: str | Sequence[int] | None = None,
                    most_changed: int | None = None, scores: Sequence[float] | None = None, *,
                    layer: str = "", default: int = DEFAULT_COLUMNS, unit: str = "channels") -> list[int]:
    """The channels of a layer with COUNT channels that the user asked for.

    columns: the first N; channels: a spec like '0-4,17' or a list; most_changed: the N
    with the highest SCORES (NaN or infinite scores, e.g. dead channels, never count);
    none of them: the first DEFAULT. Out-of-range channels are an error naming the range."""
    import math

    check_exclusive(columns, channels, most_changed)
    if channels is not None:
        chosen = parse_indices(channels, "channel")
        if not chosen:
            raise FeatureshiftError("No channels were given; use --columns N or --channels 0-4,17.")
        beyond = [c for c in chosen if c >= count]
        if beyond:
            where = f"Layer '{layer}' has" if layer else "The layer has"
            raise FeatureshiftError(f"{where} {count} {unit} (0-{count - 1}); {', '.join(map(str, beyond))} "
                                    "is out of range.")
        return chosen
    if most_changed is not None:
        if scores is None:
            raise FeatureshiftError("--most-changed needs a measure of change to rank the channels by.")
        ranked = sorted((i for i in range(count) if math.isfinite(float(scores[i]))),
                        key=lambda i: (-float(scores[i]), i))
        return ranked[:most_changed]
    return list(range(min(columns or default, count)))
