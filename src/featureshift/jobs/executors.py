"""Executors run a `JobPlan`: here, one snapshot after another (the default), or on a Ray cluster.

Both compute a job with the same function (`render_job`: the engine's batched render,
images turned into 8-bit RGB arrays), so a tile does not depend on where it was
rendered, only on the kind of device. The caller's process writes every tile: PNG
encoding never holds a GPU, and each file is written atomically, so a tile under its
final name is always whole. `run_jobs` drives either executor with one progress bar
over all tiles.

Ray is optional (`pip install 'featureshift[ray]'`): `make_executor(ray="auto")` starts
a Ray instance on this machine, `make_executor(ray="HOST:PORT")` joins a running cluster,
and the environment variable FEATURESHIFT_RAY_ADDRESS does the same when `ray` is None.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import FeatureshiftError
from ..states import Preprocessing
from .cache import TileCache
from ..device import core_count, cuda_available, max_batch, ray_placement, uses_gpu
from ..optvis.settings import RenderSettings
from .plan import HeldNetwork, JobPlan, PairSource, TileJob, TileRequest, plan_jobs

RAY_ADDRESS_ENV = "FEATURESHIFT_RAY_ADDRESS"
RAY_INSTALL = "pip install 'featureshift[ray]'"
# Test hook: while the folder this names exists, the first Ray worker to load a snapshot there
# kills its own process mid-job, as a crashed or preempted machine would; its job must be retried.
CRASH_ONCE_ENV = "FEATURESHIFT_TEST_CRASH_ONCE"
RAY_RETRIES = 3
LOCAL_NAMES = ("local", "none", "off")
TILE_WRITERS = min(8, core_count())


@dataclasses.dataclass
class JobOutput:
    """What a worker hands back for one job: 8-bit pictures and scores, or why the snapshot was unusable."""

    images: np.ndarray | None  # (channels, size, size, 3) uint8
    scores: list[float] = dataclasses.field(default_factory=list)
    failed: dict[int, str] = dataclasses.field(default_factory=dict)  # index -> why the render diverged
    no_response: set[int] = dataclasses.field(default_factory=set)  # indices of channels with no gradient
    error: str | None = None  # the snapshot could not be loaded
    threads: int = 0  # the CPU threads torch used
    precision: str | None = None  # what the network ran in (settings' "auto" resolves per machine)
    shown: str | None = None  # how the input bands are shown, for a network that does not take RGB (grid.bands_note)


@dataclasses.dataclass
class JobReport:
    """What `run_jobs` did. Keys are tile keys."""

    rendered: int = 0
    cached: int = 0
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> why (diverged, or no tile at all)
    no_response: set[str] = dataclasses.field(default_factory=set)  # channels that never responded to the image
    # snapshot (or pair of them) -> why it could not be loaded
    unusable: dict[Path | PairSource, str] = dataclasses.field(default_factory=dict)
    written: dict[str, Path] = dataclasses.field(default_factory=dict)  # key -> tile written by this run
    executor: str | None = None  # where the tiles were rendered (`describe()`); None when none was needed


# ---------------------------------------------------------------- the work of one job

def render_job(model, job: TileJob, *, device: str = "auto", batch_size: int | None = None,
               quiet: bool = True) -> JobOutput:
    """Render JOB's channels on MODEL in batches: the same computation wherever it runs.
    quiet=False shows the engine's progress over the steps."""
    import torch

    from ..grid import bands_note, to_pil
    from ..models.info import input_channels
    from ..optvis.engine import render

    targets = list(dict.fromkeys(job.targets))  # a target asked for in several copies renders once
    out = render(model, targets, settings=job.settings, device=device, batch_size=batch_size, quiet=quiet)
    copies = len(out.images) // len(targets)  # the diversity objective renders several per target
    if any(job.copy_of(j) >= copies for j in range(len(job))):  # the objective decides the copies, not the settings
        raise RuntimeError(f"render gave {copies} image(s) per target, fewer than the copies asked for")
    position = {t: i for i, t in enumerate(targets)}
    images, scores, failed, no_response = [], [], {}, set()
    for j in range(len(job)):
        k = position[job.targets[j]] * copies + job.copy_of(j)
        images.append(np.asarray(to_pil(out.images[k])))
        scores.append(float(out.scores[k]))
        if k in out.failed:
            failed[j] = out.failed[k]
        if k in out.no_response:
            no_response.add(j)
    return JobOutput(np.stack(images), scores, failed, no_response, threads=torch.get_num_threads(),
                     precision=out.settings.get("precision"), shown=bands_note(input_channels(model)))


