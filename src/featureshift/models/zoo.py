"""One registry of networks: a name and a weights choice in, a plain nn.Module out.

Every model takes normalized input (RGB by torchvision's convention; timm models may take
1 or N bands, `ModelInfo.in_chans`) and carries a
`ModelInfo` (architecture, classes, preprocessing) that snapshots store and every
command reads, so a fine-tuned network is rebuilt exactly as it was saved.
"""
from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from ..errors import FeatureshiftError, did_you_mean
from .info import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, attach_info, band_stats

# Builder arguments fixed per architecture so that "imagenet" and "random" weights
# and a snapshot reload all produce the same module tree (and the same layer names).
_ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "transform_input": True},
    "inception_v3": {"aux_logits": True, "transform_input": True},
}


def torchvision_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def available_models() -> list[str]:
    names = torchvision_models()
    timm = _timm()
    if timm is not None:
        names += [f"timm/{n}" for n in timm.list_models()]
    return names


def _resolve_name(name: str) -> tuple[str, str]:
    """-> (library, builder name)."""
    if name.startswith(("timm/", "timm:")):
        base = name[5:]
    elif name in torchvision_models():
        return "torchvision", name
    else:
        base = name
    timm = _timm()
    if timm is not None and timm.is_model(base):
        return "timm", base
    hint = did_you_mean(name, available_models())
    extra = "" if timm is not None else " Any timm model works too after `pip install 'featureshift[timm]'`."
    raise FeatureshiftError(
        f"Unknown model '{name}'.{hint} Models are torchvision classification builder names "
        f"(googlenet, inception_v3, vgg16, squeezenet1_1, resnet18, ...).{extra}"
    )


def _imagenet_enum(name: str):
    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        return None


def _offline_error(what: str, url: str, path: Path, err: Exception) -> FeatureshiftError:
    return FeatureshiftError(
        f"Could not download the ImageNet weights of {what} ({err.__class__.__name__}: {err}). "
        f"If this machine is offline, download {url} elsewhere and place it by hand at {path}, "
        "then run the command again; or use --weights random, or the offline model "
        "`--model squeezenet1_1 --weights imagenet`."
    )


def _timm_model(timm, base: str, pretrained: bool, in_chans: int, img_size: int | None) -> nn.Module:
    kwargs: dict[str, Any] = {"in_chans": in_chans} if in_chans != 3 else {}
    if img_size:
        kwargs["img_size"] = img_size
    # Vision transformers then take any input size (position embeddings resampled, the image padded
    # to whole patches), as renders need: their transforms show the network crops of other sizes
    # than the canvas. Architectures without the options (CNNs take any size anyway) are built without.
    for dynamic in ({"dynamic_img_size": True, "dynamic_img_pad": True}, {"dynamic_img_size": True}, {}):
        try:
            return timm.create_model(base, pretrained=pretrained, **dynamic, **kwargs)
        except TypeError:
            if not dynamic:
                raise
    raise AssertionError("unreachable")


