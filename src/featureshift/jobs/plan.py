"""Render jobs: which tiles a command needs, minus those the tile cache already holds,
grouped so that a worker loads each snapshot once and fills its batches.

A command describes every tile it shows as a `TileRequest` (snapshot, checksum, layer,
channel); `plan_jobs` drops the cached ones and the duplicates (two snapshots with the
same weights share their tiles) and cuts the rest into `TileJob`s: one snapshot each, at
most `max_tiles` tiles (of any of its layers), in snapshot order. An executor
(`featureshift.jobs.executors`) runs the plan, locally or on a Ray cluster, and the
results land in the cache either way.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Sequence

from ..device import CPU_MAX_BATCH
from ..optvis.settings import DEFAULT_SETTINGS, RenderSettings
from ..states import Preprocessing
from .cache import TileCache, tile_key

@dataclasses.dataclass(frozen=True)
class TileRequest:
    """One tile a command wants: `channel` of `layer` rendered from the saved state at `snapshot`
    (a snapshot or an ONNX file, see `featureshift.states`).

    `checksum` is the state's checksum (`State.checksum`: a snapshot's weight checksum, an ONNX
    file's sha256), which names the tile in the cache. `epoch`, when given, is recorded in the
    tile's header. `preprocessing`: how to feed an ONNX file that does not carry its own.
    """

    snapshot: Path
    checksum: str
    layer: str
    channel: int
    epoch: int | None = None
    preprocessing: Preprocessing | None = None


@dataclasses.dataclass(frozen=True)
class TileJob:
    """One unit of work: `targets` ((layer, channel) pairs) rendered from one snapshot, stored under `keys`.

    All the targets of a snapshot go in one job, whatever their layers, up to the batch the
    job is sized for: the engine optimizes them together."""

    snapshot: Path
    checksum: str
    targets: tuple[tuple[str, int], ...]
    keys: tuple[str, ...]
    settings: RenderSettings
    epoch: int | None = None
    preprocessing: Preprocessing | None = None  # see TileRequest

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(layer for layer, _ in self.targets))

    def __len__(self) -> int:
        return len(self.targets)


@dataclasses.dataclass
class JobPlan:
    """The jobs still to run, and what the plan found already done."""

    jobs: list[TileJob]
    settings: RenderSettings
    cached: int = 0  # distinct tiles already in the cache
    requested: int = 0  # distinct tiles asked for
    keys: dict[TileRequest, str] = dataclasses.field(default_factory=dict)  # every request -> its tile key

    @property
    def tiles(self) -> int:
        """Tiles the jobs will render."""
        return sum(len(j) for j in self.jobs)

    def sized(self, max_tiles: int) -> JobPlan:
        """The same work cut into jobs of at most `max_tiles` tiles (an executor's `max_tiles`)."""
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")
        groups: dict[tuple[Path, str, Preprocessing | None], list[tuple[tuple[str, int], str, int | None]]] = {}
        for job in self.jobs:
            groups.setdefault((job.snapshot, job.checksum, job.preprocessing), []).extend(
                (t, k, job.epoch) for t, k in zip(job.targets, job.keys))
        return dataclasses.replace(self, jobs=_cut(groups, self.settings, max_tiles))


def plan_jobs(requests: Iterable[TileRequest], cache: TileCache, *, settings: RenderSettings | None = None,
              force: bool = False, max_tiles: int = CPU_MAX_BATCH) -> JobPlan:
    """The jobs that render every requested tile missing from `cache` (all of them with `force`).

    Requests for the same tile (same checksum, layer and channel) are rendered once. Jobs
    keep the order in which snapshots first appear in `requests`, and targets the order in
    which they were asked for; each holds at most `max_tiles` tiles of one snapshot (use the
    executor's `max_tiles`: `device.max_batch`, a GPU's batch on a GPU).
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")
    settings = settings or DEFAULT_SETTINGS
    plan = JobPlan([], settings)
    seen: set[str] = set()
    # (snapshot, checksum, preprocessing) -> [((layer, channel), key, epoch)], in first-seen order
    groups: dict[tuple[Path, str, Preprocessing | None], list[tuple[tuple[str, int], str, int | None]]] = {}
    for r in requests:
        key = plan.keys[r] = tile_key(r.checksum, r.layer, r.channel, settings)
        if key in seen:
            continue
        seen.add(key)
        plan.requested += 1
        if not force and key in cache:
            plan.cached += 1
            continue
        groups.setdefault((Path(r.snapshot), r.checksum, r.preprocessing), []).append(
            ((r.layer, int(r.channel)), key, r.epoch))
    plan.jobs = _cut(groups, settings, max_tiles)
    return plan


def _cut(groups: dict[tuple[Path, str, Preprocessing | None], list[tuple[tuple[str, int], str, int | None]]],
         settings: RenderSettings, max_tiles: int) -> list[TileJob]:
    jobs = []
    for (snapshot, checksum, preprocessing), items in groups.items():
        for start in range(0, len(items), max_tiles):
            part = items[start:start + max_tiles]
            jobs.append(TileJob(snapshot, checksum, tuple(t for t, _, _ in part), tuple(k for _, k, _ in part),
                                settings, part[0][2], preprocessing))
    return jobs


def batch_photos(jobs: Sequence[TileJob], max_tiles: int = CPU_MAX_BATCH) -> list[TileJob]:
    """Accentuation jobs of one snapshot that differ only in their photo, as jobs of up to
    MAX_TILES targets with one photo per target (RenderSettings.image as a tuple): the engine
    optimizes them together instead of one small batch per photo. Keys are unchanged (each
    tile's key holds its own photo); other jobs pass through as they are."""
    out: list[TileJob] = []
    groups: dict[tuple, list[tuple[tuple[str, int], str, str]]] = {}
    for job in jobs:
        s = job.settings
        if s.method != "accent" or isinstance(s.image, tuple) or s.image is None:
            out.append(job)
            continue
        base = dataclasses.replace(s, image=None)
        groups.setdefault((job.snapshot, job.checksum, job.preprocessing, job.epoch, base), []).extend(
            (t, k, str(s.image)) for t, k in zip(job.targets, job.keys))
    for (snapshot, checksum, preprocessing, epoch, base), items in groups.items():
        for start in range(0, len(items), max_tiles):
            part = items[start:start + max_tiles]
            photos = tuple(p for _, _, p in part)
            out.append(TileJob(snapshot, checksum, tuple(t for t, _, _ in part), tuple(k for _, k, _ in part),
                               dataclasses.replace(base, image=photos if len(set(photos)) > 1 else photos[0]),
                               epoch, preprocessing))
    return out
