"""The training loop's pieces as plain functions, in the style of torchvision's classification
reference: make_optimizer, make_loaders, train_one_epoch and evaluate take what they use as arguments
and return named records; the session (session.py) strings them together and keeps the books.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Sequence

import torch
from torch import nn

from ..data import (ImageDataset, Sample, SeededShuffle, ShardedSeededBatches, collate_skip, eval_transform,
                     normalize_batch, train_transform, transform_sizes)
from ..device import autocast
from ..errors import FeatureshiftError
from ..models.info import ModelInfo
from .config import TrainConfig
from .cutoff import CutoffPlan, set_train_mode

# torchvision's reference recipe weights the auxiliary classifiers' losses (1 head: inception_v3, 2: googlenet)
AUX_WEIGHT = {1: 0.4, 2: 0.3}

BadFiles = Callable[[list[tuple[str, str]]], None]  # called with [(path, why)] of files a batch could not read


@dataclasses.dataclass(frozen=True)
class Stats:
    """Mean loss of the main classifier and accuracy over some images: an epoch's training images,
    or the validation images. loss and acc are None when there were none (or none could be read)."""

    loss: float | None
    acc: float | None
    images: int = 0


@dataclasses.dataclass
class Loaders:
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader | None  # None without validation images


def make_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling, which only float16 needs (bfloat16 has float32's range)."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def param_groups(model: nn.Module, new_layers: Sequence[str] | None, pretrained_lr_scale: float) -> list[dict]:
    """MODEL's trainable parameters as optimizer groups, each with its learning rate as a fraction
    of --lr ("lr_scale"): the NEW_LAYERS (the replaced head; None: every layer, as with random
    weights) at 1, layers that start from trained weights at PRETRAINED_LR_SCALE. One group
    where the rates are all the same, as runs made before the scale existed have."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if new_layers is None or pretrained_lr_scale == 1:
        return [{"params": [p for _, p in trainable], "lr_scale": 1.0 if new_layers is None else pretrained_lr_scale}]

    def is_new(name: str) -> bool:
        return any(name == l or name.startswith(l + ".") for l in new_layers)

    new = [p for n, p in trainable if is_new(n)]
    old = [p for n, p in trainable if not is_new(n)]
    groups = [{"params": new, "lr_scale": 1.0}] if new else []
    return groups + ([{"params": old, "lr_scale": pretrained_lr_scale}] if old else [])


