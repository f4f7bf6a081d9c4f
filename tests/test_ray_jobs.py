"""Render jobs on a real local Ray instance: the same tiles as a local render, worker crashes
retried, an interrupted run resumed. One Ray instance serves the whole module (starting one
takes seconds); renders are a few steps at 32 px."""
import os
import shutil
import sys

import pytest
import torch

from featureshift import FeatureshiftError, open_network, save_snapshot
from featureshift.commands.timeline import timeline
from featureshift.jobs.cache import TileCache
from featureshift.jobs.executors import CRASH_ONCE_ENV, RAY_ADDRESS_ENV, LocalExecutor, RayExecutor, make_executor
from featureshift.jobs.plan import TileRequest, plan_jobs
from featureshift.optvis.settings import DEFAULT_SETTINGS
from featureshift.snapshot import read_meta

LAYER = "features.3.squeeze"
FAST = dict(steps=4, size=32, batch_size=16, quiet=True)
# Two threads, where Ray's workers default to one: tiles must still match, because a worker
# takes the caller's thread count.
THREADS = 2


@pytest.fixture(scope="module")
def threads():
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def crash_dir(tmp_path_factory):
    # Workers inherit the environment when Ray starts, so the hook is set before; it acts only
    # while the folder exists.
    path = tmp_path_factory.mktemp("crash") / "armed"
    os.environ[CRASH_ONCE_ENV] = str(path)
    yield path
    os.environ.pop(CRASH_ONCE_ENV, None)


@pytest.fixture(scope="module")
def ray_instance(crash_dir):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, threads):
    """A three-snapshot run and its timeline rendered locally: tile name -> bytes."""
    root = tmp_path_factory.mktemp("ref")
    torch.manual_seed(0)
    model = open_network("squeezenet1_1", weights="random", num_classes=3).module
    for e in range(3):
        with torch.no_grad():
            model.features[0].weight.add_(0.05 * torch.randn_like(model.features[0].weight))
        save_snapshot(model, root / "run" / "snapshots" / f"{e:03d}.safetensors", epoch=e)
    res = timeline(root / "run", LAYER, 2, **FAST)
    assert res.rendered == 6
    return root / "run", tiles(root / "run")


def tiles(run):
    return {p.name: p.read_bytes() for p in sorted((run / "timeline" / "cache").glob("*.png"))}


def fresh_copy(run, dest):
    shutil.copytree(run / "snapshots", dest / "snapshots")
    return dest


@pytest.mark.slow
def test_ray_tiles_are_byte_identical_to_local_ones(tmp_path, reference, ray_instance):
    ref_run, ref_tiles = reference
    run = fresh_copy(ref_run, tmp_path / "run")
    res = timeline(run, LAYER, 2, ray="auto", **FAST)
    assert (res.rendered, res.cached) == (6, 0)
    assert tiles(run) == ref_tiles
    merged = "timeline/features.3.squeeze/merged.png"
    assert (run / merged).read_bytes() == (ref_run / merged).read_bytes()

    # The worker rendered with the caller's threads, although Ray gave it OMP_NUM_THREADS=1.
    snap = run / "snapshots" / "000.safetensors"
    plan = plan_jobs([TileRequest(snap, read_meta(snap).checksum, LAYER, 0)], TileCache(tmp_path / "c"),
                     settings=DEFAULT_SETTINGS.replace(steps=1, size=32), force=True)
    executor = make_executor("auto", device="cpu", batch_size=16, quiet=True)
    assert isinstance(executor, RayExecutor) and not executor.started  # joined the running instance
    [(_, output)] = list(executor.run(plan.jobs))
    assert output.threads == THREADS


@pytest.mark.slow
def test_a_worker_killed_mid_job_is_retried_and_the_timeline_completes(tmp_path, reference, ray_instance, crash_dir):
    ref_run, ref_tiles = reference
    run = fresh_copy(ref_run, tmp_path / "run")
    crash_dir.mkdir()
    try:
        res = timeline(run, LAYER, 2, ray="auto", **FAST)
    finally:
        crashed = (crash_dir / "crashed").exists()
        shutil.rmtree(crash_dir)
    assert crashed  # a worker did die
    assert (res.rendered, res.missing, res.failed) == (6, {}, {})
    assert tiles(run) == ref_tiles


