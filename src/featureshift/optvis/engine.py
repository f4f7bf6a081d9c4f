"""The render loop: many (layer, channel) targets optimized together, fast and reproducibly.

Speed comes from doing only the necessary work: every target is one image of one
batch (targets of different layers share it, each image's objective gathering its own
layer and channel), the forward pass stops after the deepest layer needed, the weights
are frozen so no weight gradient is ever computed and channels_last, and on CUDA (and
CPUs with AMX) the network runs in bf16 while the parameterization stays fp32.

Reproducibility comes from giving every target its own random generator, seeded by
`target_seed(seed, layer, channel)`: its initial spectrum and its whole sequence of
transforms do not depend on which other targets share the batch, nor on the network,
so two snapshots rendered with one seed differ only because the networks differ.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import sys
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import FeatureshiftError
from ..models.layers import BRANCHES, Capture, LayerInfo, blank_input, feature_views, resolve_layers
from ..device import autocast, max_batch, resolve_device, resolve_precision, torch_dtype
from ..models.info import input_channels, model_info
from .objectives import LOGITS, Batch, as_objective, fixed_units, target_layers
from .settings import METHODS, PARAMS, RenderSettings
from .transforms import Transforms

# Bump whenever the same call would produce different pixels (timeline caches key on it).
ENGINE_VERSION = "fs-render-5"



def target_seed(seed: int, layer: str, channel: int, copy: int = 0) -> int:
    """The seed of one target's generator: a stable hash (not Python's salted hash()).

    `copy` numbers the extra images of one target rendered with diversity; copy 0 is the
    target's ordinary render."""
    key = f"{int(seed)}\x00{layer}\x00{int(channel)}" + (f"\x00{int(copy)}" if copy else "")
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


@dataclasses.dataclass
class RenderResult:
    # (N, size, size, C) float32 in [0, 1], C the network's input channels (3: RGB; 1: grayscale;
    # more: bands, of which grid.to_pil shows the first three as RGB)
    images: np.ndarray
    targets: list[tuple[str, int]]
    scores: np.ndarray  # (N,) objective of each final image, fed once untransformed
    failed: dict[int, str]  # index -> why the image stopped early (NaN/Inf)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Indices of images whose objective never had any gradient with respect to the image, at
    # any step: the channel does not respond to its input at all (zero weights, a ReLU dead
    # for every input the optimization tried). Their image is the starting noise, not a
    # picture of the channel; commands say so instead of showing a flat tile.
    no_response: set[int] = dataclasses.field(default_factory=set)


# --- the dead-ReLU fix -----------------------------------------------------------------

