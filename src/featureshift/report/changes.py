"""What a channel page shows of the change from the reference to the last snapshot: the
pictures of what the channel gained and lost (rendered by `featureshift report` through the job
list, optvis/pair.py) and the probe images whose activation rose and fell most
(metrics/examples.py `shifted_examples`), as the page's template takes them."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from ..io import safe_name, save_image
from ..optvis.settings import RenderSettings

CROP_TILE = 112  # px, as the dataset examples above them


@dataclasses.dataclass
class ChannelChange:
    """A channel's gained and lost renders between the reference and the last snapshot."""

    settings: RenderSettings | None  # what both were rendered with (objective "gained"); None: not asked for
    gained: Path | None  # the cached tile; None: not rendered, or the render failed
    lost: Path | None


def example_items(out: Path, examples: Sequence[Any], crops: Sequence[Any], stem: str,
                  caption) -> list[dict[str, str]]:
    """Save the CROPS (example_crops' (whole, crop) pairs) of EXAMPLES under OUT/img/examples/STEM-k.png
    and return the template's items; caption(example) -> the line under the picture."""
    items = []
    for k, (ex, (_, crop)) in enumerate(zip(examples, crops)):
        rel = f"img/examples/{stem}-{k}.png"
        save_image(out / rel, crop)
        items.append({"src": rel, "name": f"{ex.path.parent.name}/{ex.path.name}", "path": str(ex.path),
                      "value": caption(ex)})
    return items


def shift_section(out: Path, m, layer: str, channel: int, info, image_cache: dict) -> dict[str, Any] | None:
    """The probe images whose activation of CHANNEL rose most and fell most from the reference to
    the last snapshot of the RunMetrics M, cropped and saved; None where M has none for it."""
    from ..metrics.examples import example_crops

    last = m.epochs[-1]
    shifts = m.shifts.get((layer, channel, last))
    if shifts is None:
        return None

    def caption(ex) -> str:
        return f"{ex.before:.3g} → {ex.after:.3g} ({ex.change:+.3g})"

    side = {}
    for name, exs in (("rose", shifts.rose), ("fell", shifts.fell)):
        crops = example_crops(exs, info, m.image_size, tile=CROP_TILE, cache=image_cache)
        side[name] = example_items(out, exs, crops, f"{safe_name(layer)}-{channel:04d}-{last:03d}-{name}", caption)
    return side


def change_pictures(change: ChannelChange | None, before: str | None, after: str | None, copy) -> dict | None:
    """The four pictures of the gained/lost row (report-relative paths; copy(tile) copies a cached
    tile into the report), or None where the channel's gained and lost were not rendered."""
    if change is None or change.settings is None:
        return None
    return {"before": before, "after": after, "gained": copy(change.gained) if change.gained else None,
            "lost": copy(change.lost) if change.lost else None,
            "describe": dataclasses.replace(change.settings, objective="gained").describe()}