def build(arch: str, num_classes: int = 1000, pretrained: bool = False, progress: bool = True, *,
          in_chans: int = 3, img_size: int | None = None) -> nn.Module:
    """The bare architecture (random init, or ImageNet weights), head sized for num_classes.

    in_chans: input bands (timm models; pretrained first-layer weights are adapted by timm).
    img_size: the image size a vision transformer is built for (timm's img_size, torchvision's
    image_size); None: the architecture's default."""
    lib, base = _resolve_name(arch)
    if lib == "torchvision" and in_chans != 3:
        raise FeatureshiftError(f"torchvision's {base} takes RGB input only; for {in_chans} input channels use "
                                f"a timm model (timm/{base} where timm has it).")
    if lib == "timm":
        timm = _timm()
        try:
            model = _timm_model(timm, base, pretrained, in_chans, img_size)
        except Exception as e:  # hub download failures come in many types
            if not pretrained:
                raise
            cache = os.environ.get("HF_HUB_CACHE", str(Path.home() / ".cache" / "huggingface" / "hub"))
            raise _offline_error(f"timm/{base}", f"the Hugging Face hub repository of timm/{base}", Path(cache), e)
    else:
        kwargs = dict(_ARCH_KWARGS.get(base, {}))
        if pretrained and base == "squeezenet1_1":
            from .squeezenet_offline import load_state_dict

            model = torchvision.models.squeezenet1_1(weights=None)
            model.load_state_dict(load_state_dict())
        elif pretrained:
            if img_size:
                raise FeatureshiftError(f"torchvision's ImageNet weights of {base} are for its own image size; "
                                        "build it with random weights for another size, or use a timm model.")
            enum = _imagenet_enum(base)
            if enum is None:
                raise FeatureshiftError(f"torchvision has no ImageNet weights for '{base}'; use --weights random or a file.")
            path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
            try:
                # torchvision fixes the builder arguments itself when it loads weights
                model = torchvision.models.get_model(base, weights=enum, progress=progress)
            except (urllib.error.URLError, OSError, RuntimeError) as e:
                if path.exists() and isinstance(e, RuntimeError):
                    raise FeatureshiftError(
                        f"The cached ImageNet weights {path} could not be read ({e}). Delete the file so it is "
                        "downloaded again, or replace it by hand."
                    ) from e
                raise _offline_error(base, enum.url, path, e) from e
        else:
            if base == "googlenet":
                kwargs["init_weights"] = True
            elif base == "inception_v3":
                # torchvision's own init (TensorFlow's: every conv normal with std 0.1) is fine behind
                # BatchNorm in training, but in eval mode, with BatchNorm's starting statistics (mean 0,
                # variance 1), each conv multiplies the variance by about fan_in / 100 (26 for a 3x3 conv
                # of 288 channels): logits near 1e8, and on 300 digits a validation loss of 2.2e6 before
                # training, 51 after one epoch, 4.9 after two, while the statistics catch up. PyTorch's
                # default init starts at ln(classes) and trains as well (digits, 75 px, 3 epochs, seeds 0-3:
                # validation accuracy 56.5% on average against 57.9%, training accuracy 40.9% against 39.4%).
                kwargs["init_weights"] = False
            if img_size:
                if not base.startswith("vit_"):
                    raise FeatureshiftError(f"An image size fixed at build time applies to vision transformers "
                                            f"(vit_*, timm models), not to torchvision's {base}.")
                kwargs["image_size"] = img_size
            model = torchvision.models.get_model(base, weights=None, **kwargs)
    if num_classes != current_num_classes(model):
        replace_head(model, num_classes)
    return model


# The auxiliary classifiers of torchvision's inception networks (inception_v3; googlenet when built
# with them), which run in train mode only.
AUX_HEADS = ("AuxLogits", "aux1", "aux2")


def aux_heads(model: nn.Module) -> list[str]:
    """The names of MODEL's auxiliary classifiers that are present (empty for most networks)."""
    return [n for n in AUX_HEADS if isinstance(getattr(model, n, None), nn.Module)]


