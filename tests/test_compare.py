"""featureshift compare: the before/after sheet, the ranking, and its errors."""
import numpy as np
import pytest
from click.testing import CliRunner

from featureshift.cli import main
from featureshift.commands.compare import compare
from featureshift.errors import FeatureshiftError

from _fakerun import IMAGE_SIZE, LAYER, RENDER, shared_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos):
    return shared_run(tmp_path_factory, photos)


def test_most_changed_channels_of_two_snapshots(run, tmp_path):
    a, b = run / "snapshots/000.safetensors", run / "snapshots/002.safetensors"
    out = tmp_path / "sheet.png"
    result = compare(a, b, LAYER, most_changed=2, by="weight", output=out, image_size=IMAGE_SIZE, quiet=True,
                     **RENDER)
    assert set(result.channels) == {3, 5}  # exactly the two re-initialized channels
    assert result.ranked()[0]["channel"] in (3, 5)
    assert all(r["weight_change"] == 0 for r in result.rows if r["channel"] not in (3, 5))
    # Correlation comes from the run's own validation images, found from the snapshot's folder.
    assert result.probe_images == 12 and result.cka < 1
    assert result.rows[3]["correlation"] < 0.9 and result.rows[2]["correlation"] == pytest.approx(1.0)
    assert result.rows[3]["drift"] > 0
    from PIL import Image

    with Image.open(out) as im:
        # two rows of renders (enlarged to at least 112 px) under labels
        assert im.height > 2 * 112 and im.width > 2 * 112
    text = result.table(3)
    most = text.split("least changed")[0]
    assert "most changed by weight" in most and " 3 " in most and " 5 " in most


@pytest.mark.slow  # test-fast stays under a minute; a cheaper test covers the same path
def test_cli_sheet_and_table(run, tmp_path):
    out = tmp_path / "c.png"
    r = CliRunner().invoke(main, ["compare", str(run / "snapshots/000.safetensors"), str(run / "snapshots/001.safetensors"),
                                  "--layer", LAYER, "--channels", "2,3", "--steps", str(RENDER["steps"]),
                                  "--size", str(RENDER["size"]), "--image-size", str(IMAGE_SIZE), "-o", str(out),
                                  "--rows", "2", "-q"])
    assert r.exit_code == 0, r.output
    assert out.is_file()
    assert "most changed by weight" in r.output and "least changed by weight" in r.output
    first = r.output.split("most changed by weight:")[1].splitlines()[2].split()
    assert first[0] == "3"  # the re-initialized channel heads the table


def test_different_architectures_and_bad_choices_are_clear_errors(run, tmp_path):
    snap = str(run / "snapshots/001.safetensors")
    # SqueezeNet 1.0 against a 1.1 snapshot: another architecture that is quick to build
    r = CliRunner().invoke(main, ["compare", "squeezenet1_0", snap, "--weights", "random", "--layer", "features.3",
                                  "-q"])
    assert r.exit_code == 2
    assert "different architectures" in r.output and "Traceback" not in r.output
    with pytest.raises(FeatureshiftError, match="not a layer"):
        compare(snap, snap, "features.99", quiet=True)
    with pytest.raises(FeatureshiftError, match="needs probe images"):
        compare("squeezenet1_1", "squeezenet1_1", LAYER, weights="random", by="correlation", most_changed=2,
                quiet=True)
    with pytest.raises(FeatureshiftError, match="one of"):
        compare(snap, snap, LAYER, columns=2, channels="1", quiet=True)
    with pytest.raises(FeatureshiftError, match="ending in .png"):
        compare(snap, snap, LAYER, output=tmp_path / "sheet.txt", quiet=True)
    with pytest.raises(FeatureshiftError, match="does not exist"):
        compare(snap, snap, LAYER, probe=tmp_path / "missing", quiet=True)


def test_compare_caches_its_renders_in_the_run_or_beside_the_sheet(run, tmp_path, monkeypatch):
    import featureshift.optvis.engine as engine
    from featureshift.run import tile_cache_dir

    a, b = run / "snapshots/000.safetensors", run / "snapshots/001.safetensors"
    first = compare(a, b, LAYER, channels="6,7", output=tmp_path / "s.png", image_size=IMAGE_SIZE, quiet=True,
                    **RENDER)
    assert not (tmp_path / "s_cache").exists()  # snapshots of a run: the run's tile cache
    assert len(list(tile_cache_dir(run).glob("*.png"))) >= 2
    calls = []
    real = engine.render
    monkeypatch.setattr(engine, "render", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = compare(a, b, LAYER, channels="6,7", output=tmp_path / "t.png", image_size=IMAGE_SIZE, quiet=True,
                    **RENDER)
    assert calls == []  # every render came from the cache
    assert all(np.array_equal(x, y) for x, y in zip(first.renders_a + first.renders_b,
                                                    again.renders_a + again.renders_b))
    assert again.rows[6] == first.rows[6]
    # Networks of no run (a model name): a cache beside the sheet.
    compare("squeezenet1_1", b, LAYER, channels="6", output=tmp_path / "u.png", image_size=IMAGE_SIZE, quiet=True,
            floor=False, **RENDER)
    assert len(calls) == 1 and len(list((tmp_path / "u_cache").glob("*.png"))) == 1
    # and the second render of A for the noise floor, cached beside the first
    compare("squeezenet1_1", b, LAYER, channels="6", output=tmp_path / "u.png", image_size=IMAGE_SIZE, quiet=True,
            **RENDER)
    assert len(calls) == 2 and len(list((tmp_path / "u_cache").glob("*.png"))) == 2