class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose gradient, for an image where the ReLU blocks all of it, lets through the
    part that would push negative inputs up (Lucid's redirected_relu_grad)."""

    @staticmethod
    def forward(ctx, x, inplace):
        if inplace:  # keep the caller's in-place semantics (`x.relu_(); use(x)`)
            ctx.mark_dirty(x)
            out = x.relu_()
        else:
            out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        relu_grad = torch.ops.aten.threshold_backward(grad, out, 0)
        # all zero, as Lucid, but by the largest and smallest value: a sum of squares underflows to
        # zero for the tiny gradients of a randomly initialized network, and two plain reductions
        # run ~15x faster than any() or an infinity norm (a NaN is never "blocked" either way)
        flat = _per_image(relu_grad)
        blocked = (flat.amax(1) == 0) & (flat.amin(1) == 0)
        if not blocked.any():  # the common case: nothing to redirect
            return relu_grad, None
        rows = blocked.nonzero()[:, 0]
        g = grad[rows]
        # we minimize -objective: a positive gradient would push an input at or below zero lower
        return relu_grad.index_put_((rows,), g.masked_fill((out[rows] <= 0) & (g > 0), 0)), None


def _per_image(t: torch.Tensor) -> torch.Tensor:
    """(B, -1) view of a contiguous or channels_last tensor (each image is one block), without a copy."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        t = t.permute(0, 2, 3, 1)
    return t.reshape(t.shape[0], -1)


_INPLACE_RELUS = {torch.nn.functional.relu_, torch.relu_, torch.Tensor.relu_}
_RELUS = {torch.nn.functional.relu, torch.relu, torch.Tensor.relu} | _INPLACE_RELUS


class RedirectReLU(TorchFunctionMode):
    """Routes every ReLU call (nn.ReLU, F.relu, torch.relu, in-place or not) through
    _RedirectedReLU while active; leaving the `with` block undoes it, even on error."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            inplace = func in _INPLACE_RELUS or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            return _RedirectedReLU.apply(args[0], inplace)
        return func(*args, **kwargs)


# --- running the network ----------------------------------------------------------------

def _features(model: nn.Module, infos: Sequence[LayerInfo], logits: bool, include_prefix: bool = False) -> Capture:
    """`feats = net(x)`: the outputs of the needed layers, plus "logits" (the model's output)
    when asked. Without logits the forward stops after the deepest layer. Token layers come as
    channel-first maps of their patch tokens (all tokens with include_prefix): see
    models.layers.channels_first."""
    names = [i.name for i in infos]
    # A kept output must not be changed by a later in-place op (ReLU(inplace), +=): keep it,
    # and hand the rest of the network a copy. The deepest layer, where the forward stops,
    # is never copied.
    copy = _copy if logits or len(names) > 1 else None
    return Capture(model, names, stop_after=None if logits else {i.name: i.calls for i in infos},
                   on_output=copy, model_output=LOGITS if logits else None,
                   views=feature_views(model, infos, include_prefix))


def _copy(name: str, module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return out.clone()


@contextlib.contextmanager
def _prepared(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, frozen weights, on `device`, weights channels_last; all restored afterwards.

    channels_last weights keep every feature map channels_last even where the model itself
    builds a contiguous tensor (googlenet's transform_input): max pooling is ~10x faster so,
    and bf16 convolutions twice as fast. The original weight tensors are put back untouched."""
    was_training = model.training
    params = list(model.parameters())
    grads = [p.requires_grad for p in params]
    data = [p.data for p in params]
    weight_grads = [p.grad for p in params]  # Module.to would convert these too: keep them out of it
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    try:
        for p in params:
            p.grad = None
        model.eval().to(device=device, memory_format=torch.channels_last)
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, d, g, wg in zip(params, data, grads, weight_grads):
            p.data = d
            p.grad = wg
            p.requires_grad_(g)
        for m, name, b in buffers:
            m._buffers[name] = b
        model.train(was_training)


# --- checks ---------------------------------------------------------------------------

def _check_args(targets, steps, size, lr, param, batch_size, copies) -> list[tuple[str, int]]:
    if isinstance(targets, tuple) and len(targets) == 2 and isinstance(targets[0], str):
        targets = [targets]
    try:
        clean = [(str(layer), int(ch)) for layer, ch in targets]
    except (TypeError, ValueError) as e:
        raise FeatureshiftError(f"Targets must be (layer name, channel index) pairs, e.g. [('inception4a', 3)] "
                                f"({e}).") from e
    if not clean:
        raise FeatureshiftError("Nothing to render: give at least one (layer, channel) target.")
    for name, value, low in (("steps", steps, 0), ("size", size, 1), ("diversity", copies, 1)):
        if int(value) != value or value < low:
            raise FeatureshiftError(f"{name} must be a whole number >= {low}, not {value}.")
    if batch_size is not None and batch_size < 1:
        raise FeatureshiftError(f"batch size must be at least 1, not {batch_size}.")
    if not lr > 0:
        raise FeatureshiftError(f"The learning rate must be positive, not {lr}.")
    if param not in PARAMS:
        raise FeatureshiftError(f"Unknown parameterization '{param}'; use one of {', '.join(PARAMS)}.")
    return clean


def _works(net: Capture, size: int, device: torch.device) -> bool:
    try:
        with torch.no_grad():
            feats = net(blank_input(net.model, size, device=device))
    except (RuntimeError, AssertionError, FeatureshiftError):  # timm and torchvision check sizes with assert
        return False
    return all(f.numel() > 0 for f in feats.values())


def _smallest_size(ok, limit: int = 4096) -> int | None:
    """The smallest canvas size for which ok(size) holds (None: none up to `limit`)."""
    hi = 8
    while not ok(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2  # fails (or is below 8)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def _check_size(net: Capture, size: int, transforms: Transforms, device: torch.device, layers: list[str]) -> None:
    # the network sees the canvas (final score) and the transformed canvas (every step)
    def ok(s):
        return _works(net, s, device) and _works(net, transforms.output_size(s), device)

    if ok(size):
        return
    smallest = _smallest_size(ok)
    where = ", ".join(layers)
    if smallest is None:
        raise FeatureshiftError(f"The network fails on every input size when run up to {where}; check the model. "
                                "(A network that takes one image size only, such as torchvision's vit_b_16, cannot "
                                "see the transformed canvas: use timm's version, timm/vit_base_patch16_224.)")
    raise FeatureshiftError(
        f"A {size} px image is too small for {where}: the network cannot compute that far on it. "
        f"The smallest size that works is {smallest} px: use --size {smallest} or larger, or a shallower layer."
    )


def _check_channels(units: list[tuple[str, int]], infos: dict[str, LayerInfo], classes: int | None,
                    own: dict[str, list[str]]) -> None:
    """Each unit's channel against the layers it is read in (OWN: a target layer's, see target_layers)."""
    for layer, ch in dict.fromkeys(units):
        for read in own.get(layer, [layer]):
            count = classes if read == LOGITS else infos[read].channels
            what = "classes (logits)" if read == LOGITS else "channels"
            if not 0 <= ch < count:
                raise FeatureshiftError(
                    f"Channel {ch} is out of range for layer '{layer}', which has {count} {what}: "
                    f"use 0 to {count - 1}."
                )


# --- memory ---------------------------------------------------------------------------

def _bytes_per_image(net: Capture, model: nn.Module, size: int, device: torch.device, param_numel: int) -> int:
    """A rough upper estimate of one image's memory during a step: every leaf module's output
    (kept for backward, plus its gradient and functional ops between modules) and the
    parameters with their Adam state."""
    total = 0

    def count(name, module, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * 4

    leaves = [name for name, m in model.named_modules() if not list(m.children())]
    with torch.no_grad(), Capture(model, leaves, on_output=count, keep=False):
        net(blank_input(model, size, device=device))
    return 4 * total + 5 * 4 * param_numel


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(info["MemAvailable"] * 0.3)
    except (OSError, KeyError, ValueError):
        return 2 << 30


def _checked_adam(s: RenderSettings) -> tuple[float, float]:
    """S's Adam betas, once they and the learning-rate schedule are checked."""
    betas = tuple(s.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise FeatureshiftError(f"Adam's betas must be two numbers in [0, 1), not {betas}.")
    if not (0 <= s.lr_hold <= 1 and 0 <= s.lr_final <= 1):
        raise FeatureshiftError(f"lr_hold and lr_final are fractions in [0, 1] (of the steps, of the learning "
                                f"rate), not {s.lr_hold} and {s.lr_final}.")
    return betas


def _settings_used(s: RenderSettings, work: "_Work", plan, precision: str, mean, std, bands: int) -> dict[str, Any]:
    """What a render records it was made with (RenderResult.settings)."""
    used = dict(engine=ENGINE_VERSION, objective=repr(work.obj), steps=int(s.steps), size=int(s.size), seed=s.seed,
                lr=s.lr, lr_hold=s.lr_hold, lr_final=s.lr_final, betas=list(s.betas), diversity=work.copies,
                relu_redirect_steps=s.relu_redirect_steps, precision=precision, mean=list(mean), std=list(std))
    used.update(**({} if s.method == "lucid" else {"method": s.method}),
                **{k: v for k, v in s.key_fields().items() if k in plan.settings})
    if s.include_cls:
        used["include_cls"] = True
    if bands != 3:
        used["in_chans"] = bands
    return used


def _memory_batch(net: Capture, model: nn.Module, plan, dev: torch.device) -> int:
    """As many images as memory allows, at most the device's batch cap."""
    per_image = plan.views_per_image * _bytes_per_image(net, model, plan.input_size, dev, plan.param_numel)
    return max(1, min(max_batch(dev.type == "cuda"), _available_memory(dev) // max(per_image, 1)))


# --- the loop -------------------------------------------------------------------------

def render(model: nn.Module, targets: Sequence[tuple[str, int]], settings: RenderSettings | None = None, *,
           device: str | torch.device = "auto", batch_size: int | None = None, quiet: bool = False,
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           **changes: Any) -> RenderResult:
    """Render one image per (layer, channel) target (several with diversity) by gradient ascent.

    targets: [(layer, channel), ...]; the layer "logits" is the network output (channel = class).
    settings: a RenderSettings (default: Lucid's recipe, 512 steps at 128 px); keyword CHANGES
    override its fields, e.g. render(model, targets, steps=64, objective="neuron"). Objectives:
    "channel" (spatial mean), "neuron" (center), "negative", "logit", "diversity", or an Objective
    built from featureshift.optvis.objectives. Methods: method="lucid" (default), "maco"
    (phase only, natural magnitude: optvis.maco), "accent" with image=PATH (a photo, accentuated:
    optvis.accent).
    device: auto, cpu, cuda, cuda:N or mps. batch_size: images optimized together (default: as
    many as memory allows). mean/std: input normalization (default: the model's own).
    The model is used in eval mode with frozen weights; its state is restored afterwards.
    """
    s = (settings or RenderSettings()).replace(**changes).resolved()
    dev = resolve_device(str(device))
    precision = resolve_precision(dev, s.precision)
    if mean is None or std is None:
        info = model_info(model)
        mean, std = mean or info.mean, std or info.std
    work = _plan_targets(model, targets, s, batch_size)
    steps, size, bands = int(s.steps), int(s.size), input_channels(model)
    betas = _checked_adam(s)
    if s.method != "lucid" and bands != 3:
        raise FeatureshiftError(f"The {s.method} method renders RGB images; this network takes {bands} input "
                                "channels. Use the lucid method.")
    plan = _method_plan(s, dev, len(work.targets), bands)
    if plan.input_size < 1:
        raise FeatureshiftError(f"The transforms crop more than the {size} px canvas holds; use a larger --size.")
    used = _settings_used(s, work, plan, precision, mean, std, bands)
    schedule = lr_schedule(s.lr, steps, s.lr_hold, s.lr_final)

    def chunk(net, norm, targets, groups, seeds, bar):
        return _render_chunk(plan, net, work.obj, norm, dev, precision, targets, groups, seeds, steps, schedule,
                             betas, s.relu_redirect_steps, bar)

    images = np.zeros((len(work.expanded), size, size, bands), np.float32)
    scores = np.full(len(work.expanded), np.nan, np.float32)
    failed: dict[int, str] = {}
    no_response: set[int] = set()
    with _prepared(model, dev):
        net = _features(model, [work.infos[n] for n in work.inner], LOGITS in work.needed, s.include_cls)
        try:
            _check_size(net, size, plan.transforms, dev, sorted(work.needed))
            classes = None
            if LOGITS in work.needed:
                with torch.no_grad():
                    classes = net(blank_input(model, size, device=dev))[LOGITS].shape[1]
            _check_channels(work.expanded + fixed_units(work.obj), work.infos, classes, work.own)
            if batch_size is None:
                batch_size = _memory_batch(net, model, plan, dev)
            copies = work.copies
            per_chunk = max(1, batch_size // copies)  # whole groups per chunk
            chunks = [work.order[i:i + per_chunk] for i in range(0, len(work.order), per_chunk)]
            norm = (torch.tensor(mean, device=dev).view(1, -1, 1, 1), torch.tensor(std, device=dev).view(1, -1, 1, 1))
            from tqdm.auto import tqdm

            n = len(work.expanded)
            bar = tqdm(total=steps * len(chunks), disable=quiet, file=sys.stderr, unit="step",
                       desc=f"{'render' if s.method == 'lucid' else s.method} {n} image{'s' * (n != 1)}",
                       leave=False)
            try:
                for part in chunks:
                    idx = [t * copies + k for t in part for k in range(copies)]
                    imgs, sc, fails, silent = chunk(net, norm, [work.expanded[i] for i in idx],
                                                    [work.groups[i] for i in idx], [work.seeds[i] for i in idx], bar)
                    images[idx], scores[idx] = imgs, sc
                    failed.update({idx[j]: why for j, why in fails.items()})
                    no_response.update(idx[j] for j in silent)
            finally:
                bar.close()
        finally:
            net.close()
    return RenderResult(images, list(work.expanded), scores, dict(sorted(failed.items())), used, no_response)


@dataclasses.dataclass
class _Work:
    """The targets of one render() call, expanded to one entry per image: copies of a target
    (diversity) are adjacent and share a group; each image has its own seed."""
    targets: list[tuple[str, int]]
    obj: Any  # the Objective
    copies: int
    expanded: list[tuple[str, int]]
    groups: list[int]
    seeds: list[int]
    needed: set[str]  # every layer the objective reads
    own: dict[str, list[str]]  # target layer -> the layers read for it (objectives.target_layers)
    inner: list[str]  # those inside the network (not the logits), the targets' own first
    infos: dict[str, LayerInfo]
    order: list[int]  # targets, shallow first: a chunk of shallow targets stops its forward early


def _plan_targets(model: nn.Module, targets, s: RenderSettings, batch_size: int | None) -> _Work:
    copies = s.copies
    targets = _check_args(targets, s.steps, s.size, s.lr, s.param, batch_size, copies)
    obj = as_objective(s.objective, s.diversity_weight, copies)
    needed = obj.layers({layer for layer, _ in targets})
    own = {layer: target_layers(obj, layer) for layer in dict.fromkeys(layer for layer, _ in targets)}
    inner = [n for n in dict.fromkeys(n for reads in own.values() for n in reads) if n != LOGITS]
    inner += sorted(needed - set(inner) - {LOGITS})
    try:
        infos = {i.name: i for i in resolve_layers(model, inner)} if inner else {}
    except FeatureshiftError as e:
        paired = sorted({n for layer, reads in own.items() for n in reads if n != layer})
        if paired and not getattr(model, BRANCHES, None):
            raise FeatureshiftError(f"The objective {obj!r} compares two networks, before and after: it reads "
                                    f"{', '.join(paired)}, layers of a pair rendered together (optvis.pair), and "
                                    "this is one network: `featureshift compare A B --layer L --diff`.") from None
        raise FeatureshiftError(f"{e} The network's output (class logits) is the layer '{LOGITS}'.") from None
    depth = {layer: max(infos[n].last if n in infos else math.inf for n in reads) for layer, reads in own.items()}
    return _Work(targets=targets, obj=obj, copies=copies,
                 expanded=[t for t in targets for _ in range(copies)],
                 groups=[i for i in range(len(targets)) for _ in range(copies)],
                 seeds=[target_seed(s.seed, layer, ch, k) for (layer, ch) in targets for k in range(copies)],
                 needed=needed, own=own, inner=inner, infos=infos,
                 order=sorted(range(len(targets)), key=lambda t: depth.get(targets[t][0], math.inf)))


def lr_schedule(lr: float, steps: int, hold: float, final: float) -> list[float]:
    """The learning rate of each step: LR for the first HOLD fraction of the steps, then falling
    linearly to FINAL * LR at the last step (see docs/render.md, "Time to quality")."""
    start = hold * (steps - 1)
    return [lr if step <= start else lr * (1 - (1 - final) * (step - start) / (steps - 1 - start))
            for step in range(steps)]


def normalize_per_image(grad: torch.Tensor) -> torch.Tensor:
    """Scale each image's gradient (row of GRAD) to unit RMS in place; returns each row's
    norm (float64: NaN/Inf where the row has one, 0 where it is all zero).

    Adam is blind to a gradient's scale except through its epsilon (1e-8): gradients far
    below it, as from a randomly initialized network whose activations are around 1e-9,
    barely move the image. At unit RMS every network that responds at all is optimized
    alike, whatever the scale of its activations. The norm is summed in float64, where the
    squares of float32 values neither underflow nor overflow, and the float32 gradient is
    scaled in two equal factors, each at most ~1e24, so that even a gradient of denormal
    floats reaches unit RMS without an overflow."""
    flat = grad.view(grad.shape[0], -1)
    if flat.device.type == "mps":  # no float64 there: first to a peak of 1, so the squares cannot underflow
        peak = flat.abs().amax(1, keepdim=True)
        flat.div_(peak.clamp_min(torch.finfo(flat.dtype).tiny))
        norm = torch.linalg.vector_norm(flat, dim=1) * peak[:, 0]
        flat.div_(torch.where(peak > 0, flat.square().mean(1, keepdim=True).sqrt(), 1.0))
        return norm
    norm = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)
    half = torch.where(norm > 0, (math.sqrt(flat.shape[1]) / norm).sqrt(), 0.0).to(flat.dtype)[:, None]
    flat.mul_(half).mul_(half)
    return norm


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))


# --- the other methods: MACO, feature accentuation ---------------------------------------

def _method_plan(s: RenderSettings, dev: torch.device, count: int, bands: int):
    """What the render loop optimizes and shows the network, for the settings' method."""
    if s.method == "lucid":
        from .lucid import LucidPlan

        return LucidPlan(s, dev, bands)
    if s.method == "maco":
        from .maco import MacoPlan

        return MacoPlan(s, dev)
    if s.method == "accent":
        from .accent import AccentPlan

        return AccentPlan(s, dev, count)
    raise FeatureshiftError(f"Unknown method '{s.method}'; use one of {', '.join(METHODS)}.")


class _Guard:
    """Per image of a chunk: whether it is still optimized (an objective or gradient that became
    NaN/Inf stops it, keeping its parameters of that step) and whether it ever responded."""

    def __init__(self, params: torch.Tensor):
        n, dev = params.shape[0], params.device
        self.alive = torch.ones(n, dtype=torch.bool, device=dev)
        self.fail_step = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.responded = torch.zeros(n, dtype=torch.bool, device=dev)
        self.frozen = params.detach().clone()  # each image's parameters when it stopped

    def check(self, values: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Which images are finite this step; normalizes GRAD per image (in place)."""
        norm = normalize_per_image(grad)
        self.responded |= norm > 0
        return torch.isfinite(values) & torch.isfinite(norm)

    def step(self, optimizer, params: torch.Tensor, ok: torch.Tensor, step: int) -> None:
        """An optimizer step in which stopped images stay put, without a host sync."""
        newly = self.alive & ~ok
        self.fail_step = torch.where(newly, step, self.fail_step)
        self.alive = self.alive & ok
        self.frozen = torch.where(_rows(newly, params), params.detach(), self.frozen)
        params.grad = torch.where(_rows(self.alive, params), params.grad, 0.0)
        optimizer.step()
        with torch.no_grad():
            params.copy_(torch.where(_rows(self.alive, params), params, self.frozen))

    def results(self, final: torch.Tensor, scores: torch.Tensor, steps: int):
        """(images HxWxC, scores with NaN for stopped images, {index: why it failed}, [silent indices])."""
        scores = torch.where(self.alive, scores, float("nan"))
        fails = {i: f"the objective or its gradient became NaN/Inf at step {s}; its image at that step is kept"
                 for i, s in enumerate(self.fail_step.tolist()) if s >= 0}
        silent = [i for i, r in enumerate(self.responded.tolist()) if steps and not r and i not in fails]
        return final.permute(0, 2, 3, 1).float().cpu().numpy(), scores.cpu().numpy(), fails, silent


def _evaluator(net, obj, norm, dev):
    """The objective of a batch of images in [0, 1]: normalized, channels_last, at a precision."""
    mean, std = norm
    scale, shift = 1 / std, -mean / std  # (x - mean) / std as one fused multiply-add

    def evaluate(x, info, precision):
        x = torch.addcmul(shift, x, scale).contiguous(memory_format=torch.channels_last)
        with autocast(dev, torch_dtype(precision)):
            feats = net(x)
        return obj(Batch(feats=feats, **info))
    return evaluate


def _batch_info(targets, groups, dev) -> dict[str, Any]:
    layers = [layer for layer, _ in targets]
    return dict(channels=torch.tensor([c for _, c in targets], device=dev),
                rows={layer: torch.tensor([i for i, l in enumerate(layers) if l == layer], device=dev)
                      for layer in dict.fromkeys(layers)},
                groups=torch.tensor(groups, device=dev))


def _render_chunk(plan, net, obj, norm, dev, precision, targets, groups, seeds, steps, schedule, betas,
                  relu_redirect_steps, bar):
    """Optimize one chunk of images by the PLAN (optvis.lucid, .maco, .accent) -> Guard.results."""
    n, k = len(targets), plan.views_per_image
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    params = plan.init(gens, groups).requires_grad_(True)
    # a second stream per image for the transforms and a third for noise, so neither depends on
    # the parameters' shape (nor on each other)
    draws = plan.draw([torch.Generator().manual_seed(s ^ 0x5DEECE66D) for s in seeds], steps)
    noise = [torch.Generator(device=dev).manual_seed(s ^ 0x2545F491) for s in seeds]
    # view j of every image is one group of its own: diversity compares like views of the copies
    view_info = _batch_info([t for t in targets for _ in range(k)], [g * k + j for g in groups for j in range(k)],
                            dev)
    image_info = _batch_info(targets, groups, dev)
    score = _evaluator(net, obj, norm, dev)

    optimizer = torch.optim.Adam([params], lr=schedule[0] if steps else 0.0, betas=betas)
    guard = _Guard(params)
    sync_every = 1 if dev.type == "cpu" else 10
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule[step]
        optimizer.zero_grad(set_to_none=False)
        x = plan.views(plan.image(params), draws[:, step], noise)
        with (RedirectReLU() if step < relu_redirect_steps else contextlib.nullcontext()):
            values = score(x, view_info, precision).view(n, k).mean(1)
        (-torch.where(guard.alive, values, 0.0).sum()).backward()
        ok = guard.check(values, params.grad)
        pull = plan.penalty_grad(params.detach(), groups)
        if pull is not None:
            params.grad.add_(pull)
        if dev.type == "cpu" and bool(ok.all()) and bool(guard.alive.all()):
            optimizer.step()  # the common case, checked for free on a CPU
        else:  # without a host sync on a GPU
            guard.step(optimizer, params, ok, step)
        bar.update(1)
        if not bar.disable and (step % sync_every == 0 or step == steps - 1):
            live = values.detach()[guard.alive]
            bar.set_postfix(objective=f"{live.mean().item():.4g}" if len(live) else "-")

    with torch.no_grad():
        final = plan.image(params)
        final_scores = score(final, image_info, "fp32").float()  # scores exact whatever the network ran in
    return guard.results(final, final_scores, steps)
