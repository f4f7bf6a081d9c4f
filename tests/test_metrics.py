"""Change metrics against known cases: identical networks, one re-initialized channel."""
import copy

import numpy as np
import pytest

import featureshift
import featureshift.metrics.probe
from featureshift.errors import FeatureshiftError
from featureshift.metrics.drift import cross_activation, visual_drift
from featureshift.metrics.driver import run_metrics
from featureshift.metrics.probe import probe_stats, resolve_probe
from featureshift.metrics.similarity import channel_correlation, cka, cka_from_grams
from featureshift.metrics.sources import channel_sources
from featureshift.metrics.weights import weight_change

from _fakerun import IMAGE_SIZE, LAYER, MODULE, reinit


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory, photos):
    """Eight real photographs and crops of them, as a probe folder with sub-folders."""
    root = tmp_path_factory.mktemp("probe")
    for i, (name, im) in enumerate(photos.items()):
        (root / "a").mkdir(exist_ok=True)
        (root / "b").mkdir(exist_ok=True)
        im.resize((96, 80)).save(root / "a" / f"{name}.png")
        w, h = im.size
        im.crop((w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2)).resize((80, 80)).save(root / "b" / f"{name}.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def pair(squeezenet):
    """(original, copy with channel 3 of LAYER re-initialized)."""
    b = reinit(copy.deepcopy(squeezenet), MODULE, [3], seed=1)
    featureshift.attach_info(b, squeezenet.featureshift_info)
    return squeezenet, b


def test_channel_sources_follow_the_architecture(squeezenet):
    # A ReLU is made by the conv before it; a Fire block's channels by its two expand convs, in order.
    (relu,) = channel_sources(squeezenet, LAYER)
    assert relu.module == MODULE and list(relu.index[:4]) == [0, 1, 2, 3]
    fire = {s.module: s.index for s in channel_sources(squeezenet, "features.6")}
    assert set(fire) == {"features.6.expand1x1", "features.6.expand3x3"}
    assert list(fire["features.6.expand1x1"][:2]) == [0, 1] and fire["features.6.expand1x1"][128] == -1
    assert fire["features.6.expand3x3"][128] == 0 and fire["features.6.expand3x3"][255] == 127
    # A residual block: conv2 and bn2 plus the downsample path, nothing from conv1.
    resnet = featureshift.open_network("resnet18", weights="random").module
    names = {s.module for s in channel_sources(resnet, "layer2.0")}
    assert names == {"layer2.0.conv2", "layer2.0.bn2", "layer2.0.downsample.0", "layer2.0.downsample.1"}


def test_identical_networks_show_no_change(squeezenet, probe_dir):
    twin = copy.deepcopy(squeezenet)
    featureshift.attach_info(twin, squeezenet.featureshift_info)
    wc = weight_change(squeezenet, twin, [LAYER, "features.6"])
    assert wc[LAYER].value == 0 and wc["features.6"].value == 0
    assert np.all(wc[LAYER].channels == 0)
    paths = resolve_probe(probe=probe_dir)
    assert len(paths) == 8  # the text file is not an image
    sa = probe_stats(squeezenet, [LAYER], paths, image_size=IMAGE_SIZE, quiet=True)
    sb = probe_stats(twin, [LAYER], paths, image_size=IMAGE_SIZE, quiet=True)
    assert cka(sa, sb, LAYER) == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(channel_correlation(sa, sb, LAYER), 1.0)
    images = [np.random.default_rng(i).random((32, 32, 3)).astype(np.float32) for i in range(3)]
    assert np.all(visual_drift(images, images) == 0)
    b_on_a, a_on_b = cross_activation(squeezenet, twin, [(LAYER, 1), (LAYER, 2), (LAYER, 3)], images, images)
    ok = np.isfinite(b_on_a)
    assert ok.any() and np.allclose(b_on_a[ok], 1.0) and np.allclose(a_on_b[ok], 1.0)


def test_reinitialized_channel_changes_and_its_neighbours_do_not(pair, probe_dir):
    a, b = pair
    wc = weight_change(a, b, [LAYER, "features.6", "features.7"])[LAYER]
    assert wc.channels[3] > 0.5
    assert np.all(np.delete(wc.channels, 3) == 0)
    assert 0 < wc.value < wc.channels[3]
    paths = resolve_probe(probe=probe_dir)
    sa = probe_stats(a, [LAYER, "features.7"], paths, image_size=IMAGE_SIZE, quiet=True)
    sb = probe_stats(b, [LAYER, "features.7"], paths, image_size=IMAGE_SIZE, quiet=True)
    corr = channel_correlation(sa, sb, LAYER)
    assert corr[3] < 0.9
    assert np.allclose(np.delete(corr, 3), 1.0)
    assert cka(sa, sb, LAYER) < 1 - 1e-6
    # The change reaches the next block through its input only: same weights, different activations.
    assert weight_change(a, b, ["features.7"])["features.7"].value == 0


def test_cka_is_invariant_to_rotation_and_scale_and_low_for_unrelated_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 40))
    q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    y = 3.0 * x @ q
    z = rng.normal(size=(64, 40))
    grams = lambda f: [f[i:i + 32] @ f[i:i + 32].T for i in (0, 32)]  # noqa: E731
    assert cka_from_grams(grams(x), grams(x)) == pytest.approx(1.0)
    assert cka_from_grams(grams(x), grams(y)) == pytest.approx(1.0)
    assert cka_from_grams(grams(x), grams(z)) < 0.2


