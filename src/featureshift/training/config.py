"""The options of a training run: TrainConfig, TOML files, validation and the learning-rate schedule."""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..device import DEVICE_CHOICES, MAX_LOADER_WORKERS
from ..errors import FeatureshiftError, did_you_mean
from ..flags import flag

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("none", "cosine", "step")
MIN_IMAGE_SIZE = 16  # the smallest --image-size
WEIGHTS_HELP = "imagenet (download-and-cache; squeezenet1_1 works offline), random, or a weights file."


@dataclasses.dataclass
class TrainConfig:
    """Every option of a training run, with its default and its flag's help. The CLI and TOML files fill this."""

    data: str | None = flag(None, "Training images: a folder with one sub-folder of images per class.", metavar="DIR")
    model: str = flag("googlenet", "Model name (googlenet, inception_v3, vgg16, squeezenet1_1, resnet50, timm/...) "
                      "or a snapshot file to continue from.", metavar="NAME|SNAPSHOT")
    weights: str = flag("imagenet", "Starting weights: " + WEIGHTS_HELP, metavar="WEIGHTS")
    val: str | None = flag(None, "A separate validation folder (same class folders).", metavar="DIR",
                           default_text="split --data")
    val_fraction: float = flag(0.2, "Share of each class held out for validation by a seeded split that is the same "
                               "on every run and resume.")
    epochs: int = flag(10, "Epochs to train; 0 only saves the original network. With --resume: the new total.")
    batch_size: int = flag(32, "Images per step (with --nproc: of all processes together).")
    cutoff: int | str | None = flag(None, "Freeze the first N parameter-holding layers (forward order), or every layer "
                                    "up to and including LAYER (a name from `featureshift layers`).",
                                    metavar="N|LAYER", type=str, default_text="all layers train")
    optimizer: str = flag("adam", "The optimizer.", choices=OPTIMIZERS)
    lr: float = flag(1e-3, "Learning rate of the new classifier head, and of every layer with --weights random.")
    # Layers that start from trained weights learn at this fraction of lr. Adam at 1e-3 on every
    # layer of the ImageNet SqueezeNet killed up to 94% of its last fire module's channels within
    # an epoch on handwritten digits (validation at chance for some seeds); README, "The fine-tuning recipe".
    pretrained_lr_scale: float = flag(0.1, "Layers that start from trained weights learn at F x --lr: fine-tuning "
                                      "every layer at the head's rate wrecks the pretrained features (1 trains all "
                                      "at --lr; --cutoff freezes layers).", metavar="F")
    weight_decay: float = flag(0.0, "The optimizer's weight decay.")
    momentum: float = flag(0.9, "For sgd and rmsprop.")
    nesterov: bool = flag(False, "Nesterov momentum for sgd.")
    schedule: str = flag("none", "Learning-rate schedule: cosine decays to 0 over the epochs; step multiplies by "
                         "--gamma every --step-size epochs.", choices=SCHEDULES)
    step_size: int = flag(10, "Epochs between steps of the step schedule.")
    gamma: float = flag(0.1, "Factor of the step schedule.")
    snapshot_every: int = flag(1, "Save a snapshot every K epochs (and always before training and after the last "
                               "epoch).")
    image_size: int | None = flag(None, "Input size in pixels.", type=int, default_text="the model's own")
    # a snapshot keeps its own bands
    in_chans: int = flag(3, "Input bands of a model built from its name: 1 trains on grayscale images, 4 on RGBA "
                         "(timm models).")
    img_size: int | None = flag(None, "The image size a vision transformer is built for (timm's img_size).",
                                type=int, default_text="the model's own")
    augment: bool = flag(True, "Random crops and flips of training images (never of validation images).")
    seed: int = flag(0, "Seed of the split, initialization and data order; the same seed gives the same metrics on "
                     "CPU.")
    # How to run; these may change when resuming.
    out: str | None = flag(None, "Run folder to write.", metavar="DIR", default_text="runs/MODEL-DATA-TIME")
    device: str = flag("auto", f"{DEVICE_CHOICES}.", metavar="DEVICE")
    workers: int | None = flag(None, "Image-decoding worker processes; 0 decodes in the main process.", type=int,
                               default_text=f"with CUDA CPUs - 1, at most {MAX_LOADER_WORKERS}; on CPU 1, or 2 "
                                            "from 8 cores")
    nproc: int = flag(1, "Train in N processes on this machine, one per GPU (DistributedDataParallel; with --device "
                      "cpu they share the cores). --batch-size is then the global batch, split among them. Several "
                      "machines: torchrun (see the README).", metavar="N")
    amp: bool = flag(True, "Mixed precision on CUDA (bf16 where the GPU has it, else fp16).")
    channels_last: bool = flag(True, "channels_last memory format on CUDA.")
    tensorboard: bool = flag(False, "Also write TensorBoard scalars to RUN/tensorboard (needs `pip install "
                             "'featureshift[tensorboard]'`).", switch=True)
    quiet: bool = flag(False, "No progress bars or per-epoch lines (warnings and errors still go to stderr).",
                       short="-q", switch=True)
    force: bool = flag(False, "Replace a run already in --out.", switch=True)
    resume: str | None = flag(None, "Continue the run in this folder from its last finished epoch (with --epochs N: "
                              "extend it to N epochs).", metavar="RUN", path="folder")


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
