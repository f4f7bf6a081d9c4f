import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import featureshift
from featureshift import FeatureshiftError, open_network, save_snapshot
from featureshift.cli import main
from featureshift.grid import MISSING_FILL
from featureshift.commands.timeline import SnapshotVisualizer
from featureshift.commands.timeline import TimelineResult, timeline
from featureshift.jobs.cache import read_tile
from featureshift.run import select_snapshots
from featureshift.selection import parse_indices

LAYER = "features.3.squeeze"  # 16 channels, early in the network: renders stay cheap
FAST = dict(steps=6, size=32, batch_size=16, quiet=True)  # a fixed batch skips the memory probe
TILE = 32
PAD = 2


def write_snapshot(run, model, epoch, acc=None):
    with torch.no_grad():  # every epoch gets its own weights, as training would give
        model.features[0].weight.add_(0.05 * torch.randn_like(model.features[0].weight))
    metrics = {"val_acc": acc if acc is not None else 0.3 + epoch / 50}
    return save_snapshot(model, run / "snapshots" / f"{epoch:03d}.safetensors", epoch=epoch, metrics=metrics)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture
def model():
    torch.manual_seed(0)
    return open_network("squeezenet1_1", weights="random", num_classes=3).module


def make_run(tmp_path, model, epochs):
    run = tmp_path / "run"
    for e in epochs:
        write_snapshot(run, model, e)
    return run


def tile_at(merged, row, col):
    x, y = PAD + col * (TILE + PAD), PAD + row * (TILE + PAD)
    return np.asarray(merged)[y:y + TILE, x:x + TILE]


def cache_files(run):
    return sorted((run / "timeline" / "cache").glob("*.png"))


def test_rows_follow_training_order_and_are_labeled(tmp_path, model):
    run = tmp_path / "run"
    for e in (10, 0, 2):  # written out of order, and 10 sorts before 2 as text
        write_snapshot(run, model, e)
    res = timeline(run, LAYER, 2, labels=False, **FAST)
    assert res.epochs == [0, 2, 10]
    merged = Image.open(res.merged[LAYER]).convert("RGB")
    assert merged.size == (PAD + 2 * (TILE + PAD), PAD + 3 * (TILE + PAD))
    for row, epoch in enumerate([0, 2, 10]):
        for col in range(2):
            want = np.asarray(read_tile(res.tiles[(LAYER, epoch, col)])[0])
            assert np.array_equal(tile_at(merged, row, col), want), (row, epoch, col)
    assert not np.array_equal(tile_at(merged, 0, 0), tile_at(merged, 2, 0)), "snapshots rendered alike"
    assert sorted(res.rows[LAYER]) == [0, 2, 10] and all(p.is_file() for p in res.rows[LAYER].values())
    gif = Image.open(res.gifs[LAYER][1])
    assert gif.n_frames == 3

    labeled = timeline(run, LAYER, 2, **FAST)
    assert labeled.rendered == 0  # labels change the picture, not the tiles
    img = Image.open(labeled.merged[LAYER]).convert("RGB")
    assert img.width > merged.width and img.height > merged.height
    from featureshift.commands.timeline import read_rows, row_label

    labels = [row_label(r) for r in read_rows([(e, run / "snapshots" / f"{e:03d}.safetensors")
                                                for e in (0, 2, 10)])]
    assert labels == ["epoch 0\nval 30.0%", "epoch 2\nval 34.0%", "epoch 10\nval 50.0%"]


