"""featureshift: see what transfer learning does to a network."""
__version__ = "0.1.0"

import os as _os  # noqa: E402

# Before torch loads OpenMP: spinning worker threads make every CPU op 10-20x slower as soon as
# another process wants the same cores (measured: a SqueezeNet training step 7.8 s instead of
# 0.45 s on 2 busy cores). Sleeping threads cost a few percent at most on an idle machine.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import FeatureshiftError  # noqa: E402
from .models import (ModelInfo, attach_info, available_models, create_model, list_layers,  # noqa: E402
                     model_info)
from .snapshot import SnapshotMeta, load_snapshot, read_meta, save_snapshot  # noqa: E402
from . import render  # noqa: E402  (a callable package: featureshift.render(...) == featureshift.render.render(...))
from . import train  # noqa: E402  (a callable module: featureshift.train(...) == featureshift.train.train(...))
# featureshift.timeline.timeline(...) and featureshift.merge.merge(...): the modules stay reachable by name.
from .timeline import SnapshotVisualizer, TimelineResult  # noqa: E402
from .merge import MergeResult  # noqa: E402
# featureshift.compare(...) == featureshift.compare.compare(...); featureshift.metrics.* for every measure.
from . import compare  # noqa: E402
from .compare import CompareResult  # noqa: E402
from .metrics import RunMetrics, run_metrics  # noqa: E402
from .report import build_report  # noqa: E402


def load(model_or_snapshot: str, weights: str = "imagenet"):
    """A network from a model name or a snapshot path: (model, SnapshotMeta or None)."""
    from pathlib import Path

    if model_or_snapshot.endswith(".safetensors") or Path(model_or_snapshot).is_file():
        return load_snapshot(model_or_snapshot)
    return create_model(model_or_snapshot, weights=weights), None


__all__ = ["FeatureshiftError", "ModelInfo", "SnapshotMeta", "attach_info", "available_models", "create_model",
           "list_layers", "load", "render", "load_snapshot", "model_info", "read_meta", "save_snapshot", "__version__", "train",
           "MergeResult", "SnapshotVisualizer", "TimelineResult",
           "CompareResult", "RunMetrics", "build_report", "compare", "run_metrics"]
