"""Render jobs: which tiles a command needs, minus those the tile cache already holds,
grouped so that a worker loads each snapshot once and fills its batches.

A command describes every tile it shows as a `TileRequest` (snapshot, checksum, layer,
channel); `plan_jobs` drops the cached ones and the duplicates (two snapshots with the
same weights share their tiles) and cuts the rest into `TileJob`s: one snapshot each, at
most `max_tiles` tiles (of any of its layers), in snapshot order. An executor
(`featureshift.jobs.executors`) runs the plan, locally or on a Ray cluster, and the
results land in the cache either way.

The network of a request is a saved state (a snapshot or ONNX file, by path: a worker
loads it) or a `HeldNetwork`, a module already in this process (an API caller's, or one
that `vis` and `compare` opened by name): it renders here as it is, and a Ray worker gets
it through the object store. Either is named in the cache by its checksum, so a held
network's tiles are cached like a snapshot's. A `PairSource` is two of them rendered as one
network (what a channel gained and lost between them, `optvis.pair`): a worker receives
both and builds the pair; its checksum covers both networks'.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..device import CPU_MAX_BATCH
from ..optvis.settings import DEFAULT_SETTINGS, RenderSettings
from ..states import Preprocessing
from .cache import TileCache, tile_key


@dataclasses.dataclass(frozen=True, eq=False)
class HeldNetwork:
    """A network held in memory, rendered in place of a saved state. Two are the same source
    only when they are the same object (their tiles meet in the cache through `checksum`)."""

    module: Any  # an nn.Module, eval mode, featureshift_info attached (network.open_network)
    checksum: str


def hold_network(module, checksum: str | None = None) -> HeldNetwork:
    """MODULE as a render source. checksum: its snapshot's weight checksum when it was loaded
    from one (its tiles are then the snapshot's); else made from what decides its pictures
    (`snapshot.network_checksum` with the preprocessing: the weights, the class, the input)."""
    from ..snapshot import network_checksum

    return HeldNetwork(module, network_checksum(module, checksum, with_preprocessing=True))


@dataclasses.dataclass(frozen=True)
class PairSource:
    """Two networks rendered as one (`optvis.pair.NetworkPair`), for the objectives "gained" and
    "lost": `before` and `after`, each a saved state (a worker loads it) or a `HeldNetwork`.
    `checksum` names the pair in the cache: it covers both networks' checksums, in their order
    (what A gained from B is what B lost from A, but not the same picture: the seeds are A's)."""

    before: Path | HeldNetwork
    after: Path | HeldNetwork
    before_checksum: str
    after_checksum: str
    checksum: str


def pair_source(before: str | Path | HeldNetwork, after: str | Path | HeldNetwork, before_checksum: str,
                after_checksum: str) -> PairSource:
    """BEFORE and AFTER (saved states or held networks, with their checksums) as one render source."""
    import hashlib
    import json

    blob = json.dumps({"before": before_checksum, "after": after_checksum}, sort_keys=True)
    return PairSource(_source(before), _source(after), before_checksum, after_checksum,
                      "pair-" + hashlib.sha256(blob.encode()).hexdigest())


Source = Path | HeldNetwork | PairSource  # what a tile is rendered from


def _source(snapshot: str | Path | HeldNetwork | PairSource) -> Source:
    return snapshot if isinstance(snapshot, (HeldNetwork, PairSource)) else Path(snapshot)


@dataclasses.dataclass(frozen=True)
class TileRequest:
    """One tile a command wants: `channel` of `layer` rendered from the saved state at `snapshot`
    (a snapshot or an ONNX file, see `featureshift.states`), from a `HeldNetwork`, or from a
    `PairSource` (two networks, rendered with the objective "gained" or "lost").

    `checksum` is the state's checksum (`State.checksum`: a snapshot's weight checksum, an ONNX
    file's sha256; a held network's own), which names the tile in the cache. `epoch`, when given,
    is recorded in the tile's header. `preprocessing`: how to feed an ONNX file that does not
    carry its own. `copy`: which of the images of a target the settings render several of
    (`RenderSettings.copies`, the diversity objective); 0, the first, is the tile a single
    render gives.
    """

    snapshot: Source
    checksum: str
    layer: str
    channel: int
    epoch: int | None = None
    preprocessing: Preprocessing | None = None
    copy: int = 0


@dataclasses.dataclass(frozen=True)
class TileJob:
    """One unit of work: `targets` ((layer, channel) pairs) rendered from one snapshot, stored under `keys`.

    All the targets of a snapshot go in one job, whatever their layers, up to the batch the
    job is sized for: the engine optimizes them together. With `copies` (one per target, see
    TileRequest.copy) a target may appear once per copy; it is rendered once."""

    snapshot: Source
    checksum: str
    targets: tuple[tuple[str, int], ...]
    keys: tuple[str, ...]
    settings: RenderSettings
    epoch: int | None = None
    preprocessing: Preprocessing | None = None  # see TileRequest
    copies: tuple[int, ...] = ()  # the copy of each target; () when every one is the first

    def copy_of(self, index: int) -> int:
        return self.copies[index] if self.copies else 0

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(layer for layer, _ in self.targets))

    def __len__(self) -> int:
        return len(self.targets)


@dataclasses.dataclass(frozen=True)
class _Tile:
    """One tile of a job being planned."""

    target: tuple[str, int]
    key: str
    epoch: int | None
    copy: int


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
        groups: dict[tuple[Source, str, Preprocessing | None], list[_Tile]] = {}
        for job in self.jobs:
            groups.setdefault((job.snapshot, job.checksum, job.preprocessing), []).extend(
                _Tile(t, k, job.epoch, job.copy_of(i)) for i, (t, k) in enumerate(zip(job.targets, job.keys)))
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
    # (snapshot, checksum, preprocessing) -> its tiles, in first-seen order
    groups: dict[tuple[Source, str, Preprocessing | None], list[_Tile]] = {}
    for r in requests:
        key = plan.keys[r] = tile_key(r.checksum, r.layer, r.channel, settings, copy=r.copy)
        if key in seen:
            continue
        seen.add(key)
        plan.requested += 1
        if not force and key in cache:
            plan.cached += 1
            continue
        groups.setdefault((_source(r.snapshot), r.checksum, r.preprocessing), []).append(
            _Tile((r.layer, int(r.channel)), key, r.epoch, int(r.copy)))
    plan.jobs = _cut(groups, settings, max_tiles)
    return plan


def _cut(groups: dict[tuple[Source, str, Preprocessing | None], list[_Tile]], settings: RenderSettings,
         max_tiles: int) -> list[TileJob]:
    jobs = []
    for (snapshot, checksum, preprocessing), items in groups.items():
        for start in range(0, len(items), max_tiles):
            part = items[start:start + max_tiles]
            copies = tuple(t.copy for t in part) if any(t.copy for t in part) else ()
            jobs.append(TileJob(snapshot, checksum, tuple(t.target for t in part), tuple(t.key for t in part),
                                settings, part[0].epoch, preprocessing, copies))
    return jobs


def batch_photos(jobs: Sequence[TileJob], max_tiles: int = CPU_MAX_BATCH) -> list[TileJob]:
    """Accentuation jobs of one snapshot that differ only in their photo, as jobs of up to
    MAX_TILES targets with one photo per target (RenderSettings.image as a tuple): the engine
    optimizes them together instead of one small batch per photo. Keys are unchanged (each
    tile's key holds its own photo); other jobs pass through as they are."""
    out: list[TileJob] = []
    groups: dict[tuple, list[tuple[_Tile, str]]] = {}  # -> [(tile, its photo)]
    for job in jobs:
        s = job.settings
        if s.method != "accent" or isinstance(s.image, tuple) or s.image is None:
            out.append(job)
            continue
        base = dataclasses.replace(s, image=None)
        groups.setdefault((job.snapshot, job.checksum, job.preprocessing, job.epoch, base), []).extend(
            (_Tile(t, k, job.epoch, job.copy_of(i)), str(s.image)) for i, (t, k) in enumerate(zip(job.targets, job.keys)))
    for (snapshot, checksum, preprocessing, epoch, base), items in groups.items():
        for start in range(0, len(items), max_tiles):
            part = items[start:start + max_tiles]
            photos = tuple(p for _, p in part)
            copies = tuple(t.copy for t, _ in part) if any(t.copy for t, _ in part) else ()
            out.append(TileJob(snapshot, checksum, tuple(t.target for t, _ in part), tuple(t.key for t, _ in part),
                               dataclasses.replace(base, image=photos if len(set(photos)) > 1 else photos[0]),
                               epoch, preprocessing, copies))
    return out