@pytest.mark.slow
def test_cache_rerun_renders_nothing_and_new_snapshot_one_row(tmp_path, model):
    run = make_run(tmp_path, model, [0, 1, 2])
    first = timeline(run, LAYER, "0,5", **FAST)
    assert (first.rendered, first.cached) == (6, 0)
    merged_before = Image.open(first.merged[LAYER]).tobytes()

    outputs = [first.merged[LAYER], *first.rows[LAYER].values(), *first.gifs[LAYER].values()]
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    again = timeline(run, LAYER, "0,5", **FAST)
    assert (again.rendered, again.cached) == (0, 6)
    assert Image.open(again.merged[LAYER]).tobytes() == merged_before
    assert {p: p.stat().st_mtime_ns for p in outputs} == stamps  # nothing changed, nothing rewritten

    write_snapshot(run, model, 3)
    grown = timeline(run, LAYER, "0,5", **FAST)
    assert (grown.rendered, grown.cached) == (2, 6)
    assert grown.epochs == [0, 1, 2, 3]
    assert all(p.stat().st_mtime_ns == stamps[p] for p in first.rows[LAYER].values())  # old rows kept
    assert grown.merged[LAYER].stat().st_mtime_ns != stamps[first.merged[LAYER]]
    assert Image.open(grown.gifs[LAYER][5]).n_frames == 4

    # A changed setting re-renders only what it affects; another channel renders only that column.
    wider = timeline(run, LAYER, "0,5,7", snapshots="2-3", **FAST)
    assert (wider.rendered, wider.cached) == (2, 4)
    reseeded = timeline(run, LAYER, "0", seed=1, snapshots="0-1", **FAST)
    assert (reseeded.rendered, reseeded.cached) == (2, 0)
    forced = timeline(run, LAYER, "0,5", snapshots=[3], force=True, **FAST)
    assert (forced.rendered, forced.cached) == (2, 0)


def test_interrupted_timeline_resumes_where_it_stopped(tmp_path, model):
    run = make_run(tmp_path, model, [0, 1, 2, 3])
    seen = []

    def stop_after_five(layer, epoch, channel, path):
        seen.append((epoch, channel))
        assert path.is_file()  # saved before we are told
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        timeline(run, LAYER, 2, on_tile=stop_after_five, **FAST)
    done = len(cache_files(run))
    assert 5 <= done < 8
    resumed = timeline(run, LAYER, 2, **FAST)
    assert (resumed.rendered, resumed.cached) == (8 - done, done)
    assert len(resumed.tiles) == 8


def test_snapshot_selection(tmp_path, model):
    entries = [(e, tmp_path / f"{e:03d}.safetensors") for e in (0, 1, 2, 5, 10)]
    pick = lambda **kw: [e for e, _ in select_snapshots(entries, **kw)]  # noqa: E731
    assert pick() == [0, 1, 2, 5, 10]
    assert pick(snapshots="0,2-5") == [0, 2, 5]  # a range takes the snapshots inside it
    assert pick(snapshots=[10, 0]) == [0, 10]  # always in training order
    assert pick(every=5) == [0, 5, 10]
    with pytest.raises(FeatureshiftError, match="no snapshot for epoch.*3.*0, 1, 2, 5, 10"):
        pick(snapshots="0,3")
    assert pick(every=7) == [0]  # before training always counts
    with pytest.raises(FeatureshiftError, match="multiple of 7"):
        select_snapshots(entries[1:], every=7)
    with pytest.raises(FeatureshiftError, match="not both"):
        pick(snapshots="0", every=2)
    assert parse_indices("0,1,5-7,1") == [0, 1, 5, 6, 7]
    with pytest.raises(FeatureshiftError, match="not a valid"):
        parse_indices("a-b")

    run = make_run(tmp_path, model, [0, 1, 2])
    assert timeline(run, LAYER, 1, snapshots="1-2", **FAST).epochs == [1, 2]