def tile_about(job: TileJob, index: int, output: JobOutput) -> dict[str, Any]:
    """The header of a tile, the one every command writes: its key, what it shows, how the
    render went, and the settings' record (`RenderSettings.to_record`) at the top level, where
    tiles of earlier versions had their settings too (`RenderSettings.from_record` reads both)."""
    layer, channel = job.targets[index]
    about: dict[str, Any] = {"key": job.keys[index], "layer": layer, "channel": channel}
    if job.epoch is not None:
        about["epoch"] = job.epoch
    if job.copies:
        about["copy"] = job.copy_of(index)
    # A channel without a response is still cached (its starting noise), marked so that every
    # command that shows it can say so instead.
    settings = job.settings
    if isinstance(settings.image, tuple):  # one photo per target (plan.batch_photos): this tile's own
        settings = dataclasses.replace(settings, image=settings.image[index])
    about.update({"checksum": job.checksum, "score": output.scores[index], "failed": output.failed.get(index),
                  "no_response": index in output.no_response, **settings.to_record()})
    if isinstance(job.snapshot, PairSource):  # the pair's checksum alone would not say which networks
        about.update(before_checksum=job.snapshot.before_checksum, after_checksum=job.snapshot.after_checksum)
    if output.precision is not None:  # beside the record's "precision" (as given): what it meant here
        about["precision_used"] = output.precision
    if output.shown:
        about["shown"] = output.shown
    return about


# ---------------------------------------------------------------- local

def open_saved_state(path: str | os.PathLike, preprocessing: Preprocessing | None = None, *,
                     data: bytes | None = None):
    """The network saved at PATH, a snapshot or an ONNX file (fed with PREPROCESSING), from DATA,
    the file's bytes, when a worker received them."""
    from ..network import open_network

    return open_network(path, data=data, **(preprocessing or Preprocessing()).kwargs()).module


@dataclasses.dataclass
class PairData:
    """What a Ray worker receives for a pair of networks: each one's `source_data`."""

    before: Any
    after: Any


def source_data(source: Path | HeldNetwork | PairSource) -> Any:
    """What a worker needs to open SOURCE: a saved state's file bytes, a held network's module
    (pickled with its weights on the way), a pair's two of them."""
    if isinstance(source, PairSource):
        return PairData(source_data(source.before), source_data(source.after))
    if isinstance(source, HeldNetwork):
        return source.module
    return Path(source).read_bytes()


def open_source(source: Path | HeldNetwork | PairSource, preprocessing: Preprocessing | None = None, *,
                data: Any = None):
    """The network SOURCE stands for, a pair built from its two networks (`optvis.pair.NetworkPair`).
    DATA: what `source_data` gave a worker; without it saved states are read from their files."""
    if isinstance(source, PairSource):
        from ..optvis.pair import NetworkPair

        parts = data if data is not None else PairData(None, None)
        return NetworkPair(open_source(source.before, preprocessing, data=parts.before),
                           open_source(source.after, preprocessing, data=parts.after))
    if isinstance(source, HeldNetwork):
        return data if data is not None else source.module
    return open_saved_state(source, preprocessing, data=data)


