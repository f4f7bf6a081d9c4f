"""The second renders behind the render-noise floors (`metrics.floors`): a sample of each layer's
channels rendered again at the reference snapshot, with the settings of their first render and
another seed. Planned and cached like every tile, so the atlas and the report share them and a
rerun renders none again."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from ..metrics.floors import floor_seed
from ..optvis.settings import RenderSettings
from ..states import State
from .cache import TileCache
from .plan import JobPlan, TileRequest, plan_jobs


@dataclasses.dataclass
class FloorPlan:
    """The floor renders a command needs: one plan per set of render settings, and each channel's tile key."""

    plans: list[JobPlan]
    keys: dict[tuple[str, int], str]  # (layer, channel) -> the key of its second render
    groups: list[tuple[RenderSettings, list[TileRequest]]] = dataclasses.field(default_factory=list)

    @property
    def tiles(self) -> int:
        """Floor tiles still to render."""
        return sum(p.tiles for p in self.plans)

    @property
    def cached(self) -> int:
        return sum(p.cached for p in self.plans)

    def found(self, cache: TileCache) -> dict[tuple[str, int], Path]:
        """(layer, channel) -> the second render, for those in CACHE."""
        return {where: cache.path(key) for where, key in self.keys.items() if key in cache}


def plan_floors(reference: State, wanted: Mapping[tuple[str, int], RenderSettings], cache: TileCache) -> FloorPlan:
    """Plan the second render of each (layer, channel) in WANTED at the REFERENCE snapshot: the
    settings given (those of its first render) with the floor's seed."""
    groups: dict[RenderSettings, list[TileRequest]] = {}
    for (layer, c), settings in wanted.items():
        second = settings.replace(seed=floor_seed(settings.seed))
        groups.setdefault(second, []).append(
            TileRequest(reference.path, reference.checksum, layer, int(c), reference.epoch, reference.preprocessing))
    out = FloorPlan([], {}, list(groups.items()))
    for settings, requests in groups.items():
        plan = plan_jobs(requests, cache, settings=settings)
        out.plans.append(plan)
        out.keys.update({(r.layer, r.channel): plan.keys[r] for r in requests})
    return out


def render_floors(floor_plan: FloorPlan, cache: TileCache, *, executor=None, ray: str | None = None,
                  device: str = "auto", batch_size: int | None = None,
                  quiet: bool = False) -> dict[tuple[str, int], Path]:
    """Render what FLOOR_PLAN still needs on EXECUTOR (one a command already runs), else on one
    `executors.render_groups` starts (here or on Ray), and return (layer, channel) -> second
    render for every planned channel now in the cache."""
    from .executors import render_groups

    if floor_plan.tiles:
        render_groups(floor_plan.groups, cache, ray=ray, device=device, batch_size=batch_size, quiet=quiet,
                      desc="noise floor", executor=executor)
    return floor_plan.found(cache)
