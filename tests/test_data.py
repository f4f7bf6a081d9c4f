import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from featureshift import FeatureshiftError, ModelInfo
from featureshift.data import (ImageDataset, collate_skip, eval_transform, make_synthetic_dataset, open_image,
                               scan_image_folder, stratified_split, train_transform)


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("tex") / "ds", per_class=10, size=32)


def test_synthetic_dataset_is_reproducible_and_classes_differ(tmp_path, textures):
    again = make_synthetic_dataset(tmp_path / "again", per_class=10, size=32)
    for p in sorted(textures.rglob("*.jpg")):
        assert (again / p.relative_to(textures)).read_bytes() == p.read_bytes()
    idx = scan_image_folder(textures)
    assert idx.classes == ["checkers", "dots", "stripes"] and idx.counts() == dict.fromkeys(idx.classes, 10)
    with pytest.raises(FeatureshiftError, match="No synthetic texture 'stripe'.*stripes"):
        make_synthetic_dataset(tmp_path / "x", classes=("stripe", "dots"))


def test_split_is_stratified_seeded_and_stable(textures, tmp_path):
    samples = scan_image_folder(textures).samples
    train, val = stratified_split(samples, 0.2, seed=3)
    assert (train, val) == stratified_split(samples, 0.2, seed=3)
    assert sorted(train + val) == sorted(samples) and not set(train) & set(val)
    assert [c for _, c in val].count(0) == [c for _, c in val].count(1) == [c for _, c in val].count(2) == 2
    assert stratified_split(samples, 0.2, seed=4)[1] != val
    # moving the dataset keeps the split; removing a training file moves no other file
    moved = tmp_path / "moved"
    shutil.copytree(textures, moved)
    mval = stratified_split(scan_image_folder(moved).samples, 0.2, seed=3)[1]
    assert [(p.relative_to(moved), c) for p, c in mval] == [(p.relative_to(textures), c) for p, c in val]
    # a class of one image keeps it for training
    one = [(textures / "a" / "x.jpg", 0), (textures / "b" / "1.jpg", 1), (textures / "b" / "2.jpg", 1)]
    tr, va = stratified_split(one, 0.5)
    assert one[0] in tr and len(va) == 1
    assert stratified_split(samples, 0.0)[1] == []
    with pytest.raises(FeatureshiftError, match="below 1"):
        stratified_split(samples, 1.0)


def test_split_does_not_depend_on_sample_order(textures):
    samples = scan_image_folder(textures).samples
    _, val = stratified_split(samples, 0.3, seed=1)
    _, val_rev = stratified_split(list(reversed(samples)), 0.3, seed=1)
    assert set(val) == set(val_rev)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "CMYK", "P", "I;16", "I", "F", "1"])
def test_open_image_converts_every_mode(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode in ("I;16", "I"):
        im = Image.fromarray(rng.integers(0, 65535, (20, 30)).astype(np.uint16 if mode == "I;16" else np.int32))
        assert im.mode == mode
    elif mode == "F":
        im = Image.fromarray(rng.normal(0, 1000, (20, 30)).astype(np.float32), "F")
    else:
        im = Image.fromarray(rng.integers(0, 255, (20, 30, 3)).astype(np.uint8)).convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "F", "I") else "x.png")
    im.save(path)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    a = np.asarray(out)
    if mode in ("I;16", "I", "F"):  # scaled, not clipped to white
        assert 0 < a.mean() < 255 and a.std() > 30


def test_sixteen_bit_keeps_its_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64), (8, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    a = np.asarray(open_image(tmp_path / "g16.png"))[..., 0]
    assert a[0, 0] == 0 and a[0, -1] == 255 and 120 < a[0, 32] < 135


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert np.asarray(open_image(tmp_path / "t.png"))[0, 0].tolist() == [255, 255, 255]


def test_scan_skips_bad_files_and_names_them(tmp_path, textures):
    root = tmp_path / "ds"
    shutil.copytree(textures, root)
    (root / "dots" / "empty.jpg").write_bytes(b"")
    (root / "dots" / "notes.txt").write_text("hello")
    good = (root / "dots" / "dots_000.jpg").read_bytes()
    (root / "dots" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "stripes" / ".DS_Store").write_bytes(b"\0\0")  # hidden files are not data
    Image.new("RGB", (2000, 1500), "red").save(root / "stripes" / "big.png")
    idx = scan_image_folder(root)
    reasons = {p.name: why for p, why in idx.skipped}
    assert set(reasons) == {"empty.jpg", "notes.txt", "truncated.jpg"}
    assert "empty" in reasons["empty.jpg"] and reasons["notes.txt"] == "not an image"
    assert idx.counts() == {"checkers": 10, "dots": 10, "stripes": 11}


@pytest.mark.parametrize("layout,message", [
    ("missing", "does not exist"), ("empty", "is empty"), ("loose", "directly"),
    ("one", "single class"), ("noimages", "no images"),
])
def test_scan_refuses_unusable_folders(tmp_path, layout, message):
    root = tmp_path / "ds"
    if layout != "missing":
        root.mkdir()
    if layout == "loose":
        Image.new("RGB", (8, 8)).save(root / "a.png")
    if layout == "one":
        (root / "cats").mkdir()
        Image.new("RGB", (8, 8)).save(root / "cats" / "a.png")
    if layout == "noimages":
        (root / "a").mkdir()
        (root / "b").mkdir()
    with pytest.raises(FeatureshiftError, match=message):
        scan_image_folder(root)


def test_class_names_are_kept_exactly(tmp_path):
    names = ["a b", "ünïcødé", "<b>&amp;"]
    for n in names:
        (tmp_path / n).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / n / "x.png")
    assert scan_image_folder(tmp_path).classes == sorted(names)


def test_augmentation_only_in_train_transform(textures):
    info = ModelInfo("squeezenet1_1", 3, ["a", "b", "c"])
    im = open_image(next(textures.rglob("*.jpg")))
    ev = eval_transform(info, 24)
    assert ev(im).shape == (3, 24, 24) and torch.equal(ev(im), ev(im))
    tr = train_transform(info, 24)
    torch.manual_seed(0)
    outs = [tr(im) for _ in range(4)]
    assert outs[0].shape == (3, 24, 24) and not all(torch.equal(outs[0], o) for o in outs[1:])
    assert eval_transform(info).transforms[1].size == (224, 224)  # the model's own size by default


def test_dataset_decodes_lazily_and_skips_bad_files(tmp_path, textures):
    info = ModelInfo("squeezenet1_1", 3, ["a", "b", "c"])
    bad = tmp_path / "gone.jpg"
    samples = [(next(textures.rglob("*.jpg")), 1), (bad, 2)]
    ds = ImageDataset(samples, eval_transform(info, 16), skip_bad=True)
    x, y, skipped = collate_skip([ds[0], ds[1]])  # the file is only opened here
    assert x.shape == (1, 3, 16, 16) and y.tolist() == [1] and skipped[0][0] == str(bad)
    with pytest.raises(FeatureshiftError, match="gone.jpg"):
        ImageDataset(samples, eval_transform(info, 16))[1]
