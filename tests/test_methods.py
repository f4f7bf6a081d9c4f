"""The render methods besides Lucid's: MACO and feature accentuation.

Tiny canvases and few steps throughout; the quality proofs use the real offline
ImageNet SqueezeNet and real photos from scikit-image.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _measure import channel_means, recognized
from featureshift import FeatureshiftError, open_network
from featureshift.optvis.accent import load_photo
from featureshift.optvis.engine import render
from featureshift.optvis.maco import (PhaseImage, dataset_spectrum, image_spectrum, load_spectrum,
                                      sample_photo_spectrum, save_spectrum, spectrum_at)
from featureshift.optvis.param import COLOR_CORRELATION
from featureshift.optvis.settings import RenderSettings

MID = "features.9"

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def squeeze():
    return open_network("squeezenet1_1", weights="imagenet").module


@pytest.fixture(scope="module")
def chelsea(tmp_path_factory):
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)
    return path


# --- settings ---------------------------------------------------------------------------

def test_lucid_key_leaves_out_the_other_methods_settings():
    key = RenderSettings().key_fields()
    assert not {"method", "spectrum", "crops", "crop_scale", "noise", "image", "accent_weight"} & set(key)
    assert RenderSettings(crops=9, accent_weight=7.0).key_fields() == key  # unread by Lucid
    assert "lucid" not in RenderSettings().describe() and "method" not in RenderSettings().describe()


def test_method_settings_are_in_the_key_and_the_description(tmp_path):
    maco = RenderSettings(method="maco")
    key = maco.key_fields()
    assert key["method"] == "maco" and key["crops"] == 4 and "image" not in key
    assert RenderSettings(method="maco", crops=2).key_fields() != key
    assert maco.describe().startswith(f"maco, channel, {maco.steps} steps")

    spectrum = save_spectrum(np.ones((3, 8, 5), np.float32), tmp_path / "s.npy")
    with_file = RenderSettings(method="maco", spectrum=str(spectrum)).key_fields()
    save_spectrum(np.full((3, 8, 5), 2, np.float32), spectrum)  # same name, new content: a new key
    assert RenderSettings(method="maco", spectrum=str(spectrum)).key_fields() != with_file

    photo = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(photo)
    accent = RenderSettings(method="accent", image=str(photo), accent_weight=5.0)
    assert accent.key_fields()["image"][0].startswith("p.png:") and "crops" not in accent.key_fields()
    assert "accent" in accent.describe() and "p.png" in accent.describe() and "accent_weight 5.0" in accent.describe()


def test_unknown_method_and_missing_image(squeeze):
    with pytest.raises(FeatureshiftError, match="Unknown method 'deepdream'.*lucid, maco, accent"):
        render(squeeze, [(MID, 0)], steps=1, size=48, method="deepdream", quiet=True)
    with pytest.raises(FeatureshiftError, match="--image"):
        render(squeeze, [(MID, 0)], steps=1, size=48, method="accent", quiet=True)


# --- MACO -------------------------------------------------------------------------------

@pytest.mark.slow  # test-fast stays under a minute: trains, spawns or builds a large network
def test_shipped_spectrum_is_the_sample_photos_spectrum():
    shipped, made = load_spectrum(), sample_photo_spectrum()
    assert shipped.shape == (3, 256, 129)
    # stored as float16 logarithms; the DC term (unused) is left out
    assert np.allclose(np.log(shipped)[:, 1:], np.log(made)[:, 1:], atol=0.01)


def test_dataset_spectrum_from_image_files(tmp_path, squeeze):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(paths[-1])
    spectrum = dataset_spectrum(paths, size=32)
    assert spectrum.shape == (3, 32, 17) and np.isfinite(spectrum).all()
    saved = save_spectrum(spectrum, tmp_path / "run" / "spectrum.npy")
    assert np.array_equal(load_spectrum(saved), spectrum)
    result = render(squeeze, [("features.3", 0)], steps=2, size=32, method="maco", spectrum=str(saved), quiet=True)
    assert result.settings["method"] == "maco" and result.settings["spectrum"][0].startswith("spectrum.npy:")
    with pytest.raises(FeatureshiftError, match="not a MACO spectrum"):
        save_spectrum(np.ones((3, 8, 8)), tmp_path / "bad.npy")


def test_only_the_phase_moves():
    """Every image has the fixed magnitude, up to one overall scale (the standardization)."""
    magnitude = spectrum_at(load_spectrum(), 32)
    images = PhaseImage(magnitude, 32)(torch.randn(2, 3, 32, 17))
    x = torch.logit(images.double())
    x = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(COLOR_CORRELATION.double()), x)
    # columns 0 and 16 hold bins the inverse FFT makes symmetric, whatever phase they were given
    ratio = torch.fft.rfft2(x).abs()[..., 1:16] / magnitude[..., 1:16].double()
    spread = ratio.flatten(1).std(1) / ratio.flatten(1).mean(1)
    assert (spread < 1e-3).all(), spread


def test_image_spectrum_of_a_pattern():
    stripes = np.zeros((1, 16, 16, 3), np.float32)
    stripes[:, :, ::2] = 1  # vertical stripes: all energy at the highest horizontal frequency
    s = image_spectrum(stripes)
    total = s.sum(0)
    assert s.shape == (3, 16, 9) and np.unravel_index(total.argmax(), total.shape) == (0, 8)


def test_maco_alone_or_in_a_batch_gives_the_same_image(squeeze):
    both = render(squeeze, [(MID, 3), (MID, 5)], steps=3, size=48, method="maco", crops=2, quiet=True)
    alone = render(squeeze, [(MID, 5)], steps=3, size=48, method="maco", crops=2, quiet=True)
    assert np.abs(both.images[1] - alone.images[0]).mean() < 0.02  # only kernel rounding noise (see test_render)
    assert not np.allclose(both.images[0], both.images[1])
    again = render(squeeze, [(MID, 3), (MID, 5)], steps=3, size=48, method="maco", crops=2, quiet=True)
    assert np.array_equal(both.images, again.images)


def test_maco_raises_the_channel(squeeze):
    start = render(squeeze, [(MID, 7)], steps=0, size=64, method="maco", quiet=True)
    end = render(squeeze, [(MID, 7)], steps=24, size=64, method="maco", crops=2, quiet=True)
    assert end.scores[0] > 2 * max(start.scores[0], 0.1)


@pytest.mark.slow
def test_maco_class_renders_are_classified_as_their_class_at_least_4_times_in_5(squeeze):
    classes = [1, 9, 130, 291]  # goldfish, ostrich, flamingo, lion
    assert recognized(squeeze, classes, range(5), steps=64, size=96, method="maco") >= 16


# --- feature accentuation ---------------------------------------------------------------

def test_accent_starts_at_the_photo(squeeze, chelsea):
    result = render(squeeze, [(MID, 0)], steps=0, size=48, method="accent", image=str(chelsea), quiet=True)
    assert np.abs(result.images[0] - load_photo(chelsea, 48)).max() <= 0.0101  # pixels kept inside (0, 1)


def test_accent_stays_close_and_doubles_the_channel(squeeze, chelsea):
    """SSIM (skimage.metrics.structural_similarity, RGB, data range 1) at least 0.6 while
    the channel's spatial mean at least doubles."""
    from skimage.metrics import structural_similarity

    size = 64
    photo = load_photo(chelsea, size)
    before = channel_means(squeeze, photo[None], MID)[0]
    channels = [int(c) for c in torch.argsort(before)[[150, 300]]]  # weakly and strongly excited
    result = render(squeeze, [(MID, c) for c in channels], steps=32, size=size, method="accent",
                    image=str(chelsea), quiet=True)
    after = channel_means(squeeze, result.images, MID)
    for i, c in enumerate(channels):
        assert after[i, c] >= 2 * before[c], (c, float(before[c]), float(after[i, c]))
        assert structural_similarity(photo, result.images[i], channel_axis=2, data_range=1.0) >= 0.6, c