def test_visual_drift_ignores_position_but_not_content(photos):
    cat = np.asarray(photos["chelsea"].resize((96, 96)), np.float32) / 255
    rocket = np.asarray(photos["rocket"].resize((96, 96)), np.float32) / 255
    shifted = np.roll(cat, 24, axis=1)
    drift = visual_drift([cat, cat], [shifted, rocket])
    assert 0 < drift[0] < drift[1] <= 1


def test_probe_statistics_are_cached(squeezenet, probe_dir, tmp_path, monkeypatch):
    paths = resolve_probe(probe=probe_dir, limit=6)
    assert len(paths) == 6
    first = probe_stats(squeezenet, [LAYER], paths, image_size=IMAGE_SIZE, cache_dir=tmp_path, quiet=True)
    assert len(list(tmp_path.glob("probe-*.npz"))) == 1

    def no_network(*a, **k):
        raise AssertionError("the network ran although the statistics are cached")

    monkeypatch.setattr(featureshift.metrics.probe, "truncated", no_network)
    again = probe_stats(squeezenet, [LAYER], paths, image_size=IMAGE_SIZE, cache_dir=tmp_path, quiet=True)
    assert np.array_equal(first.layers[LAYER].pooled, again.layers[LAYER].pooled)
    assert cka(first, again, LAYER) == pytest.approx(1.0)


def test_bad_probe_and_mismatched_networks_are_clear_errors(squeezenet, tmp_path):
    with pytest.raises(FeatureshiftError, match="does not exist"):
        resolve_probe(probe=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureshiftError, match="no readable images"):
        resolve_probe(probe=tmp_path / "empty")
    resnet = featureshift.open_network("resnet18", weights="random").module
    with pytest.raises(FeatureshiftError, match="different architectures"):
        weight_change(squeezenet, resnet, ["features.6"])


@pytest.mark.slow
def test_run_metrics_files(tmp_path_factory, photos):
    from _fakerun import shared_report

    run, _ = shared_report(tmp_path_factory, photos)
    import csv

    rows = list(csv.DictReader((run / "metrics" / "channels.csv").open()))
    last = {int(r["channel"]): r for r in rows if r["epoch"] == "2" and r["layer"] == LAYER}
    assert len(last) == 128
    # Channel 3 was re-initialized, channel 2 never changed; both were rendered with one seed.
    assert float(last[3]["weight_change"]) > 0.5 and float(last[3]["correlation"]) < 0.9
    assert float(last[3]["drift"]) > 0
    assert min(float(last[3]["cross_b_on_a"]), float(last[3]["cross_a_on_b"])) < 0.9
    assert float(last[2]["weight_change"]) == 0 and float(last[2]["drift"]) == 0
    assert float(last[2]["cross_b_on_a"]) == pytest.approx(1.0) and float(last[2]["cross_a_on_b"]) == pytest.approx(1.0)
    assert float(last[5]["weight_change"]) > 0.5 and last[5]["drift"] == ""  # changed, but not rendered
    layers = list(csv.DictReader((run / "metrics" / "layers.csv").open()))
    stem = [r for r in layers if r["layer"] == "features.0"]
    assert [float(r["weight_change"]) for r in stem] == [0, 0, 0]
    assert all(float(r["cka"]) == pytest.approx(1.0) for r in stem)
    import json

    ex = json.loads((run / "metrics" / "examples.json").read_text())
    assert set(ex["layers"][LAYER]["channels"]) == {"2", "3"}
    assert len(ex["layers"][LAYER]["channels"]["3"]["0"]) > 0


def test_dataset_examples_are_the_most_active_images_with_a_crop(pair, probe_dir):
    from featureshift.metrics.examples import examples_sheet, find_examples, receptive_field

    a, b = pair
    paths = resolve_probe(probe=probe_dir)
    stats = {m: probe_stats(net, [LAYER], paths, image_size=IMAGE_SIZE, quiet=True) for m, net in (("a", a), ("b", b))}
    rf = receptive_field(a, LAYER, IMAGE_SIZE)
    assert IMAGE_SIZE // 8 < rf <= IMAGE_SIZE
    before = find_examples(stats["a"].layers[LAYER], 3, 4, paths, IMAGE_SIZE, rf)
    after = find_examples(stats["b"].layers[LAYER], 3, 4, paths, IMAGE_SIZE, rf)
    peak = stats["a"].layers[LAYER].peak[:, 3]
    assert [e.index for e in before] == list(np.argsort(-peak)[:len(before)])
    assert all(x.value >= y.value for x, y in zip(before, before[1:]))
    for e in before + after:
        x0, y0, x1, y1 = e.box
        assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE and x1 - x0 == y1 - y0
    sheet = examples_sheet(before, after, a.featureshift_info, IMAGE_SIZE, tile=40)
    assert sheet.height >= 2 * 40 and sheet.width >= len(before) * 40