def make_optimizer(c: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer C names over GROUPS (param_groups), with its weight decay and momentum; set_lr
    sets each group's learning rate."""
    if c.optimizer == "adam":
        return torch.optim.Adam(groups, lr=c.lr, weight_decay=c.weight_decay)
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0,
                               weight_decay=c.weight_decay)
    return torch.optim.RMSprop(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate: LR (the schedule's, config.lr_at, a function of the
    epoch) times the group's lr_scale."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def make_loaders(train: Sequence[Sample], val: Sequence[Sample], info: ModelInfo, *, batch_size: int, workers: int,
                 loader_gen: torch.Generator, augment: bool = True, image_size: int | None = None,
                 pin_memory: bool = False, rank: int = 0, world: int = 1) -> Loaders:
    """Loaders of uint8 batches (to_device normalizes them on the device). The training order and every
    augmentation are drawn from LOADER_GEN (see data.SeededShuffle), whatever the number of WORKERS.

    With WORLD processes, BATCH_SIZE is the global batch: the loaders of process RANK give its part of
    each (data.ShardedSeededBatches) and every WORLD-th validation image."""
    size, resize = transform_sizes(info, image_size)
    # Persistent workers: starting them anew every epoch cost about 10% of a small epoch on 2 cores.
    # The DataLoader draws their base seed from `generator` whenever workers start (once, or again
    # on resume): a throwaway one keeps that out of the training RNG streams. Augmentation is
    # seeded per sample by SeededShuffle instead.
    common = dict(batch_size=batch_size, num_workers=workers, collate_fn=collate_skip,
                  pin_memory=pin_memory, persistent_workers=workers > 0, generator=torch.Generator())
    tf = (train_transform if augment else eval_transform)(info, image_size, normalize=False)
    train_set = ImageDataset(train, tf, min_size=2 * size if augment else resize, skip_bad=True,
                             channels=info.in_chans)
    if world > 1:
        common.pop("batch_size")
        train_loader = torch.utils.data.DataLoader(
            train_set, batch_sampler=ShardedSeededBatches(len(train), loader_gen, batch_size, rank, world), **common)
        common["batch_size"] = batch_size // world
        val = list(val)[rank::world]
    else:
        train_loader = torch.utils.data.DataLoader(
            train_set, sampler=SeededShuffle(len(train), loader_gen),
            # a last batch of one image breaks batch-norm in train mode
            drop_last=len(train) % batch_size == 1, **common)
    val_loader = torch.utils.data.DataLoader(
        ImageDataset(val, eval_transform(info, image_size, normalize=False), min_size=resize, skip_bad=True,
                     channels=info.in_chans),
        shuffle=False, **common) if val else None
    return Loaders(train_loader, val_loader)


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, info: ModelInfo,
              channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 batch from make_loaders as the network's normalized input on DEVICE, and its labels."""
    x = normalize_batch(x.to(device, non_blocking=True), info)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def split_outputs(out) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main logits, auxiliary logits): googlenet and inception_v3 return their auxiliary heads in train mode."""
    if isinstance(out, torch.Tensor):
        return out, []
    return out[0], [o for o in out[1:] if isinstance(o, torch.Tensor)]


def _sum_dtype(device: torch.device) -> torch.dtype:
    # Sums of a whole epoch in float64 where the device has it; Apple's MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


@dataclasses.dataclass
class StepLoss:
    logits: torch.Tensor  # the main head's output
    loss: torch.Tensor  # what is backpropagated: the main loss plus the auxiliary heads' (AUX_WEIGHT)
    main: torch.Tensor  # the main loss alone, detached: what is reported


def forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module, device: torch.device,
                 amp_dtype: torch.dtype | None = None) -> StepLoss:
    """The forward pass and loss of one training batch, as training and its pre-check run it."""
    with autocast(device, amp_dtype):
        logits, aux = split_outputs(model(x))
        loss = criterion(logits, y)
        main = loss.detach()
        if aux:
            loss = loss + AUX_WEIGHT.get(len(aux), 0.3) * sum(criterion(a, y) for a in aux)
    return StepLoss(logits, loss, main)


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, *, info: ModelInfo,
                    plan: CutoffPlan | None = None, scaler: torch.amp.GradScaler | None = None,
                    amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                    on_bad: BadFiles | None = None, progress: bool = True,
                    loss_scale: Callable[[int, int], float] | None = None) -> Stats:
    """Train MODEL for one pass over LOADER (batches from make_loaders).

    plan: the cutoff, whose frozen batch-norm layers stay in eval mode. Auxiliary classifiers
    add their loss with torchvision's weights (AUX_WEIGHT); the loss reported is the main one.
    on_bad is called with the files a batch could not read.
    loss_scale(batch index, images in the batch): a factor on the loss that is backpropagated
    (DistributedDataParallel averages the ranks' gradients, which weighs unequal parts of a
    batch wrongly; see distributed.Group.loss_scale).
    """
    from tqdm import tqdm

    if plan is not None:
        set_train_mode(model, plan)
    else:
        model.train()
    scaler = scaler or make_scaler(None)
    sum_dtype = _sum_dtype(device)
    loss_sum = torch.zeros((), device=device, dtype=sum_dtype)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n = 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress, unit="batch", file=sys.stderr)
    for i, (x, y, bad) in enumerate(bar):
        if bad and on_bad is not None:
            on_bad(bad)
        if x is None:
            continue
        x, y = to_device(x, y, device, info, channels_last)
        try:
            step = forward_loss(model, x, y, criterion, device, amp_dtype)
            logits, loss, main_loss = step.logits, step.loss, step.main
        except RuntimeError as e:
            if n == 0 and "out of memory" not in str(e).lower():
                raise FeatureshiftError(
                    f"The network could not train on {x.shape[-1]}px images ({str(e).splitlines()[0]}). "
                    "Use a larger --image-size."
                ) from e
            raise
        if loss_scale is not None:
            loss = loss * loss_scale(i, len(y))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += main_loss.to(sum_dtype) * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        n += len(y)
        if progress and (i % 5 == 0 or i == len(loader) - 1):
            bar.set_postfix(loss=f"{float(loss_sum) / n:.3f}", acc=f"{int(correct) / n:.3f}", refresh=False)
    if not n:
        return Stats(None, None, 0)
    return Stats(float(loss_sum) / n, int(correct) / n, n)


def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader | None, criterion: nn.Module,
             device: torch.device, *, info: ModelInfo, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, on_bad: BadFiles | None = None, progress: bool = True) -> Stats:
    """Mean loss (CRITERION, in float32) and accuracy of MODEL in eval mode over LOADER."""
    if loader is None:
        return Stats(None, None)
    from tqdm import tqdm

    model.eval()
    sum_dtype = _sum_dtype(device)
    loss_sum = torch.zeros((), device=device, dtype=sum_dtype)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n = 0
    with torch.inference_mode():
        for x, y, bad in tqdm(loader, desc="validate", leave=False, disable=not progress, unit="batch",
                              file=sys.stderr):
            if bad and on_bad is not None:
                on_bad(bad)
            if x is None:
                continue
            x, y = to_device(x, y, device, info, channels_last)
            with autocast(device, amp_dtype):
                logits, _ = split_outputs(model(x))
            loss_sum += criterion(logits.float(), y).to(sum_dtype) * len(y)
            correct += (logits.argmax(1) == y).sum()
            n += len(y)
    if not n:
        return Stats(None, None)
    return Stats(float(loss_sum) / n, int(correct) / n, n)
