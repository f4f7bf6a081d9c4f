"""The one gateway to a network: a model name with a weights choice, a snapshot file (or its
bytes), a state-dict file, an ONNX file, or a snapshot's bare architecture becomes a `Network`
(module, info, snapshot metadata).

Every command and API call that opens a network goes through `open_network`: it sorts what it
was asked (`spec_kind`) and hands it to the one opener of that kind (`OPENERS`), so the rules
(what a path means, which architecture a state dict needs, what an offline download says) are
decided here and nowhere else. The files' own formats stay with their modules: snapshot.py
reads and writes snapshots, models/onnx converts ONNX graphs, models/zoo builds architectures.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import FeatureshiftError
from .models.info import ModelInfo, attach_info, model_info
from .models.onnx.common import is_onnx_path
from .models.zoo import build, create_model, head_modules, replace_head
from .snapshot import SnapshotMeta, load_snapshot, read_meta

SNAPSHOT_SUFFIX = ".safetensors"
NAMED_WEIGHTS = ("imagenet", "random")
SKELETON_DEVICE = "meta"  # open_network(..., device="meta"): the architecture without weights


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


@dataclasses.dataclass(frozen=True)
class OpenRequest:
    """What `open_network` was asked, as every opener reads it (see open_network's arguments)."""
    spec: str | os.PathLike | nn.Module
    weights: str = "imagenet"
    num_classes: int | None = None
    device: str | torch.device = "cpu"
    progress: bool = True
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    input_size: int | tuple[int, int] | None = None
    in_chans: int = 3
    image_size: int | None = None
    data: bytes | None = None
    check: bool = True

    @property
    def file(self) -> Path:
        """The file to open: SPEC when it names one, else the file given as weights."""
        return Path(self.spec) if self.data is not None or is_snapshot_spec(self.spec) or is_onnx_path(self.spec) \
            else Path(self.weights)


def is_snapshot_spec(spec: str | os.PathLike) -> bool:
    """Whether a model argument names a file rather than an architecture."""
    s = str(spec)
    return s.endswith(SNAPSHOT_SUFFIX) or Path(s).is_file()


def open_network(spec: str | os.PathLike | nn.Module, weights: str | None = "imagenet", *,
                 num_classes: int | None = None,
                 device: str | torch.device = "cpu", progress: bool = True,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 input_size: int | tuple[int, int] | None = None, in_chans: int = 3,
                 image_size: int | None = None, data: bytes | None = None, check: bool = True) -> Network:
    """Resolve SPEC (a model name, a snapshot file, an ONNX file, or a module as it is) with
    WEIGHTS (imagenet, random (or None, as in torchvision), or the path of a snapshot or a
    state-dict file; ignored when SPEC is a file) into a Network.

    num_classes: a fresh classifier of that many classes, for a network built by name.
    device "meta": a snapshot's architecture without its weights (names and shapes for free; an
    ONNX file has no such form: its graph converted, unchecked, on the CPU).
    mean, std, input_size: the preprocessing of an ONNX file that does not carry its own.
    in_chans, image_size: input bands and the image size a vision transformer is built for, when
    SPEC is a model name (see models.zoo.create_model); a snapshot records its own.
    data: the bytes of the file SPEC names, already read (a Ray worker's snapshot): the file is
    not opened. check=False: an ONNX file's conversion is not checked against onnxruntime."""
    request = OpenRequest(spec, "random" if weights is None else weights,  # None: torchvision's random
                          num_classes, device, progress, mean, std, input_size, in_chans, image_size, data, check)
    return OPENERS[spec_kind(request)](request)


def spec_kind(request: OpenRequest) -> str:
    """Which opener of `OPENERS` takes REQUEST."""
    if isinstance(request.spec, nn.Module):
        return "module"
    if is_onnx_path(request.spec):
        return "onnx"
    if request.data is not None:
        return "snapshot bytes"
    if is_snapshot_spec(request.spec):
        return "skeleton" if str(request.device) == SKELETON_DEVICE else "snapshot"
    if request.weights in NAMED_WEIGHTS:
        return "name"
    path = Path(request.weights)
    if not path.exists():
        raise FeatureshiftError(
            f"--weights '{request.weights}' is neither 'imagenet', 'random', nor an existing file. "
            "Give the path of a snapshot or a saved state dict."
        )
    return "snapshot" if path.suffix == SNAPSHOT_SUFFIX else "state dict"


# ---------------------------------------------------------------- the openers, one per kind

def open_module(request: OpenRequest) -> Network:
    """A network already in hand (the API): as it is."""
    return Network(request.spec, model_info(request.spec))


def open_named(request: OpenRequest) -> Network:
    """An architecture by name with ImageNet or random weights."""
    module = create_model(str(request.spec), weights=request.weights, num_classes=request.num_classes,
                          progress=request.progress, in_chans=request.in_chans,
                          image_size=request.image_size).to(request.device)
    return Network(module, model_info(module), weights=request.weights)


def open_snapshot_file(request: OpenRequest) -> Network:
    """A snapshot, given as SPEC or as the weights of the architecture SPEC names (which must match)."""
    path = request.file
    if path != Path(request.spec):
        arch, name = read_meta(path).info.arch, str(request.spec)
        if arch != name and not arch.endswith("/" + name):
            raise FeatureshiftError(
                f"The snapshot {path} holds a '{arch}' network, not '{name}'. "
                f"Use --model {arch}, or pass the snapshot itself where a model is expected."
            )
    module, meta = load_snapshot(path, device=request.device)
    return Network(module, meta.info, meta, path)


def open_snapshot_bytes(request: OpenRequest) -> Network:
    """A snapshot from its file's bytes; the file itself is not read (it may be on another machine)."""
    module, meta = load_snapshot(request.file, device=request.device, data=request.data)
    return Network(module, meta.info, meta, request.file)


def open_onnx_file(request: OpenRequest) -> Network:
    """An ONNX image classifier converted to torch (from its bytes when given), checked unless asked not."""
    from .models.onnx.convert import import_onnx

    device = "cpu" if str(request.device) == SKELETON_DEVICE else request.device
    check = request.check and str(request.device) != SKELETON_DEVICE
    module = import_onnx(request.file, mean=request.mean, std=request.std, input_size=request.input_size,
                         check=check, data=request.data).module.to(device)
    return Network(module, model_info(module), None, request.file)


def open_skeleton(request: OpenRequest) -> Network:
    """A snapshot's architecture on the meta device, weights not read: its metadata says what to build."""
    meta = read_meta(request.file)
    return Network(skeleton(meta.info), meta.info, meta, request.file)


def skeleton(info: ModelInfo) -> nn.Module:
    """The architecture INFO names with no weights (meta device; a random one where a builder
    insists on real tensors), info attached."""
    kwargs = dict(num_classes=info.num_classes, pretrained=False, in_chans=info.in_chans, img_size=info.img_size)
    try:
        with torch.device(SKELETON_DEVICE):
            return attach_info(build(info.arch, **kwargs), info)
    except Exception:  # some builders insist on real tensors
        return attach_info(build(info.arch, **kwargs), info)


def open_state_dict_file(request: OpenRequest) -> Network:
    """The architecture SPEC names with the weights of a file saved by torch.save(model.state_dict())."""
    name, path = str(request.spec), request.file
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # never run code from the file
    except Exception as e:
        raise FeatureshiftError(
            f"Could not read weights from {path} ({e.__class__.__name__}: {e}). Give a featureshift snapshot "
            "(.safetensors) or a file saved with torch.save(model.state_dict(), path)."
        ) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    model = create_model(name, weights="random", progress=request.progress, in_chans=request.in_chans,
                         image_size=request.image_size)
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
    module = model.eval().to(request.device)
    return Network(module, model_info(module), None, path)


# spec kind -> its opener: the whole list of ways a network is opened
OPENERS: dict[str, Callable[[OpenRequest], Network]] = {
    "module": open_module,
    "name": open_named,
    "snapshot": open_snapshot_file,
    "snapshot bytes": open_snapshot_bytes,
    "state dict": open_state_dict_file,
    "onnx": open_onnx_file,
    "skeleton": open_skeleton,
}