def test_probe_images_go_in_at_the_size_the_run_trained_at(tmp_path, photos):
    # A run trained with --image-size 48 on a network whose own input size is 64: its activations,
    # CKA and dataset examples must describe the network at the size it was trained at.
    import json

    from _fakerun import make_run
    from featureshift.run import read_run, trained_image_size, write_run

    run = make_run(tmp_path, photos, epochs=(0, 1))
    info = read_run(run)
    info["config"]["image_size"] = 48
    write_run(run, info)
    assert trained_image_size(run) == 48
    result = run_metrics(run, overview=["features.0"], examples=0, quiet=True)
    assert result.image_size == 48
    assert json.loads((run / "metrics" / "summary.json").read_text())["image_size"] == 48
    assert trained_image_size(tmp_path / "nowhere") is None


# ---------------------------------------------------------------- which layers changed most

SCALED = (0, 2)  # the channels of conv 0 that `_rescale` writes at 100 times their scale


def _small_net(seed: int):
    """conv-ReLU-conv-ReLU-conv-BatchNorm-ReLU-conv, in eval mode, with running statistics of its own."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    bn = net[5]
    with torch.no_grad():
        bn.weight.copy_(torch.rand(8) + 0.5)
        bn.bias.copy_(torch.randn(8) * 0.1)
    bn.running_mean.copy_(torch.randn(8) * 0.1)
    bn.running_var.copy_(torch.rand(8) + 0.5)
    return net.eval()


def _nudge(net, seed: int):
    """A fine-tuned copy: every weighted layer moved by a different, known amount; conv 0 only in the
    channels that `_rescale` leaves at their scale."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(net)
    with torch.no_grad():
        for i, size in ((0, 0.5), (2, 0.02), (4, 0.1), (5, 0.1), (7, 0.2)):
            for p in out[i].parameters():
                step = torch.randn(p.shape, generator=g) * p.std() * size
                if i == 0:
                    step[list(SCALED)] = 0
                p.add_(step)
    return out


def _rescale(net):
    """The same function written with other weights: conv 0's channels SCALED times 100 (undone by
    conv 2 behind the ReLU, which is positively homogeneous), and conv 4 times 100 (undone by the
    batch norm's running statistics)."""
    import torch

    out = copy.deepcopy(net)
    s = torch.ones(8)
    s[list(SCALED)] = 100.0
    with torch.no_grad():
        out[0].weight.mul_(s.view(-1, 1, 1, 1))
        out[0].bias.mul_(s)
        out[2].weight.div_(s.view(1, -1, 1, 1))
        out[4].weight.mul_(100.0)
        out[4].bias.mul_(100.0)
        out[5].running_mean.mul_(100.0)
        out[5].running_var.mul_(100.0 ** 2)
        out[5].eps *= 100.0 ** 2
    return out


def test_function_change_ranks_layers_alike_however_their_weights_are_scaled():
    import torch

    from featureshift.metrics.function import function_change

    a = _small_net(0)
    b = _nudge(a, 1)
    a2, b2 = _rescale(a), _rescale(b)
    x = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        assert torch.allclose(a(x[0]), a2(x[0]), rtol=1e-4, atol=1e-4)  # the same function, other weights
    layers = [str(i) for i in range(8)]
    plain, scaled = function_change(a, b, layers, x), function_change(a2, b2, layers, x)
    for l in layers:
        assert scaled[l] == pytest.approx(plain[l], rel=1e-3, abs=1e-9)
    weighted = ["0", "2", "4", "5", "7"]
    assert sorted(weighted, key=plain.get) == sorted(weighted, key=scaled.get)
    assert plain["0"] == max(plain[l] for l in weighted)  # conv 0 moved most, whatever its scale
    # Layers without weights of their own compute exactly as before on the same input.
    assert plain["1"] == plain["3"] == plain["6"] == 0
    assert function_change(a, a, layers, x) == {l: 0.0 for l in layers}
    # The relative weight change is not comparable across such layers: written at scale 100, conv 0's
    # moved channels are drowned by the unmoved large ones, and it drops from first to last.
    per_module = {}
    for name, (na, nb) in {"plain": (a, b), "scaled": (a2, b2)}.items():
        before = {l: torch.cat([p.detach().flatten() for p in na[int(l)].parameters()]) for l in weighted}
        after = {l: torch.cat([p.detach().flatten() for p in nb[int(l)].parameters()]) for l in weighted}
        rel = {l: float((after[l] - before[l]).norm() / before[l].norm()) for l in weighted}
        per_module[name] = sorted(weighted, key=rel.get)
    assert per_module["plain"][-1] == "0" and per_module["scaled"][0] == "0"