def test_corrupt_snapshot_is_reported_and_its_row_marked_missing(tmp_path, model):
    run = make_run(tmp_path, model, [0, 1, 2, 3])
    (run / "snapshots" / "001.safetensors").write_bytes(b"\x00" * 20)  # truncated: no header
    damaged = run / "snapshots" / "002.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-100:] = bytes(100)  # readable metadata, weights that fail their checksum
    damaged.write_bytes(bytes(data))

    res = timeline(run, LAYER, 2, labels=False, **FAST)
    assert set(res.missing) == {1, 2} and "001.safetensors" in res.missing[1] and "checksum" in res.missing[2]
    assert res.rendered == 4 and res.epochs == [0, 1, 2, 3]
    merged = Image.open(res.merged[LAYER]).convert("RGB")
    assert merged.height == PAD + 4 * (TILE + PAD)
    for row in (1, 2):
        assert (tile_at(merged, row, 0) == MISSING_FILL).all(axis=-1).mean() > 0.5
    for row in (0, 3):
        assert (tile_at(merged, row, 0) == MISSING_FILL).all(axis=-1).mean() < 0.1
    assert sorted(res.rows[LAYER]) == [0, 3]
    message = res.unreadable()  # one paragraph naming both files, and how to leave them out
    assert "2 snapshots could not be read" in message and "--snapshots 0,3" in message and "\n" not in message
    assert "001.safetensors" in message and "002.safetensors" in message
    assert timeline(run, LAYER, 2, snapshots="0,3", **FAST).unreadable() is None


def test_epochs_are_given_back_as_ranges_for_snapshots():
    from featureshift.commands.timeline import epochs_spec

    assert epochs_spec([0, 2, 3, 4, 7, 9, 10]) == "0,2-4,7,9-10"
    assert epochs_spec([5]) == "5" and epochs_spec([]) == ""
    run_epochs = [0, 2, 3, 4, 7, 9, 10]
    entries = [(e, e) for e in run_epochs]
    assert [e for e, _ in select_snapshots(entries, epochs_spec(run_epochs))] == run_epochs


def test_bad_runs_give_clear_errors(tmp_path, model):
    with pytest.raises(FeatureshiftError, match="does not exist"):
        timeline(tmp_path / "nowhere", LAYER, 2, **FAST)
    (tmp_path / "empty" / "snapshots").mkdir(parents=True)
    with pytest.raises(FeatureshiftError, match="no snapshots"):
        timeline(tmp_path / "empty", LAYER, 2, **FAST)

    run = make_run(tmp_path, model, [0, 1])
    with pytest.raises(FeatureshiftError, match="features.3.squeez"):  # did you mean
        timeline(run, "features.3.squeez", 2, **FAST)
    with pytest.raises(FeatureshiftError, match="16 channels"):
        timeline(run, LAYER, "3,40", **FAST)

    # Another architecture that has the layer too: the timeline would compare different networks.
    other = open_network("squeezenet1_0", weights="random", num_classes=3).module
    save_snapshot(other, run / "snapshots" / "002.safetensors", epoch=2)
    with pytest.raises(FeatureshiftError, match="different architectures.*squeezenet1_0.*002"):
        timeline(run, LAYER, 2, **FAST)
    # One without the layer: the error names the layer and the snapshot.
    resnet = open_network("resnet18", weights="random", num_classes=3).module
    save_snapshot(resnet, run / "snapshots" / "002.safetensors", epoch=2)
    with pytest.raises(FeatureshiftError, match=r"Layer 'features.3.squeeze' is missing from 1 .*002.safetensors"):
        timeline(run, LAYER, 2, **FAST)
    assert not (run / "timeline" / "cache").exists() or not cache_files(run)  # nothing half done


def test_cli_timeline(tmp_path, model):
    run = make_run(tmp_path, model, [0, 1])
    cli = CliRunner()
    args = ["timeline", str(run), "--layer", LAYER, "--channels", "0-1", "--steps", "6", "--size", "32",
            "--batch-size", "16", "--quiet"]
    out = cli.invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "4 tile(s) rendered" in out.output and (run / "timeline" / LAYER / "merged.png").is_file()
    out = cli.invoke(main, args + ["--no-labels"])
    assert out.exit_code == 0 and "0 tile(s) rendered, 4 from the cache" in out.output
    out = cli.invoke(main, ["timeline", str(tmp_path / "nowhere"), "--layer", LAYER])
    assert out.exit_code == 2 and "does not exist" in out.output and "Traceback" not in out.output
    out = cli.invoke(main, args + ["--columns", "3"])
    assert out.exit_code == 2 and "not both" in out.output


