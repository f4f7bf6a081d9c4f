"""A small training run made by hand, for the metrics, compare and report tests.

Epoch 0 is ImageNet SqueezeNet with a 3-class head; each later epoch re-initializes a
few known channels, so the tests know exactly which neurons changed and which did not.
One class is named like a script tag, to check that the report escapes names (on disk
its folder nests, as no file name can hold the "/").
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

EVIL = "<script>alert(1)</script>"
CLASSES = ["checkers", "stripes", EVIL]
LAYER = "features.6.expand3x3_activation"  # 128 channels, each made by one conv filter
MODULE = "features.6.expand3x3"
CHANGED = {1: [3], 2: [3, 5]}  # epoch -> channels of LAYER re-initialized by then


def reinit(model, module: str, channels, seed: int):
    conv = dict(model.named_modules())[module]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in channels:
            w = conv.weight[c]
            w.copy_(torch.randn(w.shape, generator=g) * w.std())
            conv.bias[c] = float(torch.randn((), generator=g)) * 0.1
    return model


def make_images(root: Path, photos) -> list[tuple[Path, int]]:
    """12 probe images: 3 photos and 3 synthetic textures per class."""
    from featureshift.data import make_synthetic_dataset

    synth = make_synthetic_dataset(root / "synth", classes=("checkers", "stripes", "dots"), per_class=3, size=64)
    samples = []
    names = list(photos)
    for ci, name in enumerate(CLASSES):
        folder = root / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        src = ["checkers", "stripes", "dots"][ci]
        for i, p in enumerate(sorted((synth / src).iterdir())):
            dst = folder / f"t{i}.jpg"
            dst.write_bytes(p.read_bytes())
            samples.append((dst, ci))
        photo = photos[names[ci % len(names)]].resize((80, 64))
        for i in range(1):
            dst = folder / f"p{i}.png"
            photo.save(dst)
            samples.append((dst, ci))
    return samples


def make_run(root: Path, photos, epochs=(0, 1, 2), only_first: bool = False) -> Path:
    import featureshift
    from featureshift.models.zoo import replace_head
    from featureshift.run import snapshot_path, write_metrics, write_run, write_split

    run = root / "run"
    samples = make_images(root, photos)
    model = featureshift.open_network("squeezenet1_1", weights="imagenet").module
    torch.manual_seed(0)
    replace_head(model, len(CLASSES))
    info = dataclasses.replace(featureshift.model_info(model), num_classes=len(CLASSES), class_names=list(CLASSES),
                               input_size=64, resize_size=64)
    featureshift.attach_info(model, info)
    rows = []
    for e in (epochs[:1] if only_first else epochs):
        if e:
            reinit(model, MODULE, CHANGED[e], seed=e)
        row = {"epoch": e, "train_loss": None if e == 0 else 1.0 / e, "train_acc": None if e == 0 else 0.5 + 0.1 * e,
               "val_loss": 1.1 - 0.2 * e, "val_acc": 0.33 + 0.2 * e, "lr": None if e == 0 else 1e-3, "seconds": 1.0}
        rows.append(row)
        featureshift.save_snapshot(model, snapshot_path(run, e), epoch=e, metrics=row, config={"seed": 0})
    counts = {c: {"train": 0, "val": 4} for c in CLASSES}
    write_run(run, {"format": "featureshift.run/1", "status": "finished", "epochs_done": len(rows) - 1,
                    "config": {"model": "squeezenet1_1", "weights": "imagenet", "data": str(root / "data"),
                               "epochs": len(rows) - 1, "seed": 0, "image_size": 64},
                    "model": info.to_dict(),
                    "dataset": {"root": str(root / "data"), "classes": CLASSES, "counts": counts,
                                "train_images": 0, "val_images": len(samples),
                                "skipped": [{"path": str(root / "data" / EVIL / "bad.jpg"), "reason": "not an image"}],
                                "skipped_count": 1},
                    "versions": {"featureshift": featureshift.__version__}})
    write_split(run, CLASSES, [], samples)
    write_metrics(run, rows)
    return run


RENDER = dict(steps=12, size=32)  # tiny renders: the tests check plumbing and known cases, not beauty
IMAGE_SIZE = 64
CHANNELS = [2, 3]  # 3 is re-initialized at epoch 1, 2 never changes
_BUILT: dict = {}


def shared_run(tmp_path_factory, photos) -> Path:
    """One hand-made run per test session."""
    if "run" not in _BUILT:
        _BUILT["run"] = make_run(tmp_path_factory.mktemp("fakerun"), photos)
    return _BUILT["run"]


def copy_of_run(run: Path, dest: Path) -> Path:
    """A copy of RUN at DEST without its report, its caches included: for a test that builds or
    measures again, which rewrites RUN/metrics and RUN/report, without touching the shared run."""
    import shutil

    return Path(shutil.copytree(run, dest, ignore=shutil.ignore_patterns("report")))


def shared_report(tmp_path_factory, photos):
    """(run, report index) built once per test session, shared by the metrics, report and browser tests."""
    if "index" not in _BUILT:
        from featureshift.commands.report import build_report

        run = shared_run(tmp_path_factory, photos)
        _BUILT["index"] = build_report(run, [LAYER], CHANNELS, image_size=IMAGE_SIZE, quiet=True, **RENDER)
    return _BUILT["run"], _BUILT["index"]