class LocalExecutor:
    """Today's behaviour: one snapshot after another in this process, the next one loading in the background."""

    def __init__(self, device: str = "auto", batch_size: int | None = None):
        self.device = device
        self.batch_size = batch_size
        # The engine's own bar over the steps of each job: for commands whose few tiles make one
        # long job (vis, compare), where a bar over tiles would stand still until the end.
        self.show_steps = False
        self.max_tiles = max_batch(uses_gpu(device, cuda_available=device == "auto" and cuda_available()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"local ({self.device})"

    def run(self, jobs: list[TileJob]) -> Iterator[tuple[TileJob, JobOutput]]:
        """(job, output) for each job, in order."""
        snapshots = list(dict.fromkeys((j.snapshot, j.preprocessing) for j in jobs))
        if not snapshots:
            return
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="featureshift-load")

        def load(source):
            snapshot, preprocessing = source
            if isinstance(snapshot, HeldNetwork):  # in hand already
                done = concurrent.futures.Future()
                done.set_result(snapshot.module)
                return done
            return pool.submit(open_source, snapshot, preprocessing)

        try:
            pending = {snapshots[0]: load(snapshots[0])}
            current, model, error = None, None, None
            for job in jobs:
                if (job.snapshot, job.preprocessing) != current:
                    model = None  # release the previous network before the next one lands on the device
                    current = (job.snapshot, job.preprocessing)
                    try:
                        model, error = pending.pop(current).result(), None
                    except FeatureshiftError as e:
                        model, error = None, str(e)
                    i = snapshots.index(current)
                    if i + 1 < len(snapshots):
                        pending[snapshots[i + 1]] = load(snapshots[i + 1])
                if model is None:
                    yield job, JobOutput(None, error=error)
                else:
                    yield job, render_job(model, job, device=self.device, batch_size=self.batch_size,
                                          quiet=not self.show_steps)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- Ray

_WORKER_MODEL: tuple[str, Any] | None = None  # (checksum, network): a worker keeps its last snapshot


def _worker_job(data, job: TileJob, device: str, batch_size: int | None, threads: int | None) -> JobOutput:
    """Runs in a Ray worker: load the snapshot (unless this worker has it already) and render the job.
    DATA: what `source_data` gave for the job's snapshot, held network or pair (unpickled from the store)."""
    global _WORKER_MODEL
    import torch

    if threads:
        # Ray starts workers with OMP_NUM_THREADS=1; the thread count may change how CPU kernels
        # split their sums, so a worker uses the caller's, and its tiles match local ones.
        torch.set_num_threads(threads)
    if _WORKER_MODEL is None or _WORKER_MODEL[0] != job.checksum:
        _WORKER_MODEL = None
        try:
            model = open_source(job.snapshot, job.preprocessing, data=data)
            _WORKER_MODEL = (job.checksum, model)
        except FeatureshiftError as e:
            return JobOutput(None, error=str(e))
    _crash_once_if_asked()
    return render_job(_WORKER_MODEL[1], job, device=device, batch_size=batch_size)


def _crash_once_if_asked() -> None:
    folder = os.environ.get(CRASH_ONCE_ENV)
    if folder and os.path.isdir(folder):
        try:
            os.close(os.open(os.path.join(folder, "crashed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


def _lost_worker_errors(ray) -> tuple[type[BaseException], ...]:
    # What Ray raises once a task's retries are spent on dead workers (NodeDiedError is newer than 2.9).
    names = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def import_ray():
    """The ray module, or a FeatureshiftError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise FeatureshiftError(f"Rendering on Ray needs Ray, which is not installed: {RAY_INSTALL} "
                                "(or leave out --ray to render on this machine).") from e
    return ray


class RayExecutor:
    """Jobs as Ray tasks: one GPU each (`num_gpus=1`) on a cluster with GPUs, else CPU tasks
    with this process's thread count. Each snapshot's bytes enter the object store once;
    a worker keeps the last snapshot it loaded, and a worker that dies has its jobs retried."""

    def __init__(self, address: str = "auto", device: str = "auto", batch_size: int | None = None,
                 quiet: bool = False):
        import torch

        self.ray = ray = import_ray()
        self.address = address
        self.device = device
        self.batch_size = batch_size
        self.started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": not quiet,
                                      "logging_level": "WARNING"}
            if address != "auto":
                kwargs["address"] = address
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise FeatureshiftError(
                    f"Cannot reach the Ray cluster at {address} ({e}). Start one with `ray start --head` and pass "
                    "the address it prints, or use --ray auto for one on this machine.") from e
            self.started = True
        resources = ray.cluster_resources()
        nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        place = ray_placement(device, cluster_gpus=int(resources.get("GPU", 0)),
                              cluster_cpus=int(resources.get("CPU", 1)), widest_node_cpus=int(max(nodes, default=1)),
                              own_threads=torch.get_num_threads())
        self.use_gpu, self.worker_device, self.threads = place.gpu, place.device, place.threads
        self.options, self.slots = place.resources, place.slots
        self.max_tiles = max_batch(place.gpu)
        self.remote = ray.remote(max_retries=RAY_RETRIES)(_worker_job).options(**self.options)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Nothing to release: a Ray instance this executor started stays up for the next command
        in this process (starting one takes seconds); Ray stops it when the process exits."""

    def shutdown(self) -> None:
        """Stop the Ray instance now if this executor started it."""
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False

    def describe(self) -> str:
        kind = "GPU" if self.use_gpu else f"{self.threads}-thread CPU"
        return f"Ray ({self.slots} {kind} worker(s))"

    def run(self, jobs: list[TileJob]) -> Iterator[tuple[TileJob, JobOutput]]:
        """(job, output) as jobs finish anywhere. Leaving early (Ctrl-C, an error) cancels the rest."""
        ray = self.ray
        last_use = {j.snapshot: i for i, j in enumerate(jobs)}
        refs: dict[Any, Any] = {}  # snapshot -> its bytes (or module) in the object store, until its last job is submitted
        in_flight: dict[Any, TileJob] = {}
        # Enough queued to keep every worker busy, few enough that snapshots do not pile up in the store.
        window = 2 * self.slots
        todo = collections.deque(enumerate(jobs))
        try:
            while todo or in_flight:
                while todo and len(in_flight) < window:
                    i, job = todo.popleft()
                    if job.snapshot not in refs:
                        try:
                            refs[job.snapshot] = ray.put(source_data(job.snapshot))
                        except OSError as e:
                            yield job, JobOutput(None, error=f"The snapshot {e.filename or job.snapshot} cannot be "
                                                              f"read ({e}).")
                            continue
                    ref = self.remote.remote(refs[job.snapshot], job, self.worker_device, self.batch_size,
                                             self.threads)
                    in_flight[ref] = job
                    if last_use[job.snapshot] == i:
                        del refs[job.snapshot]  # the tasks hold it while they need it
                if not in_flight:
                    continue
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    job = in_flight.pop(ref)
                    try:
                        output = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, FeatureshiftError):
                            raise FeatureshiftError(str(cause)) from None
                        raise
                    except _lost_worker_errors(ray) as e:
                        output = JobOutput(None, error=None)
                        output.failed = {j: f"its Ray worker was lost {RAY_RETRIES + 1} times "
                                            f"({e.__class__.__name__})" for j in range(len(job))}
                    yield job, output
        finally:
            for ref in in_flight:
                ray.cancel(ref)


# ---------------------------------------------------------------- choosing and running

def make_executor(ray: str | None = None, device: str = "auto", batch_size: int | None = None,
                  quiet: bool = False) -> LocalExecutor | RayExecutor:
    """The executor for `ray`: None (or "local") renders in this process, "auto" on a Ray
    instance started on this machine, "HOST:PORT" (or "ray://HOST:PORT") on a running Ray
    cluster. With `ray` None, FEATURESHIFT_RAY_ADDRESS, when set, chooses instead.
    `device` (auto, cpu, cuda, ...) and `batch_size` only decide how tiles are computed."""
    from ..device import check_device_spec

    check_device_spec(device)
    address = check_ray(ray)
    if address is None:
        return LocalExecutor(device=device, batch_size=batch_size)
    return RayExecutor(address, device=device, batch_size=batch_size, quiet=quiet)


def check_ray(ray: str | None) -> str | None:
    """The Ray address `ray` stands for (None: render here), as `make_executor` reads it; a
    FeatureshiftError saying how to install Ray when one is asked for and Ray is missing.
    Cheap (Ray is not imported): commands call it first, so that `--ray` without Ray fails at
    once even when everything is cached."""
    import importlib.util

    if ray is None:
        ray = os.environ.get(RAY_ADDRESS_ENV) or None
    if ray is None or ray.strip().lower() in LOCAL_NAMES:
        return None
    if not ray.strip():
        raise FeatureshiftError("--ray needs 'auto' or the address of a Ray cluster (HOST:PORT).")
    if importlib.util.find_spec("ray") is None:
        import_ray()  # raises, saying how to install it
    return ray.strip()


def render_tiles(plan: JobPlan, cache: TileCache, *, ray: str | None = None, device: str = "auto",
                 batch_size: int | None = None, quiet: bool = False,
                 on_tile: Callable[[str, Path], None] | None = None, desc: str = "render",
                 show_steps: bool = False) -> JobReport:
    """Run PLAN with the executor `ray` names (see `make_executor`), its jobs sized for it; a
    plan with nothing to render starts no executor (nor a Ray instance). show_steps: a local
    render also shows the engine's progress over the steps (unless quiet)."""
    if not plan.jobs:
        return JobReport(cached=plan.cached)
    with make_executor(ray, device=device, batch_size=batch_size, quiet=quiet) as executor:
        if isinstance(executor, LocalExecutor):
            executor.show_steps = show_steps and not quiet
        report = run_jobs(plan.sized(executor.max_tiles), cache, executor, quiet=quiet, on_tile=on_tile, desc=desc)
        report.executor = executor.describe()
    return report


def render_groups(groups: Sequence[tuple[RenderSettings, Sequence[TileRequest]]], cache: TileCache, *,
                  ray: str | None = None, device: str = "auto", batch_size: int | None = None, quiet: bool = False,
                  desc: str = "render", combine: Callable[[list[TileJob], int], list[TileJob]] | None = None,
                  executor: LocalExecutor | RayExecutor | None = None) -> list[dict[TileRequest, str]]:
    """Render every missing tile of GROUPS, each a (settings, requests) pair planned on its own (a
    plan holds one set of settings), in one executor: EXECUTOR where a command runs one already,
    else one `make_executor` starts (none when all are cached).
    combine(jobs, max_tiles): how the sized jobs of all groups are put together (e.g.
    `plan.batch_photos`); the jobs of one snapshot follow one another, so the local executor loads
    each snapshot once. Returns each group's request -> tile key."""
    plans = [plan_jobs(requests, cache, settings=settings) for settings, requests in groups]
    if not any(p.jobs for p in plans):
        return [p.keys for p in plans]
    if executor is None:
        with make_executor(ray, device=device, batch_size=batch_size, quiet=quiet) as started:
            return render_groups(groups, cache, quiet=quiet, desc=desc, combine=combine, executor=started)
    jobs = [j for p in plans for j in p.sized(executor.max_tiles).jobs]
    first: dict[Any, int] = {}
    for j in jobs:
        first.setdefault(j.snapshot, len(first))
    jobs.sort(key=lambda j: first[j.snapshot])
    combined = JobPlan(combine(jobs, executor.max_tiles) if combine else jobs, plans[0].settings,
                       cached=sum(p.cached for p in plans), requested=sum(p.requested for p in plans))
    run_jobs(combined, cache, executor, quiet=quiet, desc=desc)
    return [p.keys for p in plans]


def run_jobs(plan: JobPlan, cache: TileCache, executor: LocalExecutor | RayExecutor, *, quiet: bool = False,
             on_tile: Callable[[str, Path], None] | None = None, desc: str = "render") -> JobReport:
    """Run PLAN on EXECUTOR, writing each tile into CACHE as its job finishes.

    `on_tile(key, path)` is called after each new tile is on disk; an exception from it
    (KeyboardInterrupt included) stops the run, cancels the queued jobs and keeps every
    tile already written, so running the same plan again renders only what is missing.
    A diverged render is cached too (its last good image, marked in its header): it would
    diverge again. Tiles of a snapshot that cannot be loaded are reported, not written.
    """
    from tqdm.auto import tqdm

    from ..grid import to_pil

    report = JobReport(cached=plan.cached)
    bar = tqdm(total=plan.tiles, unit="tile", desc=desc, disable=quiet or not plan.jobs, dynamic_ncols=True)
    # PNG encoding and the atomic write (an fsync) release the GIL: with many GPUs feeding one
    # process, a single writer thread would be what the whole cluster waits for.
    writers = concurrent.futures.ThreadPoolExecutor(max_workers=TILE_WRITERS, thread_name_prefix="featureshift-tile")
    results = executor.run(plan.jobs)
    try:
        for job, output in results:
            if output.images is None:
                why = output.error or "not rendered"
                if output.error:
                    report.unusable[job.snapshot if isinstance(job.snapshot, PairSource)
                                    else Path(job.snapshot)] = output.error
                for j, key in enumerate(job.keys):
                    report.failed[key] = output.failed.get(j, why)
                bar.update(len(job.keys))
                continue
            def write(j: int, job=job, output=output) -> Path:
                return cache.write(job.keys[j], to_pil(output.images[j]), tile_about(job, j, output))

            saved = list(zip(job.keys, writers.map(write, range(len(job)))))
            for j, key in enumerate(job.keys):
                if j in output.failed:
                    report.failed[key] = output.failed[j]
                if j in output.no_response:
                    report.no_response.add(key)
            # Every tile of the job is on disk before anyone is told, so an interruption loses none.
            report.rendered += len(saved)
            report.written.update(saved)
            bar.update(len(saved))
            if on_tile is not None:
                for key, path in saved:
                    on_tile(key, path)
    finally:
        results.close()  # cancels what is queued, now rather than when garbage is collected
        writers.shutdown(wait=True)
        bar.close()
    return report