def drop_aux_heads(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Remove auxiliary classifiers (all, or NAMES) so that train mode never runs them; returns the
    names removed. Their weights leave the state dict; build_from_state rebuilds such a network."""
    names = aux_heads(model) if names is None else names
    for n in names:
        setattr(model, n, None)
    if names and hasattr(model, "aux_logits") and not aux_heads(model):
        model.aux_logits = False
    return names


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The final classifier layer(s): the last Linear / 1x1 Conv producing the logits, plus aux heads."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise FeatureshiftError(f"Cannot find a classifier layer in {type(model).__name__}.")
    last_name, last = layers[-1]
    out = last.out_features if isinstance(last, nn.Linear) else last.out_channels
    heads = [(last_name, last)]
    for n, m in layers[:-1]:
        o = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        if "aux" in n.lower() and o == out:
            heads.append((n, m))
    return heads


def current_num_classes(model: nn.Module) -> int:
    _, m = head_modules(model)[0]
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def replace_head(model: nn.Module, num_classes: int) -> list[str]:
    """Swap the classifier (and aux classifiers) for fresh ones with num_classes outputs; returns their names.

    The new layers start from small weights (normal, std 0.01) and zero biases, torchvision's own
    start for SqueezeNet's classifier: the default initialization gave the ImageNet SqueezeNet an
    untrained loss of 3.85 on 10 classes (ln 10 = 2.30), whose large first gradients hit the
    pretrained layers, and its classifier is followed by a ReLU that clips whatever starts negative.
    """
    if hasattr(model, "reset_classifier") and hasattr(model, "default_cfg"):  # timm
        model.reset_classifier(num_classes)
        heads = head_modules(model)
    else:
        heads = []
        for name, old in head_modules(model):
            if isinstance(old, nn.Linear):
                new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
            else:
                new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                                bias=old.bias is not None)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            heads.append((name, new))
    for _, layer in heads:
        nn.init.normal_(layer.weight, 0.0, 0.01)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return [n for n, _ in heads]


def _preprocessing(lib: str, base: str, model: nn.Module, in_chans: int = 3,
                   img_size: int | None = None) -> dict[str, Any]:
    """The model's own preprocessing: timm's pretrained configuration (mean, std, input size,
    crop, interpolation) or torchvision's weights transforms; mean and std fitted to the bands."""
    out: dict[str, Any]
    if lib == "timm":
        timm = _timm()
        cfg = timm.data.resolve_data_config({}, model=model)
        size = int(img_size or cfg["input_size"][-1])
        out = dict(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), input_size=size,
                   resize_size=int(round(size / cfg.get("crop_pct", 0.875))),
                   interpolation=str(cfg.get("interpolation") or "bilinear"))
    else:
        enum = _imagenet_enum(base)
        if enum is None:
            out = {}
        else:
            t = enum.transforms()
            crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
            resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
            mode = getattr(t, "interpolation", None)
            out = dict(mean=tuple(t.mean), std=tuple(t.std), input_size=int(crop), resize_size=int(resize),
                       interpolation=str(getattr(mode, "value", mode or "bilinear")))
        if img_size:
            out.update(input_size=int(img_size), resize_size=int(round(img_size * 256 / 224)))
    out["mean"] = band_stats(out.get("mean", IMAGENET_MEAN), in_chans)
    out["std"] = band_stats(out.get("std", IMAGENET_STD), in_chans)
    return out


def imagenet_classes() -> list[str]:
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def create_model(name: str, weights: str = "imagenet", num_classes: int | None = None,
                 progress: bool = True, *, in_chans: int = 3, image_size: int | None = None) -> nn.Module:
    """The network NAME with "imagenet" or "random" weights, in eval mode, info attached.

    in_chans: input bands (1 grayscale, 3 RGB, more for multi-band images; timm models).
    image_size: the image size to build a vision transformer for (its position embeddings), and
    the model's input size; recorded in its info so that snapshots rebuild it alike.
    Other weight sources (a snapshot, a state-dict file) are decided by
    `featureshift.network.open_network`, the one resolver of "which network".
    """
    if weights not in ("imagenet", "random"):
        raise ValueError(f"create_model builds imagenet or random weights, not {weights!r}; "
                         "featureshift.network.open_network resolves files")
    lib, base = _resolve_name(name)
    arch = f"timm/{base}" if lib == "timm" else base
    in_chans, image_size = int(in_chans), int(image_size) if image_size else None
    if in_chans < 1:
        raise FeatureshiftError(f"in_chans must be at least 1, not {in_chans}.")
    model = build(arch, pretrained=weights == "imagenet", progress=progress, in_chans=in_chans, img_size=image_size)
    classes = imagenet_classes() if current_num_classes(model) == 1000 else [str(i) for i in range(current_num_classes(model))]
    info = ModelInfo(arch=arch, num_classes=len(classes), class_names=classes, weights=weights,
                     in_chans=in_chans, img_size=image_size,
                     **_preprocessing(lib, base, model, in_chans, image_size))
    if num_classes is not None and num_classes != info.num_classes:
        replace_head(model, num_classes)
        info.num_classes, info.class_names = num_classes, [str(i) for i in range(num_classes)]
    return attach_info(model.eval(), info)


