"""Fine-tuning with snapshots: the network before training and after every K epochs.

    from featureshift.train import train
    run = train(model="squeezenet1_1", data="flowers", epochs=20, cutoff="features.6", out="runs/a")

Everything a run needs to continue lives in its folder (see featureshift.run): the
state after the last finished epoch (weights, optimizer, RNG) is rewritten
atomically after every epoch, so a run killed at any moment loses at most the epoch
in progress and `train(resume=RUN)` picks it up with the same data order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import os
import platform
import random
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from . import __version__
from .data import (ImageDataset, SeededShuffle, collate_skip, eval_transform, normalize_batch, scan_image_folder,
                   stratified_split, train_transform, transform_sizes)
from .errors import FeatureshiftError, did_you_mean
from .io import atomic_path
from .models.zoo import ModelInfo, attach_info, model_info, replace_head
from .run import (SNAPSHOT_DIR, STATE_FILE, describe_status, is_run, read_run, read_split, snapshot_path,
                  this_process, trainer_alive, write_metrics, write_run, write_split)
from .snapshot import build_from_state, save_snapshot

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("none", "cosine", "step")
RUN_FORMAT = "featureshift.run/1"
# torchvision's reference recipe weights the auxiliary classifiers' losses (1 head: inception_v3, 2: googlenet)
AUX_WEIGHT = {1: 0.4, 2: 0.3}


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
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd and rmsprop
    nesterov: bool = False  # sgd
    schedule: str = "none"  # none, cosine (to 0 over the epochs), step (x gamma every step_size epochs)
    step_size: int = 10
    gamma: float = 0.1
    snapshot_every: int = 1
    image_size: int | None = None  # default: the model's own input size
    augment: bool = True
    seed: int = 0
    # How to run; these may change when resuming.
    out: str | None = None
    device: str = "auto"
    workers: int | None = None  # DataLoader worker processes; default: see default_workers
    amp: bool = True  # mixed precision (CUDA only)
    channels_last: bool = True  # (CUDA only)
    tensorboard: bool = False
    quiet: bool = False
    force: bool = False
    resume: str | None = None


# Options that only change how a run executes, not what it trains: a resume may set them anew.
RESUMABLE = {"epochs", "batch_size", "snapshot_every", "device", "workers", "amp", "channels_last",
             "tensorboard", "quiet"}
_NOT_STORED = {"out", "force", "resume", "quiet"}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# --- configuration ---

def _check_keys(keys, source: str) -> None:
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
    _check_keys(d, str(path))
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
        _check_keys(base, "the configuration")
    else:
        base = load_config_file(config)
    _check_keys(overrides, "the arguments")
    base.update({k: v for k, v in overrides.items()})
    cfg = TrainConfig(**base)
    _validate(cfg)
    return cfg


def _validate(c: TrainConfig) -> None:
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
    num("image_size", int, 16, allow_none=True)
    num("workers", int, 0, allow_none=True)
    for name in ("lr", "weight_decay", "momentum", "gamma", "val_fraction"):
        num(name, float, 0.0)
    if c.lr <= 0:
        bad(f"The learning rate must be above 0, not {c.lr}.")
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


def lr_at(c: TrainConfig, epoch: int) -> float:
    """The learning rate during `epoch` (1-based). A pure function of the epoch, so resuming needs no scheduler state."""
    if c.schedule == "cosine":
        return c.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(1, c.epochs)))
    if c.schedule == "step":
        return c.lr * c.gamma ** ((epoch - 1) // c.step_size)
    return c.lr


# --- cutoff ---

@dataclasses.dataclass
class CutoffPlan:
    layers: list[tuple[str, str, int, bool]]  # (module name, type, parameters, frozen) in forward order
    frozen_norms: list[str]  # batch-norm modules kept in eval mode

    @property
    def frozen(self) -> list[str]:
        return [n for n, _, _, f in self.layers if f]

    def summary(self) -> dict[str, Any]:
        fz = [l for l in self.layers if l[3]]
        tr = [l for l in self.layers if not l[3]]
        return {"frozen_layers": len(fz), "trainable_layers": len(tr),
                "frozen_params": sum(l[2] for l in fz), "trainable_params": sum(l[2] for l in tr),
                "last_frozen": fz[-1][0] if fz else None, "first_trainable": tr[0][0] if tr else None}

    def table(self, cutoff) -> str:
        """A few lines: consecutive runs of frozen / trainable layers."""
        s = self.summary()
        total = s["frozen_params"] + s["trainable_params"]
        if not s["frozen_layers"]:
            head = f"all {len(self.layers)} parameter-holding layers train ({_millions(total)} parameters)"
        else:
            head = (f"cutoff {cutoff!r}: {s['frozen_layers']} of {len(self.layers)} parameter-holding layers frozen "
                    f"({_millions(s['frozen_params'])} of {_millions(total)} parameters)")
        runs: list[list] = []
        for name, _, n, frozen in self.layers:
            if runs and runs[-1][0] == frozen:
                runs[-1][2], runs[-1][3], runs[-1][4] = name, runs[-1][3] + 1, runs[-1][4] + n
            else:
                runs.append([frozen, name, name, 1, n])
        rows = [head]
        for frozen, first, last, count, n in runs:
            span = first if first == last else f"{first} ... {last}"
            rows.append(f"  {'frozen' if frozen else 'trainable':<10} {count:>4} layers {_millions(n):>7}  {span}")
        return "\n".join(rows)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def plan_cutoff(model: nn.Module, cutoff: int | str | None, size: int | None = None) -> CutoffPlan:
    """Which layers a cutoff freezes, in forward order (one traced forward pass).

    Own tracing rather than trace_layers: this needs every module that holds
    parameters (Linear heads too), and when each one is entered, not only 4-D outputs.
    """
    info = getattr(model, "featureshift_info", None)
    size = size or (info.input_size if info else 224)
    enter: dict[str, int] = {}
    leave: dict[str, int] = {}
    counter = [0]
    handles = []
    named = dict(model.named_modules())

    def pre(name):
        def fn(module, args):
            counter[0] += 1
            enter.setdefault(name, counter[0])
        return fn

    def post(name):
        def fn(module, args, out):
            counter[0] += 1
            leave[name] = counter[0]
        return fn

    for name, m in named.items():
        handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    except RuntimeError as e:
        raise FeatureshiftError(f"The network could not run on a {size}x{size} image ({str(e).splitlines()[0]}). "
                                "Use a larger --image-size.") from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    def own_params(m):
        return sum(p.numel() for p in m.parameters(recurse=False))

    holders = [n for n, m in named.items() if own_params(m)]
    # Modules never called in eval mode (inception's auxiliary head) come last: they are heads.
    order = {n: i for i, n in enumerate(named)}
    holders.sort(key=lambda n: (enter.get(n, math.inf), order[n]))
    if cutoff is None or cutoff == 0:
        threshold, frozen = -math.inf, set()
    elif isinstance(cutoff, int):
        if cutoff > len(holders):
            raise FeatureshiftError(f"--cutoff {cutoff} is more than the {len(holders)} parameter-holding layers "
                                    f"of this network. Give at most {len(holders) - 1}, or a layer name.")
        frozen = set(holders[:cutoff])
        threshold = enter.get(holders[cutoff], math.inf) if cutoff < len(holders) else math.inf
    else:
        if cutoff not in named or not cutoff:
            from .models.layers import trace_layers

            candidates = [l.name for l in trace_layers(model, size)] + holders
            raise FeatureshiftError(f"--cutoff '{cutoff}' is not a layer of this network.{did_you_mean(cutoff, candidates)} "
                                    "`featureshift layers MODEL` lists the names; or give a number of layers.")
        if cutoff not in leave:
            raise FeatureshiftError(f"--cutoff '{cutoff}' names a layer that does not run in the forward pass "
                                    "(an auxiliary head); give a layer of the main path.")
        limit = leave[cutoff]
        frozen = {n for n in holders if enter.get(n, math.inf) < limit}
        threshold = limit
    layers = [(n, type(named[n]).__name__, own_params(named[n]), n in frozen) for n in holders]
    norms = [n for n, m in named.items() if _is_norm(m)
             and (n in frozen or (not own_params(m) and enter.get(n, math.inf) < threshold))]
    return CutoffPlan(layers=layers, frozen_norms=norms)


def apply_cutoff(model: nn.Module, plan: CutoffPlan) -> None:
    modules = dict(model.named_modules())
    for name in plan.frozen:
        for p in modules[name].parameters(recurse=False):
            p.requires_grad_(False)


def set_train_mode(model: nn.Module, plan: CutoffPlan) -> None:
    """Train mode, except frozen batch-norm layers: their running statistics must not move."""
    model.train()
    modules = dict(model.named_modules())
    for name in plan.frozen_norms:
        modules[name].eval()


# --- pieces of the loop ---

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise FeatureshiftError(f"Unknown device '{name}'. Use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatureshiftError(f"--device {name}: no CUDA GPU is visible to PyTorch here. Use --device cpu (or auto).")
    if dev.type not in ("cpu", "cuda"):
        raise FeatureshiftError(f"--device {name} is not supported; use auto, cpu, cuda or cuda:N.")
    return dev


def default_workers(device: torch.device) -> int:
    """DataLoader worker processes. On CPU the network's own threads use every core and decoding is
    5-12% of a step, so one or two (persistent) workers overlap it without crowding the cores
    (benchmarks/train_speed.py on 2 cores: 0.94x a plain in-memory loop with one worker, 0.88x with none);
    a GPU leaves the cores to decoding."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return min(8, max(1, cpus - 1))
    return min(2, max(1, cpus // 4)) if cpus > 1 else 0


def make_optimizer(c: TrainConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    if c.optimizer == "adam":
        return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
    if c.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    if c.optimizer == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0,
                               weight_decay=c.weight_decay)
    return torch.optim.RMSprop(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)


def _split_outputs(out) -> tuple[torch.Tensor, list[torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return out, []
    return out[0], [o for o in out[1:] if isinstance(o, torch.Tensor)]


def _rng_state(loader_gen: torch.Generator) -> dict[str, Any]:
    # plain types and tensors only, so the file loads with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "loader": loader_gen.get_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict[str, Any], loader_gen: torch.Generator) -> None:
    torch.set_rng_state(s["torch"])
    loader_gen.set_state(s["loader"])
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import PIL
    import torchvision

    return {"featureshift": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
            "platform": platform.platform()}


def _warn(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"featureshift: warning: {msg}", file=sys.stderr)


def _warn_skipped(skipped: list[tuple[Any, str]]) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{p} ({why})" for p, why in skipped[:10])
    more = f"; and {len(skipped) - 10} more (all listed in run.json)" if len(skipped) > 10 else ""
    _warn(f"skipping {len(skipped)} file(s) that are not usable images: {shown}{more}")


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise FeatureshiftError(
            "--tensorboard needs the tensorboard package, which is not installed. Install it with "
            "`pip install 'featureshift[tensorboard]'`, or leave out --tensorboard (metrics.jsonl has the same numbers)."
        ) from e
    return SummaryWriter


class _Tensorboard:
    def __init__(self, run_dir: Path, start_epoch: int):
        SummaryWriter = _summary_writer()
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_epoch + 1 if start_epoch else None)

    def log(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and v is not None:
                self.writer.add_scalar(k, v, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# --- the trainer ---

class _Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, on_epoch_end: Callable | None,
                 on_snapshot: Callable | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.on_epoch_end = on_epoch_end
        self.on_snapshot = on_snapshot
        if cfg.tensorboard:
            _summary_writer()  # fail before anything is written
        self.device = resolve_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = None
        if self.cuda and cfg.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loader_gen = torch.Generator()
        self.history: list[dict[str, Any]] = []
        self.parent: str | None = None
        self.skipped_in_training: dict[str, str] = {}
        self.tb: _Tensorboard | None = None

    # set-up shared by a fresh run and a resume
    def prepare(self, model: nn.Module, info: ModelInfo, train, val, classes) -> None:
        cfg = self.cfg
        self.model, self.info, self.classes = model, info, classes
        self.train_samples, self.val_samples = train, val
        self.plan = plan_cutoff(model, cfg.cutoff, cfg.image_size)
        if cfg.epochs > 0 and not any(not f for *_, f in self.plan.layers):
            raise FeatureshiftError(f"--cutoff {cfg.cutoff!r} freezes every layer, so nothing would train. "
                                    "Give a smaller cutoff (the classifier must stay trainable).")
        apply_cutoff(model, self.plan)
        self.model = model.to(self.device)
        if self.cuda and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(cfg, (p for p in model.parameters() if p.requires_grad))
        size, resize = transform_sizes(info, cfg.image_size)
        self.workers = workers = cfg.workers if cfg.workers is not None else default_workers(self.device)
        # Persistent workers: starting them anew every epoch cost about 10% of a small epoch on 2 cores.
        # The DataLoader draws their base seed from `generator` whenever workers start (once, or again
        # on resume): a throwaway one keeps that out of the training RNG streams. Augmentation is
        # seeded per sample by SeededShuffle instead.
        common = dict(batch_size=cfg.batch_size, num_workers=workers, collate_fn=collate_skip,
                      pin_memory=self.cuda, persistent_workers=workers > 0, generator=torch.Generator())
        # uint8 from the workers, normalized on the device (see _to_device)
        tf = (train_transform if cfg.augment else eval_transform)(info, cfg.image_size, normalize=False)
        self.train_loader = torch.utils.data.DataLoader(
            ImageDataset(train, tf, min_size=2 * size if cfg.augment else resize, skip_bad=True),
            sampler=SeededShuffle(len(train), self.loader_gen),
            # a last batch of one image breaks batch-norm in train mode
            drop_last=len(train) % cfg.batch_size == 1, **common)
        self.val_loader = torch.utils.data.DataLoader(
            ImageDataset(val, eval_transform(info, cfg.image_size, normalize=False), min_size=resize, skip_bad=True),
            shuffle=False, **common) if val else None

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _bars(self):
        return not self.cfg.quiet

    def _note_bad(self, bad) -> None:
        new = [(p, why) for p, why in bad if p not in self.skipped_in_training]
        for p, why in new:
            self.skipped_in_training[p] = why
        _warn_skipped(new)

    def _to_device(self, x, y):
        x = normalize_batch(x.to(self.device, non_blocking=True), self.info)
        if self.cuda and self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def evaluate(self) -> tuple[float | None, float | None]:
        if self.val_loader is None:
            return None, None
        from tqdm import tqdm

        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        n = 0
        with torch.inference_mode():
            for x, y, bad in tqdm(self.val_loader, desc="validate", leave=False, disable=not self._bars(),
                                  unit="batch", file=sys.stderr):
                self._note_bad(bad)
                if x is None:
                    continue
                x, y = self._to_device(x, y)
                with self.autocast():
                    logits, _ = _split_outputs(self.model(x))
                loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
                correct += (logits.argmax(1) == y).sum()
                n += len(y)
        if not n:
            return None, None
        return float(loss_sum) / n, int(correct) / n

    def train_epoch(self, epoch: int) -> tuple[float | None, float | None, int]:
        from tqdm import tqdm

        cfg = self.cfg
        set_train_mode(self.model, self.plan)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        n = 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False, disable=not self._bars(), unit="batch",
                   file=sys.stderr)
        for i, (x, y, bad) in enumerate(bar):
            self._note_bad(bad)
            if x is None:
                continue
            x, y = self._to_device(x, y)
            try:
                with self.autocast():
                    logits, aux = _split_outputs(self.model(x))
                    loss = nn.functional.cross_entropy(logits, y)
                    main_loss = loss.detach()
                    if aux:
                        loss = loss + AUX_WEIGHT.get(len(aux), 0.3) * sum(nn.functional.cross_entropy(a, y) for a in aux)
            except RuntimeError as e:
                if n == 0 and "out of memory" not in str(e).lower():
                    raise FeatureshiftError(
                        f"The network could not train on {x.shape[-1]}px images ({str(e).splitlines()[0]}). "
                        "Use a larger --image-size."
                    ) from e
                raise
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += main_loss.double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            n += len(y)
            if self._bars() and (i % 5 == 0 or i == len(self.train_loader) - 1):
                bar.set_postfix(loss=f"{float(loss_sum) / n:.3f}", acc=f"{int(correct) / n:.3f}", refresh=False)
        if not n:
            return None, None, 0
        return float(loss_sum) / n, int(correct) / n, n

    # files
    def save_state(self, epoch: int) -> None:
        state = {
            "format": 1, "epoch": epoch,
            "model": {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": _rng_state(self.loader_gen), "parent": self.parent, "history": self.history,
            "skipped": [[p, why] for p, why in self.skipped_in_training.items()],
        }
        with atomic_path(self.run_dir / STATE_FILE) as tmp:
            torch.save(state, tmp)

    def snapshot(self, epoch: int, row: dict[str, Any]) -> None:
        meta = save_snapshot(self.model, snapshot_path(self.run_dir, epoch), epoch=epoch, metrics=row,
                             config=self.run["config"], parent=self.parent, info=self.info)
        self.parent = meta.checksum

    def write_run(self, **changes) -> None:
        self.run.update(changes, updated=_now())
        ds = self.run["dataset"]
        extra = [{"path": p, "reason": why} for p, why in self.skipped_in_training.items()
                 if p not in {s["path"] for s in ds["skipped"]}]
        ds["skipped"] += extra
        ds["skipped_count"] = len(ds["skipped"])
        write_run(self.run_dir, self.run)

    def summary_line(self, row: dict[str, Any], snap: bool) -> str:
        e = row["epoch"]
        parts = [f"epoch {e:>3}/{self.cfg.epochs}"]
        if e:
            parts.append(f"train loss {_fmt(row['train_loss'])} acc {_fmt(row['train_acc'], '.3f')}")
        parts.append(f"val loss {_fmt(row['val_loss'])} acc {_fmt(row['val_acc'], '.3f')}")
        if row.get("lr") is not None:
            parts.append(f"lr {row['lr']:.2e}")
        parts.append(f"{row['seconds']:.1f}s")
        if snap:
            parts.append(f"-> {SNAPSHOT_DIR}/{e:03d}")
        return "  ".join(parts)

    def finish_epoch(self, row: dict[str, Any], bar) -> None:
        """Snapshot (every K epochs and the last), then state, then logs: each step atomic, in an order
        where a kill between two steps leaves a consistent, resumable run."""
        e = row["epoch"]
        self.history.append(row)
        snap = e % self.cfg.snapshot_every == 0 or e == self.cfg.epochs
        if snap:
            self.snapshot(e, row)
        self.save_state(e)
        write_metrics(self.run_dir, self.history)
        self.write_run(epochs_done=e)
        if self.tb:
            self.tb.log(row)
        if not self.cfg.quiet:
            bar.write(self.summary_line(row, snap), file=sys.stderr)
        if self.on_epoch_end is not None:
            self.on_epoch_end(e, dict(row))
        if snap and self.on_snapshot is not None:
            self.on_snapshot(e, snapshot_path(self.run_dir, e))

    def loop(self, start: int) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        if cfg.tensorboard:
            self.tb = _Tensorboard(self.run_dir, start)
        bar = tqdm(total=cfg.epochs, initial=start, desc="training", unit="epoch", disable=not self._bars(),
                   file=sys.stderr)
        try:
            if start == 0 and not self.history:
                t = time.perf_counter()
                vl, va = self.evaluate()
                self.finish_epoch({"epoch": 0, "train_loss": None, "train_acc": None, "val_loss": vl, "val_acc": va,
                                   "lr": None, "seconds": round(time.perf_counter() - t, 3), "train_seconds": 0.0}, bar)
            for epoch in range(start + 1, cfg.epochs + 1):
                t = time.perf_counter()
                lr = lr_at(cfg, epoch)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                tl, ta, n = self.train_epoch(epoch)
                train_seconds = time.perf_counter() - t
                vl, va = self.evaluate()
                row = {"epoch": epoch, "train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": va, "lr": lr,
                       "seconds": round(time.perf_counter() - t, 3), "train_seconds": round(train_seconds, 3),
                       "train_images": n}
                self.finish_epoch(row, bar)
                bar.update(1)
        except torch.OutOfMemoryError as e:
            self.write_run(status="failed", error="out of GPU memory")
            raise FeatureshiftError(
                f"The GPU ran out of memory at batch size {cfg.batch_size}. Use a smaller batch size, e.g. "
                f"`featureshift train --resume {self.run_dir} --batch-size {max(1, cfg.batch_size // 2)}` (the run keeps "
                f"every finished epoch), or a smaller --image-size."
            ) from e
        except KeyboardInterrupt:
            self.write_run(status="interrupted")
            _warn(f"training interrupted; every finished epoch is saved. Continue with "
                  f"`featureshift train --resume {self.run_dir}`.")
            raise
        except BaseException as e:
            self.write_run(status="failed", error=f"{e.__class__.__name__}: {e}"[:500])
            raise
        finally:
            bar.close()
            if self.tb:
                self.tb.close()
        self.write_run(status="finished", error=None)


def _stored_config(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_STORED}


def _abs(p: str | None) -> str | None:
    return str(Path(p).expanduser().resolve()) if p else p


def _check_out(cfg: TrainConfig) -> Path:
    """The run folder to write; refuses one that holds another run, before anything is written."""
    if cfg.out:
        out = Path(cfg.out).expanduser()
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{Path(cfg.model).stem}-{Path(cfg.data).resolve().name}-{stamp}"
    data = Path(cfg.data).resolve()
    if out.resolve() == data or data in out.resolve().parents:
        raise FeatureshiftError(f"--out {out} is inside the dataset folder {data}; its files would become a class. "
                                "Choose an --out folder outside the data.")
    if out.exists() and not out.is_dir():
        raise FeatureshiftError(f"--out {out} is a file; give a folder.")
    if not is_run(out):
        return out
    try:
        r = read_run(out)
    except FeatureshiftError:
        r = None
    if cfg.force:
        _refuse_if_training(r or {}, out, "--force replacing it")
        return out
    what = "" if r is None else (f" ({r.get('model', {}).get('arch', '?')} on {r.get('dataset', {}).get('root', '?')}, "
                                 f"{r.get('epochs_done', 0)} epochs, {describe_status(r)})")
    raise FeatureshiftError(
        f"{out} already holds a training run{what}. Continue it with `featureshift train --resume {out}`, "
        f"replace it with --force, or choose another --out folder."
    )


def _clear_run(out: Path) -> None:
    """--force: remove the files of the run that was there (only files featureshift writes)."""
    for name in ("run.json", "metrics.jsonl", "split.json", STATE_FILE):
        (out / name).unlink(missing_ok=True)
    for p in (out / SNAPSHOT_DIR).glob("*.safetensors"):
        p.unlink()
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


def _fresh(cfg: TrainConfig, on_epoch_end, on_snapshot=None) -> Path:
    from . import load

    cfg.data, cfg.val = _abs(cfg.data), _abs(cfg.val)
    for k in ("model", "weights"):
        v = getattr(cfg, k)
        if Path(v).exists():
            setattr(cfg, k, _abs(v))
    run_dir = _check_out(cfg)
    trainer = _Trainer(cfg, run_dir, on_epoch_end, on_snapshot)
    _seed_all(cfg.seed)
    trainer.loader_gen.manual_seed(cfg.seed)

    index = scan_image_folder(cfg.data, progress=not cfg.quiet)
    skipped = list(index.skipped)
    if cfg.val:
        vindex = scan_image_folder(cfg.val, progress=not cfg.quiet, classes=index.classes)
        skipped += vindex.skipped
        train, val = index.samples, vindex.samples
        if not val:
            raise FeatureshiftError(f"The validation folder {cfg.val} has no readable images.")
    else:
        train, val = stratified_split(index.samples, cfg.val_fraction, cfg.seed)
    _warn_skipped(skipped)

    model, source_meta = load(cfg.model, weights=cfg.weights)
    info = model_info(model)
    if list(info.class_names) != index.classes:
        replace_head(model, len(index.classes))
    info = dataclasses.replace(info, num_classes=len(index.classes), class_names=list(index.classes))
    attach_info(model, info)
    trainer.parent = source_meta.checksum if source_meta else None
    trainer.prepare(model, info, train, val, index.classes)

    counts = {c: {"train": 0, "val": 0} for c in index.classes}
    for part, samples in (("train", train), ("val", val)):
        for _, ci in samples:
            counts[index.classes[ci]][part] += 1
    trainer.run = {
        "format": RUN_FORMAT, "status": "running", "trainer": this_process(), "created": _now(), "updated": _now(),
        "epochs_done": 0,
        "config": _stored_config(cfg),
        "model": info.to_dict(),
        "source": {"model": cfg.model, "weights": cfg.weights, "parent": trainer.parent},
        "dataset": {
            "root": cfg.data, "val_root": cfg.val,
            "split": "folder" if cfg.val else f"seeded stratified split: {cfg.val_fraction:g} of each class, seed {cfg.seed}",
            "classes": index.classes, "counts": counts, "train_images": len(train), "val_images": len(val),
            "skipped": [{"path": str(p), "reason": why} for p, why in skipped], "skipped_count": len(skipped),
        },
        "cutoff": {"value": cfg.cutoff, **trainer.plan.summary(), "frozen": trainer.plan.frozen,
                   "frozen_batchnorm": trainer.plan.frozen_norms},
        "device": str(trainer.device), "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else None,
        "workers": trainer.workers, "versions": _versions(),
        "sessions": [{"started": _now(), "from_epoch": 0, "to_epoch": cfg.epochs}],
    }
    # Every check has passed: only now is anything written or replaced.
    if cfg.force:
        _clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_split(run_dir, index.classes, train, val)
    write_run(run_dir, trainer.run)
    if not cfg.quiet:
        _info(trainer.plan.table(cfg.cutoff))
        _info(f"{len(index.classes)} classes, {len(train)} training and {len(val)} validation images; "
              f"device {trainer.device}; run folder {run_dir}")
    trainer.loop(0)
    return run_dir


def _info(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def _refuse_if_training(run: dict[str, Any], run_dir: Path, what: str) -> None:
    """Two processes writing one run folder would interleave its snapshots and logs."""
    if trainer_alive(run) and run["trainer"]["pid"] != os.getpid():
        raise FeatureshiftError(
            f"{run_dir} is being trained right now by process {run['trainer']['pid']}; {what} would write into the "
            f"same folder. Wait for it to finish, or stop it first (Ctrl-C, or `kill {run['trainer']['pid']}`).")


def _resume(cfg_overrides: dict[str, Any], run_dir: Path, on_epoch_end, on_snapshot=None) -> Path:
    run = read_run(run_dir)
    _refuse_if_training(run, run_dir, "resuming it")
    stored = run["config"]
    for k, v in cfg_overrides.items():
        if k in RESUMABLE or k in _NOT_STORED:
            continue
        if k in stored and stored[k] != v:
            raise FeatureshiftError(
                f"--resume continues a run with its own settings; '{k}' was {stored[k]!r} and cannot change to {v!r}. "
                f"Only {', '.join(sorted(RESUMABLE))} may change. Start a new run (another --out) to train differently."
            )
    merged = {**stored, **{k: v for k, v in cfg_overrides.items() if k in RESUMABLE}}
    cfg = make_config(merged, quiet=cfg_overrides.get("quiet", False), resume=str(run_dir), out=str(run_dir))
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise FeatureshiftError(
            f"The run {run_dir} has no {STATE_FILE}, so it cannot be resumed (it was stopped before its first "
            "snapshot). Start it again with --force."
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatureshiftError(f"{state_path} could not be read ({e.__class__.__name__}: {e}). "
                                "Start the run again with --force.") from e
    done = int(state["epoch"])
    history = [r for r in state["history"] if r["epoch"] <= done]
    if cfg.epochs < done:
        raise FeatureshiftError(f"The run {run_dir} has already trained {done} epochs; --epochs {cfg.epochs} would "
                                f"shorten it. Give --epochs {done} or more.")
    if cfg.epochs == done:
        if not cfg.quiet:
            _info(f"The run {run_dir} has finished all {done} epochs; nothing to do. "
                  f"Extend it with `featureshift train --resume {run_dir} --epochs N`.")
        # A kill between saving the state and updating run.json leaves these a step behind the state.
        write_metrics(run_dir, history)
        run.update(status="finished", epochs_done=done, updated=_now())
        write_run(run_dir, run)
        return run_dir

    info = ModelInfo.from_dict(run["model"])
    model = attach_info(build_from_state(info, state["model"], state_path), info)
    classes, train, val = read_split(run_dir)
    missing = [(p, "missing since the run started") for p, _ in train + val if not p.exists()]
    if missing:
        _warn_skipped(missing)
        gone = {p for p, _ in missing}
        train, val = [s for s in train if s[0] not in gone], [s for s in val if s[0] not in gone]
        if not train:
            raise FeatureshiftError(f"None of the training images of {run_dir} exist any more (was {run['dataset']['root']} "
                                    "moved?). Put the dataset back where it was to resume.")
    trainer = _Trainer(cfg, run_dir, on_epoch_end, on_snapshot)
    trainer.prepare(model, info, train, val, classes)
    trainer.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"], trainer.loader_gen)
    trainer.history = history
    trainer.parent = state["parent"]
    trainer.skipped_in_training = {p: why for p, why in state.get("skipped", [])}
    run["config"] = _stored_config(cfg)
    run.setdefault("sessions", []).append({"started": _now(), "from_epoch": done, "to_epoch": cfg.epochs})
    run.update(status="running", trainer=this_process(), device=str(trainer.device), workers=trainer.workers,
               error=None)
    trainer.run = run
    if missing:
        run["dataset"]["skipped"] += [{"path": str(p), "reason": why} for p, why in missing]
    write_metrics(run_dir, trainer.history)  # drop rows of an epoch that was in progress
    trainer.write_run()
    if not cfg.quiet:
        _info(f"resuming {run_dir} after epoch {done}, training to epoch {cfg.epochs}")
    trainer.loop(done)
    return run_dir


def train(config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None, *,
          on_epoch_end: Callable[[int, dict], None] | None = None,
          on_snapshot: Callable[[int, Path], None] | None = None, **options: Any) -> Path:
    """Fine-tune a network with snapshots; returns the run folder.

    config: a TrainConfig, a dict, or a TOML file; keyword options override it
    (names as TrainConfig's fields: data, model, weights, epochs, cutoff, lr, out, ...).
    resume=RUN continues RUN from its last finished epoch (epochs=N extends it).
    on_epoch_end(epoch, metrics) is called after each epoch's files are written;
    on_snapshot(epoch, path) after an epoch that wrote a snapshot (train --visualize uses it).
    """
    if config is None and options.get("resume"):
        _check_keys(options, "the arguments")
        run_dir = Path(options.pop("resume"))
        out = options.pop("out", None)
        if out and Path(out).resolve() != run_dir.resolve():
            raise FeatureshiftError(f"--resume {run_dir} writes to its own folder; leave out --out {out}.")
        options.pop("force", None)
        return _resume(options, run_dir, on_epoch_end, on_snapshot)
    cfg = make_config(config, **options)
    if cfg.resume:
        given = {k: v for k, v in dataclasses.asdict(cfg).items() if v != _FIELDS[k].default}
        return train(on_epoch_end=on_epoch_end, on_snapshot=on_snapshot, **given)
    return _fresh(cfg, on_epoch_end, on_snapshot)


class _CallableModule(types.ModuleType):
    """`featureshift.train(...)` calls train() while `featureshift.train.train`, `TrainConfig`, ...
    stay reachable: exporting the function under the module's own name would hide the module."""

    def __call__(self, *args, **kwargs) -> Path:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
