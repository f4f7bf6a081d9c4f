"""The options of a training run: TrainConfig, TOML files, validation and the learning-rate schedule."""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import FeatureshiftError, did_you_mean

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("none", "cosine", "step")
MIN_IMAGE_SIZE = 16  # the smallest --image-size


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run, with its default. The CLI and TOML files fill this."""

    data: str | None = None  # ImageFolder root: one sub-folder of images per class
    model: str = "googlenet"  # model name, or a snapshot file to continue from
    weights: str = "imagenet"  # imagenet, random, or a weights file
    val: str | None = None  # a separate validation folder; else a seeded split of `data`
    val_fraction: float = 0.2
    epochs: int = 10
    batch_size: int = 32
    cutoff: int | str | None = None  # freeze the first N parameter-holding layers, or up to a layer name
    optimizer: str = "adam"
    lr: float = 1e-3  # the new head's rate, and every layer's when training from random weights
    # Layers that start from trained weights learn at this fraction of lr. Adam at 1e-3 on every
    # layer of the ImageNet SqueezeNet killed up to 94% of its last fire module's channels within
    # an epoch on handwritten digits (validation at chance for some seeds); README, "The fine-tuning recipe".
    pretrained_lr_scale: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd and rmsprop
    nesterov: bool = False  # sgd
    schedule: str = "none"  # none, cosine (to 0 over the epochs), step (x gamma every step_size epochs)
    step_size: int = 10
    gamma: float = 0.1
    snapshot_every: int = 1
    image_size: int | None = None  # default: the model's own input size
    in_chans: int = 3  # input bands of a model built from its name (timm's in_chans); a snapshot keeps its own
    img_size: int | None = None  # the size a vision transformer is built for (timm's img_size)
    augment: bool = True
    seed: int = 0
    # How to run; these may change when resuming.
    out: str | None = None
    device: str = "auto"
    workers: int | None = None  # DataLoader worker processes; default: see loop.default_workers
    nproc: int = 1  # training processes on this machine (DistributedDataParallel); see distributed.py
    amp: bool = True  # mixed precision (CUDA only)
    channels_last: bool = True  # (CUDA only)
    tensorboard: bool = False
    quiet: bool = False
    force: bool = False
    resume: str | None = None


# Options that only change how a run executes, not what it trains: a resume may set them anew.
RESUMABLE = {"epochs", "batch_size", "snapshot_every", "device", "workers", "nproc", "amp", "channels_last",
             "tensorboard", "quiet"}
# Options about this invocation, not the run: run.json and snapshots do not record them.
NOT_STORED = {"out", "force", "resume", "quiet", "nproc"}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def check_keys(keys, source: str) -> None:
    """A clear error for the first name in KEYS that is not a TrainConfig field; SOURCE says where it came from."""
    for k in keys:
        if k not in _FIELDS:
            raise FeatureshiftError(f"Unknown training option '{k}' in {source}.{did_you_mean(k, _FIELDS)} "
                                    f"Options: {', '.join(_FIELDS)}.")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a TOML file: top-level keys (or a [train] table) named like TrainConfig's fields."""
    import tomllib

    path = Path(path)
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatureshiftError(f"The config file {path} does not exist.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
        raise FeatureshiftError(f"The config file {path} is not valid TOML ({e}).") from e
    if isinstance(d.get("train"), dict):
        d = d["train"]
    d = {k.replace("-", "_"): v for k, v in d.items()}
    check_keys(d, str(path))
    # relative paths in the file are relative to the file, not to where the command runs
    for k in ("data", "val", "out", "resume"):
        if isinstance(d.get(k), str) and not Path(d[k]).is_absolute():
            d[k] = str(path.parent / d[k])
    for k in ("model", "weights"):
        if isinstance(d.get(k), str) and (path.parent / d[k]).exists() and not Path(d[k]).is_absolute():
            d[k] = str(path.parent / d[k])
    return d


def make_config(config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None,
                **overrides: Any) -> TrainConfig:
    """A validated TrainConfig from a TrainConfig, a dict, or a TOML file path, plus keyword overrides."""
    if config is None:
        base: dict[str, Any] = {}
    elif isinstance(config, TrainConfig):
        base = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        base = {k.replace("-", "_"): v for k, v in config.items()}
        check_keys(base, "the configuration")
    else:
        base = load_config_file(config)
    check_keys(overrides, "the arguments")
    base.update({k: v for k, v in overrides.items()})
    cfg = TrainConfig(**base)
    validate(cfg)
    return cfg


def validate(c: TrainConfig) -> None:
    """Check C's values and normalize them in place (numbers to their types, names to lower case,
    a cutoff given as text to a number or None); a clear error for the first bad one."""
    def bad(msg):
        raise FeatureshiftError(msg)

    def num(name, kind, lo=None, allow_none=False):
        v = getattr(c, name)
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
            bad(f"The option {name} must be {'a number' if kind is float else 'a whole number'}, not {v!r}.")
        setattr(c, name, kind(v))
        if lo is not None and getattr(c, name) < lo:
            bad(f"The option {name} must be at least {lo}, not {v}.")

    num("epochs", int, 0)
    num("batch_size", int, 1)
    num("snapshot_every", int, 1)
    num("step_size", int, 1)
    num("seed", int)
    num("image_size", int, MIN_IMAGE_SIZE, allow_none=True)
    num("in_chans", int, 1)
    num("img_size", int, MIN_IMAGE_SIZE, allow_none=True)
    num("workers", int, 0, allow_none=True)
    num("nproc", int, 1)
    for name in ("lr", "pretrained_lr_scale", "weight_decay", "momentum", "gamma", "val_fraction"):
        num(name, float, 0.0)
    if c.batch_size % c.nproc:
        bad(f"--batch-size is the global batch, split among the --nproc {c.nproc} processes: give a multiple of "
            f"{c.nproc}, not {c.batch_size}.")
    if c.lr <= 0:
        bad(f"The learning rate must be above 0, not {c.lr}.")
    if c.pretrained_lr_scale <= 0:
        bad(f"--pretrained-lr-scale must be above 0, not {c.pretrained_lr_scale}; to keep layers from training, "
            "freeze them with --cutoff.")
    if not 0 <= c.val_fraction < 1:
        bad(f"--val-fraction must be at least 0 and below 1, not {c.val_fraction}.")
    c.optimizer, c.schedule = str(c.optimizer).lower(), str(c.schedule).lower()
    if c.optimizer not in OPTIMIZERS:
        bad(f"Unknown optimizer '{c.optimizer}'.{did_you_mean(c.optimizer, OPTIMIZERS)} Choose among {', '.join(OPTIMIZERS)}.")
    if c.schedule not in SCHEDULES:
        bad(f"Unknown schedule '{c.schedule}'.{did_you_mean(c.schedule, SCHEDULES)} Choose among {', '.join(SCHEDULES)}.")
    if isinstance(c.cutoff, str):
        s = c.cutoff.strip()
        c.cutoff = None if s.lower() in ("", "none") else int(s) if s.isdigit() else s
    if isinstance(c.cutoff, bool) or (c.cutoff is not None and not isinstance(c.cutoff, (int, str))):
        bad(f"--cutoff must be a number of layers or a layer name, not {c.cutoff!r}.")
    if isinstance(c.cutoff, int) and c.cutoff < 0:
        bad(f"--cutoff must be 0 or more layers, not {c.cutoff}.")
    if c.resume is None and not c.data:
        bad("No training data: give --data DIR, a folder with one sub-folder of images per class.")


def stored_config(c: TrainConfig) -> dict[str, Any]:
    """The options run.json and the snapshots record: what the run trains, not how it was invoked."""
    return {k: v for k, v in dataclasses.asdict(c).items() if k not in NOT_STORED}


def changed_options(c: TrainConfig) -> dict[str, Any]:
    """C's options that differ from their defaults."""
    return {k: v for k, v in dataclasses.asdict(c).items() if v != _FIELDS[k].default}


def lr_at(c: TrainConfig, epoch: int) -> float:
    """The learning rate during `epoch` (1-based). A pure function of the epoch, so resuming needs no scheduler state."""
    if c.schedule == "cosine":
        return c.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(1, c.epochs)))
    if c.schedule == "step":
        return c.lr * c.gamma ** ((epoch - 1) // c.step_size)
    return c.lr
