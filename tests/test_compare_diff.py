"""featureshift compare --diff: what each channel gained and lost, through the job list and the tile cache."""
import copy

import numpy as np
import pytest
from click.testing import CliRunner

from featureshift.cli import main
from featureshift.commands.compare import compare
from featureshift.errors import FeatureshiftError
from featureshift.grid import NO_RESPONSE
from featureshift.jobs.cache import TileCache, read_tile_about
from featureshift.jobs.plan import TileRequest, hold_network, pair_source, plan_jobs
from featureshift.optvis.settings import DEFAULT_SETTINGS

from _fakerun import IMAGE_SIZE, LAYER, RENDER, shared_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos):
    return shared_run(tmp_path_factory, photos)


def test_diff_sheet_has_four_rows_and_its_gained_and_lost_tiles_are_cached(run, tmp_path, monkeypatch):
    import featureshift.optvis.engine as engine
    from featureshift.run import tile_cache_dir

    a, b = run / "snapshots/000.safetensors", run / "snapshots/001.safetensors"
    plain = compare(a, b, LAYER, channels="2,3", output=tmp_path / "plain.png", image_size=IMAGE_SIZE, quiet=True,
                    **RENDER)
    before = set(tile_cache_dir(run).glob("*.png"))
    first = compare(a, b, LAYER, channels="2,3", output=tmp_path / "diff.png", image_size=IMAGE_SIZE, quiet=True,
                    diff=True, **RENDER)
    new = set(tile_cache_dir(run).glob("*.png")) - before
    assert len(new) == 4  # gained and lost of two channels, in the run's tile cache; A's and B's were there
    headers = [read_tile_about(p) for p in new]
    assert sorted(h["objective"] for h in headers) == ["gained", "gained", "lost", "lost"]
    assert {h["before_checksum"] for h in headers} != {h["after_checksum"] for h in headers}
    # Channel 3 was re-initialized at epoch 1: it gained something; channel 2 never changed, so the two
    # networks cancel and there is nothing to find.
    assert isinstance(first.renders_gained[1], np.ndarray) and first.renders_lost[1] is not None
    assert first.renders_gained[0] is NO_RESPONSE and first.renders_lost[0] is NO_RESPONSE
    # The before/after rows and the measures are those of a compare without --diff.
    assert first.rows == plain.rows
    assert all(np.array_equal(x, y) for x, y in zip(first.renders_a + first.renders_b,
                                                    plain.renders_a + plain.renders_b))
    assert first.sheet.height > plain.sheet.height * 1.6  # two more rows of tiles

    calls = []
    real = engine.render
    monkeypatch.setattr(engine, "render", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = compare(a, b, LAYER, channels="2,3", output=tmp_path / "again.png", image_size=IMAGE_SIZE, quiet=True,
                    diff=True, **RENDER)
    assert calls == []  # every tile, gained and lost included, came from the cache
    assert np.array_equal(again.renders_gained[1], first.renders_gained[1])
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "diff.png").read_bytes()


def test_a_pair_is_named_in_the_cache_by_both_networks(tmp_path):
    import torch

    from featureshift import open_network

    torch.manual_seed(0)
    a = open_network("squeezenet1_1", weights="random", num_classes=3).module
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    with torch.no_grad():
        b.features[3].squeeze.weight[0].add_(1.0)
        c.features[3].squeeze.weight[1].add_(1.0)
    held = {name: hold_network(m) for name, m in (("a", a), ("b", b), ("c", c))}
    settings = DEFAULT_SETTINGS.replace(steps=2, size=32)
    cache = TileCache(tmp_path)

    def key(before: str, after: str, objective: str = "gained") -> str:
        x, y = held[before], held[after]
        pair = pair_source(x, y, x.checksum, y.checksum)
        request = TileRequest(pair, pair.checksum, LAYER, 3)
        return plan_jobs([request], cache, settings=settings.replace(objective=objective)).keys[request]

    base = key("a", "b")
    assert key("c", "b") != base  # the network before changed
    assert key("a", "c") != base  # the network after changed
    assert key("b", "a") != base  # the same two, the other way round
    assert key("a", "b", "lost") != base
    assert key("a", "b") == base and hold_network(copy.deepcopy(b)).checksum == held["b"].checksum
    # Saved or held, the same two networks are the same tiles: only their checksums name them.
    saved = pair_source(tmp_path / "a.safetensors", tmp_path / "b.safetensors", held["a"].checksum,
                        held["b"].checksum)
    assert saved.checksum == pair_source(held["a"], held["b"], held["a"].checksum, held["b"].checksum).checksum


def test_diff_refuses_the_output_layer_in_one_paragraph(run):
    snap = run / "snapshots/001.safetensors"
    with pytest.raises(FeatureshiftError, match="inner layers"):
        compare(snap, snap, "logits", diff=True, quiet=True)
    r = CliRunner().invoke(main, ["compare", str(snap), str(snap), "--layer", "logits", "--diff", "-q"])
    assert r.exit_code == 2 and "inner layers" in r.output and "Traceback" not in r.output


def test_compare_help_shows_the_diff_option_and_an_example():
    r = CliRunner().invoke(main, ["compare", "--help"])
    assert r.exit_code == 0
    assert "--diff" in r.output and "gained" in r.output and "--diff -o gained-lost.png" in r.output


def test_vis_with_a_gained_objective_says_it_needs_two_networks_and_which_command_has_them(tmp_path):
    r = CliRunner().invoke(main, ["vis", "squeezenet1_1", LAYER, "--weights", "random", "--objective", "gained",
                                  "--steps", "1", "--size", "32", "-o", str(tmp_path / "v.png"), "-q"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "compares two networks" in r.output and "featureshift compare A B --layer L --diff" in r.output
    assert not (tmp_path / "v.png").exists()


def test_cli_diff_writes_the_sheet_quietly(run, tmp_path):
    out = tmp_path / "d.png"
    r = CliRunner().invoke(main, ["compare", str(run / "snapshots/000.safetensors"),
                                  str(run / "snapshots/001.safetensors"), "--layer", LAYER, "--channels", "2,3",
                                  "--diff", "--steps", str(RENDER["steps"]), "--size", str(RENDER["size"]),
                                  "--image-size", str(IMAGE_SIZE), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert "most changed by weight" in r.output and f"sheet: {out}" in r.output
    from PIL import Image

    with Image.open(out) as im:
        assert im.height > 4 * 112  # four rows of renders, enlarged to at least 112 px