@pytest.mark.slow
def test_interrupted_ray_run_resumes_with_only_the_missing_tiles(tmp_path, reference, ray_instance):
    ref_run, ref_tiles = reference
    run = fresh_copy(ref_run, tmp_path / "run")
    seen = []

    def stop(layer, epoch, channel, path):
        assert path.is_file()  # on disk before we are told
        seen.append(path)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        timeline(run, LAYER, 2, ray="auto", on_tile=stop, **FAST)
    done = tiles(run)
    assert 2 <= len(done) < 6  # the job that finished, whole; the queued ones cancelled
    assert all(ref_tiles[name] == data for name, data in done.items())
    resumed = timeline(run, LAYER, 2, ray="auto", **FAST)
    assert (resumed.rendered, resumed.cached) == (6 - len(done), len(done))
    assert tiles(run) == ref_tiles


@pytest.mark.slow
def test_a_snapshot_a_worker_cannot_load_is_reported_and_the_rest_rendered(tmp_path, reference, ray_instance):
    ref_run, ref_tiles = reference
    run = fresh_copy(ref_run, tmp_path / "run")
    damaged = run / "snapshots" / "002.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-100:] = bytes(100)  # readable metadata, weights that fail their checksum in the worker
    damaged.write_bytes(bytes(data))
    res = timeline(run, LAYER, 2, ray="auto", **FAST)
    assert set(res.missing) == {2} and "checksum" in res.missing[2]
    assert res.rendered == 4 and sorted(res.rows[LAYER]) == [0, 1]
    assert set(tiles(run).items()) < set(ref_tiles.items())


def test_without_ray_installed_the_error_says_how_to_install_it(monkeypatch, reference):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(FeatureshiftError, match=r"pip install 'featureshift\[ray\]'"):
        make_executor("auto")
    with pytest.raises(FeatureshiftError, match=r"pip install 'featureshift\[ray\]'"):
        timeline(reference[0], LAYER, 2, ray="auto", **FAST)  # even with every tile cached
    monkeypatch.setenv(RAY_ADDRESS_ENV, "10.0.0.1:6379")
    with pytest.raises(FeatureshiftError, match="featureshift.ray"):
        make_executor()
    assert isinstance(make_executor("local"), LocalExecutor)
    monkeypatch.delenv(RAY_ADDRESS_ENV)
    assert isinstance(make_executor(), LocalExecutor)


def test_ray_flag_without_ray_installed_is_exit_2_with_the_install_line(monkeypatch, reference):
    from click.testing import CliRunner

    from featureshift.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    r = CliRunner().invoke(main, ["timeline", str(reference[0]), "--layer", LAYER, "--columns", "2",
                                  "--steps", str(FAST["steps"]), "--size", str(FAST["size"]), "--ray", "auto"])
    assert r.exit_code == 2, r.output
    assert "pip install 'featureshift[ray]'" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_vis_of_several_layers_on_ray_matches_local(tmp_path, reference, ray_instance, monkeypatch):
    import featureshift.device as device
    from featureshift.commands.vis import vis

    snap = reference[0] / "snapshots" / "001.safetensors"
    layers = [LAYER, "features.4.squeeze"]
    # Batches of two here, jobs of two on Ray: the same images go through each batch (float
    # rounding in a batched convolution depends on what else is in the batch).
    opts = dict(FAST, batch_size=2)
    here = vis(str(snap), layers, tmp_path / "local.png", columns=2, **opts)
    monkeypatch.setattr(device, "CPU_MAX_BATCH", 2)  # two jobs: the parts must be put back in order
    there = vis(str(snap), layers, tmp_path / "ray.png", columns=2, ray="auto", **opts)
    assert there.rendered == here.rendered == 4
    for key, path in here.tiles.items():
        assert there.tiles[key].read_bytes() == path.read_bytes()
    assert (tmp_path / "ray.png").read_bytes() == (tmp_path / "local.png").read_bytes()


