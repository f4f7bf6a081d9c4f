"""The cutoff: which parameter-holding layers a run freezes, found by tracing one forward pass."""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import torch
from torch import nn

from ..errors import FeatureshiftError, did_you_mean
from ..models.layers import Capture, blank_input


@dataclasses.dataclass(frozen=True)
class CutoffLayer:
    """A module that holds parameters of its own, and whether the cutoff freezes it."""

    name: str
    type: str  # the module's class name
    params: int  # parameters of the module itself, not of its children
    frozen: bool


@dataclasses.dataclass
class CutoffPlan:
    layers: list[CutoffLayer]  # in forward order
    frozen_norms: list[str]  # batch-norm modules kept in eval mode

    @property
    def frozen(self) -> list[str]:
        return [l.name for l in self.layers if l.frozen]

    def summary(self) -> dict[str, Any]:
        fz = [l for l in self.layers if l.frozen]
        tr = [l for l in self.layers if not l.frozen]
        return {"frozen_layers": len(fz), "trainable_layers": len(tr),
                "frozen_params": sum(l.params for l in fz), "trainable_params": sum(l.params for l in tr),
                "last_frozen": fz[-1].name if fz else None, "first_trainable": tr[0].name if tr else None}

    def table(self, cutoff) -> str:
        """A few lines: consecutive runs of frozen / trainable layers."""
        s = self.summary()
        total = s["frozen_params"] + s["trainable_params"]
        if not s["frozen_layers"]:
            head = f"all {len(self.layers)} parameter-holding layers train ({_millions(total)} parameters)"
        else:
            head = (f"cutoff {cutoff!r}: {s['frozen_layers']} of {len(self.layers)} parameter-holding layers frozen "
                    f"({_millions(s['frozen_params'])} of {_millions(total)} parameters)")
        spans: list[_Span] = []
        for layer in self.layers:
            if spans and spans[-1].frozen == layer.frozen:
                spans[-1].last = layer.name
                spans[-1].count += 1
                spans[-1].params += layer.params
            else:
                spans.append(_Span(layer.frozen, layer.name, layer.name, 1, layer.params))
        rows = [head]
        for sp in spans:
            names = sp.first if sp.first == sp.last else f"{sp.first} ... {sp.last}"
            rows.append(f"  {'frozen' if sp.frozen else 'trainable':<10} {sp.count:>4} layers "
                        f"{_millions(sp.params):>7}  {names}")
        return "\n".join(rows)


@dataclasses.dataclass
class _Span:
    """Consecutive layers that are all frozen or all trainable: one row of CutoffPlan.table."""

    frozen: bool
    first: str
    last: str
    count: int
    params: int


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def plan_cutoff(model: nn.Module, cutoff: int | str | None, size: int | None = None) -> CutoffPlan:
    """Which layers a cutoff freezes, in forward order (one traced forward pass).

    Every module that holds parameters counts (Linear heads too), ordered by when it is
    first entered, not only the 4-D outputs `featureshift layers` lists.
    """
    info = getattr(model, "featureshift_info", None)
    size = size or (info.input_size if info else 224)
    enter: dict[str, int] = {}  # module -> tick of its first entry
    leave: dict[str, int] = {}  # module -> tick of its last exit
    tick = itertools.count()
    named = dict(model.named_modules())

    def entered(name, module):
        enter.setdefault(name, next(tick))

    def left(name, module, out):
        leave[name] = next(tick)

    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with Capture(model, list(named), on_input=entered, on_output=left, keep=False) as net, torch.no_grad():
            net(blank_input(model, size, device=p.device, dtype=p.dtype))
    except (RuntimeError, AssertionError) as e:
        raise FeatureshiftError(f"The network could not run on a {size}x{size} image ({str(e).splitlines()[0]}). "
                                "Use a larger --image-size.") from e
    finally:
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
            from ..models.layers import trace_layers

            candidates = [l.name for l in trace_layers(model, size)] + holders
            raise FeatureshiftError(f"--cutoff '{cutoff}' is not a layer of this network.{did_you_mean(cutoff, candidates)} "
                                    "`featureshift layers MODEL` lists the names; or give a number of layers.")
        if cutoff not in leave:
            raise FeatureshiftError(f"--cutoff '{cutoff}' names a layer that does not run in the forward pass "
                                    "(an auxiliary head); give a layer of the main path.")
        limit = leave[cutoff]
        frozen = {n for n in holders if enter.get(n, math.inf) < limit}
        threshold = limit
    layers = [CutoffLayer(n, type(named[n]).__name__, own_params(named[n]), n in frozen) for n in holders]
    norms = [n for n, m in named.items() if _is_norm(m)
             and (n in frozen or (not own_params(m) and enter.get(n, math.inf) < threshold))]
    return CutoffPlan(layers=layers, frozen_norms=norms)


def apply_cutoff(model: nn.Module, plan: CutoffPlan) -> None:
    """Stop gradients to the parameters of the layers PLAN freezes."""
    modules = dict(model.named_modules())
    for name in plan.frozen:
        for p in modules[name].parameters(recurse=False):
            p.requires_grad_(False)


def set_train_mode(model: nn.Module, plan: CutoffPlan) -> None:
    """Train mode, except frozen batch-norm layers: their running statistics must not move.
    MODEL may be the network in DistributedDataParallel."""
    model.train()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    modules = dict(model.named_modules())
    for name in plan.frozen_norms:
        modules[name].eval()