def test_accent_weight_trades_closeness_for_activation(squeeze, chelsea):
    photo = load_photo(chelsea, 48)
    channel = int(channel_means(squeeze, photo[None], MID)[0].argmax())
    loose, tight = (render(squeeze, [(MID, channel)], steps=16, size=48, method="accent", image=str(chelsea),
                           accent_weight=w, quiet=True) for w in (1.0, 10.0))
    assert np.abs(tight.images[0] - photo).mean() < np.abs(loose.images[0] - photo).mean()
    assert tight.scores[0] < loose.scores[0]


def test_accent_one_image_per_target(squeeze, chelsea, tmp_path):
    from skimage import data

    coffee = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(coffee)
    result = render(squeeze, [(MID, 1), (MID, 1)], steps=0, size=48, method="accent",
                    image=(str(chelsea), str(coffee)), quiet=True)
    assert np.abs(result.images[1] - load_photo(coffee, 48)).max() <= 0.0101
    with pytest.raises(FeatureshiftError, match="one per target"):
        render(squeeze, [(MID, 1)] * 3, steps=0, size=48, method="accent", image=(str(chelsea), str(coffee)),
               quiet=True)


def test_maco_on_a_run_takes_the_spectrum_of_its_own_training_images(tmp_path, photos):
    from _fakerun import LAYER, make_run

    from featureshift.commands.timeline import timeline
    from featureshift.jobs.cache import read_tile

    run = make_run(tmp_path, photos, epochs=(0, 1))
    result = timeline(run, LAYER, 1, method="maco", steps=2, size=32, crops=1, quiet=True, device="cpu")
    spectrum = run / "cache" / "maco-spectrum-32.npz"
    assert spectrum.exists()
    _, about = read_tile(next(iter(result.tiles.values())))
    assert "maco-spectrum-32.npz" in json.dumps(about)