@pytest.mark.slow
def test_gained_and_lost_tiles_of_two_snapshots_from_ray_equal_local_ones(tmp_path, reference, ray_instance):
    from featureshift.jobs.executors import render_tiles
    from featureshift.jobs.plan import pair_source

    a, b = (reference[0] / "snapshots" / f"{e:03d}.safetensors" for e in (0, 2))
    # Saved states: a worker receives both files' bytes and builds the pair itself.
    pair = pair_source(a, b, read_meta(a).checksum, read_meta(b).checksum)
    requests = [TileRequest(pair, pair.checksum, LAYER, c) for c in (0, 1)]
    made = {}
    for where in ("local", "auto"):
        cache = TileCache(tmp_path / where)
        for objective in ("gained", "lost"):
            settings = DEFAULT_SETTINGS.replace(objective=objective, steps=FAST["steps"], size=FAST["size"])
            plan = plan_jobs(requests, cache, settings=settings)
            report = render_tiles(plan, cache, ray=where, device="cpu", batch_size=FAST["batch_size"], quiet=True)
            assert (report.rendered, report.failed, report.unusable) == (2, {}, {})
            again = plan_jobs(requests, cache, settings=settings)
            assert (again.tiles, again.cached) == (0, 2)  # a second call renders nothing
        made[where] = {p.name: p.read_bytes() for p in sorted(cache.root.glob("*.png"))}
    assert len(made["local"]) == 4 and made["auto"] == made["local"]
    from featureshift.jobs.cache import read_tile_about

    headers = [read_tile_about(p) for p in (tmp_path / "auto").glob("*.png")]
    assert not any(h["no_response"] for h in headers)  # the first layer changed: every channel did
    assert {(h["before_checksum"], h["after_checksum"]) for h in headers} == {(pair.before_checksum,
                                                                               pair.after_checksum)}


@pytest.mark.slow
def test_groups_of_tiles_with_their_own_settings_render_on_ray_as_locally(tmp_path, reference, ray_instance):
    # The report's gained and lost renders (and its accentuations): one plan per set of settings,
    # all run by one executor.
    from featureshift.jobs.executors import render_groups
    from featureshift.jobs.plan import pair_source

    a, b = (reference[0] / "snapshots" / f"{e:03d}.safetensors" for e in (0, 2))
    pair = pair_source(a, b, read_meta(a).checksum, read_meta(b).checksum)
    requests = [TileRequest(pair, pair.checksum, LAYER, c, 2) for c in (0, 1)]
    groups = [(DEFAULT_SETTINGS.replace(objective=objective, steps=FAST["steps"], size=size), requests)
              for objective in ("gained", "lost") for size in (32, 48)]
    made = {}
    for where in ("local", "auto"):
        cache = TileCache(tmp_path / where)
        keys = render_groups(groups, cache, ray=where, device="cpu", batch_size=FAST["batch_size"], quiet=True)
        assert len({k for group in keys for k in group.values()}) == 8 and all(k in cache for g in keys for k in g.values())
        made[where] = {p.name: p.read_bytes() for p in sorted(cache.root.glob("*.png"))}
    assert len(made["local"]) == 8 and made["auto"] == made["local"]


@pytest.mark.slow
def test_compare_on_ray_sends_a_snapshot_as_its_file_and_a_named_network_as_a_module(tmp_path, threads,
                                                                                      ray_instance, monkeypatch):
    import featureshift.jobs.executors as executors
    from featureshift.commands.compare import compare
    from featureshift.jobs.plan import HeldNetwork, PairSource

    # The ImageNet network with one layer changed, against the network by name; outside a run,
    # the tiles are cached beside the sheet.
    model = open_network("squeezenet1_1", weights="imagenet").module
    with torch.no_grad():
        model.features[3].squeeze.weight.mul_(1.5)
    snap = tmp_path / "changed.safetensors"
    save_snapshot(model, snap, epoch=1)
    sent = []
    real = executors.source_data

    def recording(source):
        if not isinstance(source, PairSource):  # a pair's two parts come through here too
            sent.append(source)
        return real(source)

    monkeypatch.setattr(executors, "source_data", recording)
    sheets, caches = {}, {}
    for where in ("local", "auto"):
        out = tmp_path / where / "sheet.png"
        result = compare(str(snap), "squeezenet1_1", LAYER, channels="0", weights="imagenet", output=out,
                         diff=True, ray=where, **FAST)
        assert result.renders_a[0] is not None and result.renders_gained[0] is not None
        sheets[where] = out.read_bytes()
        caches[where] = {p.name: p.read_bytes() for p in sorted((tmp_path / where / "sheet_cache").glob("*.png"))}
    assert len(caches["local"]) == 5  # A, B, what channel 0 gained and lost, A again for the noise floor
    assert caches["auto"] == caches["local"] and sheets["auto"] == sheets["local"]
    # Ray got the snapshot as its file (the worker reads the bytes), the network built by name as a module
    assert {type(s).__name__ for s in sent} == {type(snap).__name__, HeldNetwork.__name__}
    assert all(s == snap for s in sent if not isinstance(s, HeldNetwork))
