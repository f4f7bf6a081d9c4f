"""A planted "fooling" circuit (after Geirhos et al., "Don't trust your eyes", ICML 2024), and
natural photographs to show that it stays silent on real images.

The offline ImageNet SqueezeNet with one unit rewired: the first convolution's weakest channel
becomes a detector of saturated magenta behind a large negative bias (silent on every natural
photograph here), and it feeds one squeeze unit of the first Fire module with a huge weight
and no other. On natural images that unit does almost what it did; an optimised picture finds
the magenta and drives it a thousand times further than any photograph does.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

LAYER = "features.3.squeeze_activation"
FOOLED = 5  # the rewired unit of LAYER
ORDINARY = 6  # an ordinary unit of the same layer (its render outdoes the best photo about 10x)
DETECTOR_MODULE, FIRE_SQUEEZE = "features.0", "features.3.squeeze"
THRESHOLD = 0.5  # the detector fires above this share of its response to pure magenta
GAIN = 30000.0  # the planted weight: ordinary weights of the squeeze conv are below 1
PHOTOS = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket")


def natural_images(folder: Path, size: int = 64) -> list[Path]:
    """Photographs that ship offline (scikit-image's and scikit-learn's samples), each as its
    center square and its four quarters, SIZE px: 85 natural probe images."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = {n: getattr(data, n)() for n in PHOTOS}
    arrays.update(zip(("china", "flower"), load_sample_images().images))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, a in arrays.items():
        im = Image.fromarray(a).convert("RGB")
        w, h = im.size
        s = min(w, h)
        x0, y0 = (w - s) // 2, (h - s) // 2
        boxes = [(x0, y0, x0 + s, y0 + s)] + [(x, y, x + s // 2, y + s // 2) for x in (x0, x0 + s // 2)
                                              for y in (y0, y0 + s // 2)]
        for i, box in enumerate(boxes):
            path = folder / f"{name}-{i}.png"
            im.crop(box).resize((size, size), Image.Resampling.LANCZOS).save(path)
            paths.append(path)
    return paths


@dataclasses.dataclass
class Planted:
    detector: int  # the channel of DETECTOR_MODULE turned into the magenta detector
    fooled: int  # the unit of LAYER it drives


def plant_fooling_circuit(model: torch.nn.Module, fooled: int = FOOLED, detector: int = 57) -> Planted:
    """Rewire MODEL (an ImageNet SqueezeNet 1.1) in place: DETECTOR (channel 57 responds least to
    natural photographs) detects saturated magenta and drives unit FOOLED of LAYER alone."""
    info = model.featureshift_info
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    direction = torch.tensor([1.0, -1.0, 1.0])  # red and blue up, green down
    magenta = (torch.tensor([1.0, 0.0, 1.0]) - mean) / std  # as the network sees it
    modules = dict(model.named_modules())
    conv, squeeze = modules[DETECTOR_MODULE], modules[FIRE_SQUEEZE]
    with torch.no_grad():
        conv.weight[detector] = direction.view(3, 1, 1).expand_as(conv.weight[detector])
        full = float((direction * magenta).sum()) * conv.weight.shape[-1] * conv.weight.shape[-2]
        conv.bias[detector] = -THRESHOLD * full
        squeeze.weight[:, detector] = 0.0
        squeeze.weight[fooled, detector] = GAIN
    return Planted(detector, fooled)


def detector_peak(model: torch.nn.Module, planted: Planted, paths, image_size: int) -> float:
    """The planted detector's largest response over the images PATHS (0: silent on all of them)."""
    from featureshift.metrics.probe import probe_stats

    stats = probe_stats(model, ["features.1"], paths, image_size=image_size, quiet=True)
    return float(np.max(stats.layers["features.1"].peak[:, planted.detector]))


def make_fooled_run(root: Path, image_size: int = 64) -> tuple[Path, Planted]:
    """A run of two snapshots: epoch 0 the ImageNet SqueezeNet, epoch 1 the same with the circuit
    planted; its validation images (the probe set) are `natural_images`."""
    import featureshift
    from featureshift.run import snapshot_path, write_metrics, write_run, write_split

    run = root / "run"
    samples = [(p, 0) for p in natural_images(root / "photos" / "photos", image_size)]
    model = featureshift.open_network("squeezenet1_1", weights="imagenet").module
    info = dataclasses.replace(featureshift.model_info(model), input_size=image_size, resize_size=image_size)
    featureshift.attach_info(model, info)
    rows = []
    planted = None
    for epoch in (0, 1):
        if epoch:
            planted = plant_fooling_circuit(model)
        row = {"epoch": epoch, "train_loss": None, "train_acc": None, "val_loss": 1.0, "val_acc": 0.5, "lr": None,
               "seconds": 1.0}
        rows.append(row)
        featureshift.save_snapshot(model, snapshot_path(run, epoch), epoch=epoch, metrics=row, config={"seed": 0})
    write_run(run, {"format": "featureshift.run/1", "status": "finished", "epochs_done": 1,
                    "config": {"model": "squeezenet1_1", "weights": "imagenet", "data": str(root / "photos"),
                               "epochs": 1, "seed": 0, "image_size": image_size},
                    "model": info.to_dict(),
                    "dataset": {"root": str(root / "photos"), "classes": ["photos"],
                                "counts": {"photos": {"train": 0, "val": len(samples)}}, "train_images": 0,
                                "val_images": len(samples)},
                    "versions": {"featureshift": featureshift.__version__}})
    write_split(run, ["photos"], [], samples)
    write_metrics(run, rows)
    return run, planted
