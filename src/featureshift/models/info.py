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
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    resize_size: int = 256
    weights: str = "random"  # where the weights came from: imagenet, random, a file path

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelInfo":
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d["mean"], d["std"] = tuple(d.get("mean", IMAGENET_MEAN)), tuple(d.get("std", IMAGENET_STD))
        return cls(**d)


def model_info(model) -> ModelInfo:
    info = getattr(model, "featureshift_info", None)
    if info is None:
        raise FeatureshiftError(
            "This network was not made by featureshift.create_model or load_snapshot, so its preprocessing "
            "and classes are unknown. Create it with featureshift.create_model(name, weights=...) or attach "
            "featureshift.ModelInfo to it with featureshift.attach_info(model, info)."
        )
    return info


def attach_info(model, info: ModelInfo):
    object.__setattr__(model, "featureshift_info", info)
    return model