def test_visualizer_hook_keeps_merged_current(tmp_path, model):
    run = tmp_path / "run"
    hook = SnapshotVisualizer(LAYER, 2, device="cpu", **FAST)
    assert not hook.background  # on a CPU it renders in between epochs
    for epoch in (0, 1):
        meta = write_snapshot(run, model, epoch)
        hook(epoch, meta.path)
        assert hook.result.epochs == list(range(epoch + 1)) and hook.result.rendered == 2
    merged = Image.open(run / "timeline" / LAYER / "merged.png")
    assert merged.height > 2 * TILE
    assert hook.close() is hook.result


@pytest.mark.slow  # test-fast stays under a minute; a cheaper test covers the same path
def test_visualizer_in_background_renders_everything_by_close(tmp_path, model):
    run = tmp_path / "run"
    hook = SnapshotVisualizer(LAYER, 1, device="cpu", background=True, **FAST)
    for epoch in (0, 1, 2):
        hook(epoch, write_snapshot(run, model, epoch).path)
    result = hook.close()
    assert result.epochs == [0, 1, 2] and len(result.tiles) == 3


def test_public_api_export():
    assert featureshift.timeline is timeline
    assert featureshift.TimelineResult is TimelineResult
    assert callable(featureshift.merge)


def test_one_render_call_per_snapshot_with_all_its_targets(tmp_path, model, monkeypatch):
    import featureshift.optvis.engine as engine

    calls = []
    real = engine.render

    def counting(net, targets, **kw):
        calls.append(list(targets))
        return real(net, targets, **kw)

    monkeypatch.setattr(engine, "render", counting)
    run = make_run(tmp_path, model, [0, 1])
    res = timeline(run, [LAYER, "logits"], 2, **FAST)
    assert calls == [[(LAYER, 0), (LAYER, 1), ("logits", 0), ("logits", 1)]] * 2
    assert set(res.merged) == {LAYER, "logits"} and res.channels["logits"] == [0, 1]
    assert (run / "timeline" / "logits" / "merged.png").is_file()


@pytest.mark.slow  # test-fast stays under a minute: trains, spawns or builds a large network
def test_train_visualize_renders_each_snapshot_and_resume_renders_the_rest(tmp_path):
    from featureshift.data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", per_class=4, size=32)
    out = tmp_path / "run"
    base = ["train", "--data", str(data), "--model", "squeezenet1_1", "--weights", "imagenet", "--batch-size", "8",
            "--image-size", "48", "--workers", "0", "--quiet", "--visualize", LAYER, "--columns", "2",
            "--vis-steps", "6", "--vis-size", "32"]
    cli = CliRunner()
    res = cli.invoke(main, base + ["--epochs", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    merged = out / "timeline" / LAYER / "merged.png"
    assert merged.is_file() and sorted(p.name for p in merged.parent.glob("0*.png")) == ["000.png", "001.png"]
    assert len(cache_files(out)) == 4

    res = cli.invoke(main, ["train", "--resume", str(out), "--epochs", "2", "--quiet", "--visualize", LAYER,
                            "--columns", "2", "--vis-steps", "6", "--vis-size", "32", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert len(cache_files(out)) == 6  # only the new snapshot's row was rendered
    assert sorted(p.name for p in merged.parent.glob("0*.png")) == ["000.png", "001.png", "002.png"]

    res = cli.invoke(main, base + ["--epochs", "1", "--out", str(tmp_path / "bad"), "--visualize", "nope"])
    assert res.exit_code == 2 and "'nope' is not a layer" in res.output  # stops at epoch 0, not at the end
