"""The one resolver of "which network": a model name with a weights choice, a snapshot
file, or a state-dict file becomes a `Network` (module, info, snapshot metadata).

Every command and API call that accepts a model goes through `open_network`, so the
rules (what a path means, which architecture a state dict needs, what an offline
download says) are decided here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .errors import FeatureshiftError
from .models.info import ModelInfo, model_info
from .models.onnx.common import is_onnx_path
from .models.onnx.convert import load_onnx
from .models.zoo import create_model as build_named
from .models.zoo import head_modules, replace_head
from .snapshot import SnapshotMeta, load_snapshot, read_meta

SNAPSHOT_SUFFIX = ".safetensors"


@dataclasses.dataclass
class Network:
    module: nn.Module  # in eval mode, normalized RGB in, `featureshift_info` attached
    info: ModelInfo
    meta: SnapshotMeta | None = None  # set when the network came from a snapshot
    path: Path | None = None  # the snapshot or weights file, when there was one
    weights: str | None = None  # imagenet or random, for a network built by name

    @property
    def label(self) -> str:
        """How to name this network to a person: "003.safetensors, epoch 3", "weights.pt",
        "googlenet (imagenet)", or the architecture of a module given as it is."""
        if self.path is not None:
            epoch = self.meta.epoch if self.meta is not None else None
            return self.path.name + (f", epoch {epoch}" if epoch is not None else "")
        return f"{self.info.arch} ({self.weights})" if self.weights else self.info.arch


def is_snapshot_spec(spec: str | os.PathLike) -> bool:
    """Whether a model argument names a file rather than an architecture."""
    s = str(spec)
    return s.endswith(SNAPSHOT_SUFFIX) or Path(s).is_file()


def open_network(spec: str | os.PathLike | nn.Module, weights: str | None = "imagenet", *,
                 num_classes: int | None = None,
                 device: str | torch.device = "cpu", progress: bool = True,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 input_size: int | tuple[int, int] | None = None, in_chans: int = 3,
                 image_size: int | None = None) -> Network:
    """Resolve SPEC (a model name, a snapshot file, an ONNX file, or a module as it is) with
    WEIGHTS (imagenet, random (or None, as in torchvision), or the path of a snapshot or a
    state-dict file; ignored when SPEC is a file) into a Network.
    mean, std, input_size: the preprocessing of an ONNX file that does not carry its own.
    in_chans, image_size: input bands and the image size a vision transformer is built for, when
    SPEC is a model name (see models.zoo.create_model); a snapshot records its own."""
    if isinstance(spec, nn.Module):  # a network already in hand (the API): as it is
        return Network(spec, model_info(spec))
    if is_onnx_path(spec):
        path = Path(spec)
        module = load_onnx(path, mean=mean, std=std, input_size=input_size).to(device)
        return Network(module, model_info(module), None, path)
    if is_snapshot_spec(spec):
        path = Path(spec)
        module, meta = load_snapshot(path, device=device)
        return Network(module, meta.info, meta, path)
    name = str(spec)
    if weights is None:  # torchvision's spelling of random weights
        weights = "random"
    if weights in ("imagenet", "random"):
        module = build_named(name, weights=weights, num_classes=num_classes, progress=progress,
                             in_chans=in_chans, image_size=image_size).to(device)
        return Network(module, model_info(module), weights=weights)
    path = Path(weights)
    if not path.exists():
        raise FeatureshiftError(
            f"--weights '{weights}' is neither 'imagenet', 'random', nor an existing file. "
            "Give the path of a snapshot or a saved state dict."
        )
    if path.suffix == SNAPSHOT_SUFFIX:
        arch = read_meta(path).info.arch
        if arch != name and not arch.endswith("/" + name):
            raise FeatureshiftError(
                f"The snapshot {path} holds a '{arch}' network, not '{name}'. "
                f"Use --model {arch}, or pass the snapshot itself where a model is expected."
            )
        module, meta = load_snapshot(path, device=device)
        return Network(module, meta.info, meta, path)
    module = _from_state_dict_file(name, path, progress, in_chans, image_size).to(device)
    return Network(module, model_info(module), None, path)


def create_model(name: str, weights: str | None = "imagenet", num_classes: int | None = None,
                 progress: bool = True, *, in_chans: int = 3, image_size: int | None = None) -> nn.Module:
    """A network in eval mode taking normalized input, with `featureshift_info` attached.

    weights: "imagenet" (standard download-and-cache; squeezenet1_1 works offline),
    "random", or the path of a snapshot (.safetensors) or a state-dict file.
    in_chans: input bands (1 grayscale, 3 RGB, N multi-band; timm models). image_size: build a
    vision transformer for this image size (e.g. create_model("timm/vit_tiny_patch16_224",
    "random", image_size=64)); it is also the model's input size.
    """
    return open_network(name, weights, num_classes=num_classes, progress=progress, in_chans=in_chans,
                        image_size=image_size).module


def load(model_or_snapshot: str, weights: str = "imagenet") -> tuple[nn.Module, SnapshotMeta | None]:
    """A network from a model name or a snapshot path: (model, SnapshotMeta or None)."""
    net = open_network(model_or_snapshot, weights)
    return net.module, net.meta


def _from_state_dict_file(name: str, path: Path, progress: bool, in_chans: int = 3,
                          image_size: int | None = None) -> nn.Module:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # never run code from the file
    except Exception as e:
        raise FeatureshiftError(
            f"Could not read weights from {path} ({e.__class__.__name__}: {e}). Give a featureshift snapshot "
            "(.safetensors) or a file saved with torch.save(model.state_dict(), path)."
        ) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    model = build_named(name, weights="random", progress=progress, in_chans=in_chans, image_size=image_size)
    info = model_info(model)
    head = [n for n, _ in head_modules(model)][0]
    key = f"{head}.weight"
    if key in sd and sd[key].shape[0] != info.num_classes:
        replace_head(model, sd[key].shape[0])
        info.num_classes = sd[key].shape[0]
        info.class_names = [str(i) for i in range(info.num_classes)]
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise FeatureshiftError(
            f"The weights in {path} do not fit a '{name}' network: {' '.join(first)} Check --model."
        ) from e
    info.weights = str(path)
    return model.eval()
