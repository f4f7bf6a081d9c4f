"""What a run checks before it writes its first file, so that a run which cannot train fails
at once and the same command can be run again: the input size against the smallest one the
network accepts, whether its auxiliary classifiers fit that size, and one training step on a
real batch at that size, on the run's device.

Sizes are probed on the meta device: shapes only, no arithmetic, so a probe costs about the same
at any size and leaves the network's weights, statistics and random streams alone.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data import ImageDataset, collate_skip, eval_transform
from ..errors import FeatureshiftError
from ..models.info import ModelInfo
from ..models.layers import blank_input
from ..models.zoo import aux_heads, drop_aux_heads
from .config import MIN_IMAGE_SIZE
from .cutoff import CutoffPlan, set_train_mode
from .loop import AUX_WEIGHT, forward_loss, to_device

_LIMIT = 2048  # the largest size probed


def runs_at(model: nn.Module, size: int, train: bool = False) -> bool:
    """Whether MODEL computes its output on a SIZE px square input (in train mode: with whatever it
    runs only when training, such as auxiliary classifiers)."""
    modes = {m: m.training for m in model.modules()}
    # Train mode for the network itself only (what it runs only in training, like inception's auxiliary
    # classifiers, is decided there), its layers in eval mode; and without its normalization layers,
    # which keep shapes as they are and take most of a probe's time on the meta device.
    norms = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.modules.batchnorm._NormBase)]
    try:
        for parent, name, _ in norms:
            setattr(parent, name, nn.Identity())
        state = {n: torch.empty_like(t, device="meta")
                 for n, t in [*model.named_parameters(), *model.named_buffers()]}
        model.eval()
        model.training = train
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.func.functional_call(model, state, (blank_input(model, size, device="meta"),))
        return True
    except (RuntimeError, ValueError, IndexError, AssertionError):  # timm and torchvision assert input sizes
        return False
    finally:
        for parent, name, child in norms:
            setattr(parent, name, child)
        for m, mode in modes.items():
            m.training = mode


def smallest_input_size(model: nn.Module, train: bool = False, start: int = MIN_IMAGE_SIZE) -> int | None:
    """The smallest size from START up that runs_at accepts (None: none up to 2048 px)."""
    if runs_at(model, start, train):
        return start
    lo, hi = start, start * 2
    while not runs_at(model, hi, train):
        lo, hi = hi, hi * 2
        if hi > _LIMIT:
            return None
    while hi - lo > 1:  # runs_at(lo) fails, runs_at(hi) works
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if runs_at(model, mid, train) else (mid, hi)
    return hi


def check_input_size(model: nn.Module, size: int, arch: str) -> None:
    """A clear error, naming the smallest size that works, when the network's main path cannot run at SIZE."""
    if runs_at(model, size):
        return
    smallest = smallest_input_size(model)
    if smallest is None:
        raise FeatureshiftError(f"The network {arch} does not run on square images of any size up to {_LIMIT} px; "
                                "check the model.")
    raise FeatureshiftError(f"{arch} cannot train on {size} px images: its layers shrink the image to nothing "
                            f"before the classifier. The smallest size it accepts is {smallest} px; use "
                            f"--image-size {smallest} or larger.")


@dataclasses.dataclass(frozen=True)
class AuxChoice:
    """Whether a run trains the network's auxiliary classifiers, as run.json records it."""

    heads: list[str]
    used: bool
    weight: float  # of their loss, added to the main classifier's (torchvision's reference recipe)
    why: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_AUX_SMALLEST: dict[str, int | None] = {}  # architecture -> smallest size its auxiliary classifiers run at


def choose_aux(model: nn.Module, size: int, arch: str) -> AuxChoice | None:
    """Train MODEL's auxiliary classifiers where SIZE is large enough for them; otherwise remove them
    from MODEL (drop_aux_heads), so that training runs without them. None for a network without any."""
    heads = aux_heads(model)
    if not heads or not getattr(model, "aux_logits", True):
        return None
    weight = AUX_WEIGHT.get(len(heads), 0.3)
    if runs_at(model, size, train=True):
        return AuxChoice(heads, True, weight, f"the auxiliary classifier fits {size} px images; its loss is "
                                               f"added with weight {weight}, as in torchvision's reference recipe")
    if arch not in _AUX_SMALLEST:
        _AUX_SMALLEST[arch] = smallest_input_size(model, train=True, start=size)
    smallest = _AUX_SMALLEST[arch]
    drop_aux_heads(model)
    need = f"at least {smallest} px" if smallest else "larger images"
    return AuxChoice(heads, False, weight, f"the auxiliary classifier needs {need}; this run trains on {size} px "
                                           "images, so it trains without it (the main classifier is unaffected)")


def first_batch(samples: Sequence[tuple[Path, int]], info: ModelInfo, image_size: int | None,
                batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Up to BATCH_SIZE readable training images as a uint8 batch (no augmentation: no random stream
    is drawn from), or None when there are none (or only one where batches hold more: training
    drops a last batch of one)."""
    ds = ImageDataset(samples, eval_transform(info, image_size, normalize=False), skip_bad=True,
                      channels=info.in_chans)
    good = []
    for i in range(len(ds)):
        item = ds[i]
        if item[0] is not None:
            good.append(item)
            if len(good) == batch_size:
                break
    x, y, _ = collate_skip(good)
    return None if x is None or len(good) < min(2, batch_size) else (x, y)


def check_training_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], *, info: ModelInfo,
                        plan: CutoffPlan, criterion: nn.Module, device: torch.device, batch_size: int,
                        amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> None:
    """One forward and backward pass of MODEL (on DEVICE) on BATCH, as training does it, to fail before
    the run writes anything. Leaves no trace: the weights are not stepped, and the gradients, buffers
    (batch-norm statistics), train/eval mode and random streams are put back as they were."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    accelerator = device.type in ("cuda", "mps")
    size = batch[0].shape[-1]
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if accelerator else [],
                                   device_type=device.type if accelerator else "cuda"):  # dropout draws from them
            set_train_mode(model, plan)
            x, y = to_device(*batch, device, info, channels_last)
            forward_loss(model, x, y, criterion, device, amp_dtype).loss.backward()
    except torch.OutOfMemoryError as e:
        raise FeatureshiftError(
            f"The {device} device ran out of memory training on a batch of {batch_size} images of {size} px. "
            f"Use a smaller --batch-size (e.g. {max(1, batch_size // 2)}) or a smaller --image-size."
        ) from e
    except (RuntimeError, ValueError) as e:  # ValueError: batch norm on a single value per channel
        raise FeatureshiftError(f"The network could not train on {size} px images in batches of {batch_size} "
                                f"on {device} ({str(e).splitlines()[0]}).") from e
    finally:
        for p in model.parameters():
            p.grad = None
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        for m, mode in modes.items():
            m.training = mode
        if device.type == "cuda":
            torch.cuda.empty_cache()
