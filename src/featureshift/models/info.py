"""What featureshift knows about a network besides its weights: architecture, classes,
preprocessing, and where the weights came from. Every layer of the package reads it,
so it depends on nothing but the error type."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import FeatureshiftError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

@dataclasses.dataclass
class ModelInfo:
    arch: str  # torchvision builder name, or "timm/<name>"
    num_classes: int
    class_names: list[str] = dataclasses.field(repr=False)
    mean: tuple[float, ...] = IMAGENET_MEAN  # one value per input channel (in_chans)
    std: tuple[float, ...] = IMAGENET_STD
    input_size: int = 224
    resize_size: int = 256
    weights: str = "random"  # where the weights came from: imagenet, random, a file path
    # Input bands: 1 (grayscale), 3 (RGB) or more (multi-band); mean and std have one value per band.
    in_chans: int = 3
    # The image size the architecture was built for (timm's img_size, torchvision's image_size), which
    # fixes the position embeddings of vision transformers; None: the architecture's own default.
    img_size: int | None = None
    interpolation: str = "bilinear"  # how preprocessing resizes images: bilinear, bicubic, nearest

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelInfo":
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d["mean"], d["std"] = tuple(d.get("mean", IMAGENET_MEAN)), tuple(d.get("std", IMAGENET_STD))
        return cls(**d)


def input_channels(model) -> int:
    """How many bands MODEL takes as input: its info's in_chans, 3 for a network featureshift did not make."""
    info = getattr(model, "featureshift_info", None)
    return int(getattr(info, "in_chans", 3) or 3)


def band_stats(values, in_chans: int) -> tuple[float, ...]:
    """Per-band normalization VALUES (a mean or std for RGB) fitted to IN_CHANS bands: the average
    of the RGB values for one band (a gray image's RGB channels are equal), the values themselves
    for three, and the RGB values followed by their average for every band beyond the third."""
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    average = sum(values[:3]) / len(values[:3])
    if in_chans == 1:
        return (average,)
    return (values[:3] + (average,) * in_chans)[:in_chans]


def model_info(model) -> ModelInfo:
    info = getattr(model, "featureshift_info", None)
    if info is None:
        raise FeatureshiftError(
            "This network was not opened by featureshift.open_network, so its preprocessing and classes "
            "are unknown. Open it with featureshift.open_network(name, weights=...).module or attach "
            "featureshift.ModelInfo to it with featureshift.attach_info(model, info)."
        )
    return info


def attach_info(model, info: ModelInfo):
    object.__setattr__(model, "featureshift_info", info)
    return model