def test_timeline_accentuates_the_same_photo_at_every_snapshot(tmp_path, photos):
    """Each snapshot's tile stays close to the photo: its mean absolute difference to the
    photo's 32 px square is well below that of a Lucid render (which starts from noise)."""
    from _fakerun import LAYER, make_run

    from featureshift.commands.timeline import timeline
    from featureshift.jobs.cache import read_tile

    run = make_run(tmp_path, photos, epochs=(0, 1))
    photo = tmp_path / "chelsea.png"
    photos["chelsea"].save(photo)
    square = load_photo(photo, 32)
    accent = timeline(run, LAYER, [2, 3], method="accent", image=str(photo), steps=4, size=32, quiet=True,
                      device="cpu")
    assert accent.epochs == [0, 1] and sorted(accent.rows[LAYER]) == [0, 1]
    assert all(p.is_file() for p in accent.rows[LAYER].values())
    lucid = timeline(run, LAYER, [2, 3], steps=4, size=32, quiet=True, device="cpu")
    for where, path in accent.tiles.items():
        image, about = read_tile(path)
        assert about["method"] == "accent" and Path(about["image"]).name == "chelsea.png"
        near = np.abs(np.asarray(image, np.float32) / 255 - square).mean()
        far = np.abs(np.asarray(read_tile(lucid.tiles[where])[0], np.float32) / 255 - square).mean()
        assert near < 0.1 and near < far / 2, (where, near, far)
    changed = [np.asarray(read_tile(accent.tiles[(LAYER, e, 3)])[0]) for e in (0, 1)]  # re-initialized at 1
    assert not np.array_equal(*changed)
    again = timeline(run, LAYER, [2, 3], method="accent", image=str(photo), steps=4, size=32, quiet=True,
                     device="cpu")
    assert again.rendered == 0 and again.cached == 4


def test_photos_of_one_snapshot_are_accentuated_in_one_batch(squeeze, chelsea, tmp_path):
    # The report accentuates each channel's own top example: one job per photo would be batches
    # of one. batch_photos makes one job per snapshot, keys and each tile's own photo kept.
    from skimage import data

    from featureshift.jobs.executors import render_job, tile_about
    from featureshift.jobs.plan import TileJob, batch_photos

    coffee = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(coffee)
    s = RenderSettings(method="accent", steps=4, size=48)
    jobs = [TileJob(Path("a.safetensors"), "c", ((MID, 1), (MID, 2)), ("k1", "k2"), s.replace(image=str(chelsea))),
            TileJob(Path("a.safetensors"), "c", ((MID, 3),), ("k3",), s.replace(image=str(coffee))),
            TileJob(Path("b.safetensors"), "d", ((MID, 3),), ("k4",), s.replace(image=str(coffee)))]
    merged = batch_photos(jobs)
    assert [j.keys for j in merged] == [("k1", "k2", "k3"), ("k4",)]
    assert merged[0].settings.image == (str(chelsea), str(chelsea), str(coffee))
    assert merged[1].settings.image == str(coffee)

    together = render_job(squeeze, merged[0])
    alone = render_job(squeeze, jobs[1])
    assert np.abs(together.images[2].astype(float) - alone.images[0]).mean() < 2  # uint8 pixels, 4 steps
    about = tile_about(merged[0], 2, together)
    assert about["image"] == tile_about(jobs[1], 0, alone)["image"]  # the tile's own photo, as its key has
