"""Feature visualization: render what a channel responds to (Lucid's method, batched).

    from featureshift.render import render
    result = render(model, [("inception4a", 3), ("inception4c", 7)], steps=512, size=128, seed=0)
    result.images  # (2, 128, 128, 3) float32 in [0, 1]
"""
import sys
import types

from . import objectives
from .engine import ENGINE_VERSION, RenderResult, render, target_seed
from .objectives import Objective
from .param import ImageParam
from .transforms import Transforms

__all__ = ["ENGINE_VERSION", "ImageParam", "Objective", "RenderResult", "Transforms", "objectives", "render",
           "target_seed"]


class _CallableModule(types.ModuleType):
    """`featureshift.render(model, targets, ...)` calls render() while the package's modules
    (`featureshift.render.objectives`, ...) stay reachable under the same name."""

    def __call__(self, *args, **kwargs) -> RenderResult:
        return render(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
