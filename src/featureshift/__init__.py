"""featureshift: see what transfer learning does to a network.

The Python API has the names of the command line (`featureshift.train`, `.vis`,
`.timeline`, `.merge`, `.compare`, `.report`, ...); every network, whatever it is saved as,
opens with `featureshift.open_network`. Names load on first use, so
`import featureshift` is instant and changes nothing in the process.
"""
from importlib import import_module

from .version import __version__

# public name -> module that defines it
_EXPORTS = {
    "FeatureshiftError": "errors",
    "ModelInfo": "models.info", "attach_info": "models.info", "model_info": "models.info",
    "available_models": "models.zoo",
    "LayerInfo": "models.layers", "list_layers": "models.layers",
    "Network": "network", "open_network": "network",
    "SnapshotMeta": "snapshot", "read_meta": "snapshot", "save_snapshot": "snapshot",
    "RenderSettings": "optvis.settings", "RenderResult": "optvis.engine", "render": "optvis.engine",
    "DifferenceRenders": "optvis.pair", "render_difference": "optvis.pair",
    "TrainConfig": "training.config", "train": "commands.train",
    "VisResult": "commands.vis", "vis": "commands.vis",
    "TimelineResult": "commands.timeline", "timeline": "commands.timeline",
    "SnapshotVisualizer": "commands.timeline",
    "MergeResult": "commands.merge", "merge": "commands.merge",
    "CompareResult": "commands.compare", "compare": "commands.compare",
    "RunMetrics": "metrics.driver", "run_metrics": "metrics.driver",
    "build_report": "commands.report", "report": "commands.report",
    "run_demo": "commands.demo", "demo": "commands.demo",
    "AtlasResult": "commands.atlas", "atlas": "commands.atlas",
    "CompareRunsResult": "commands.compare_runs", "compare_runs": "commands.compare_runs",
    "ExportResult": "commands.export", "export": "commands.export",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'featureshift' has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
