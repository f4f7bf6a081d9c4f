"""`featureshift train`: fine-tuning with snapshots of the network before training and after every K epochs.

    import featureshift as fs
    run = fs.train(model="squeezenet1_1", data="flowers", epochs=20, cutoff="features.6", out="runs/a")

The engine is featureshift.training (configuration, cutoff, the epoch loop, resumable state,
processes); this command adds the hooks, `--visualize` included.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import FeatureshiftError
from ..optvis.settings import RenderSettings
from ..selection import DEFAULT_COLUMNS
from ..training.config import TrainConfig
from ..training.distributed import main_process
from ..training.session import EpochHook, SnapshotHook, configure, start


def train(config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None, *,
          on_epoch_end: EpochHook | None = None, on_snapshot: SnapshotHook | None = None,
          visualize: str | Sequence[str] = (), visualize_channels: int | str | Sequence[int] = DEFAULT_COLUMNS,
          visualize_settings: RenderSettings | None = None, **options: Any) -> Path:
    """Fine-tune a network with snapshots; returns the run folder.

    config: a TrainConfig, a dict, or a TOML file; keyword options override it
    (names as TrainConfig's fields: data, model, weights, epochs, cutoff, lr, out, ...).
    resume=RUN continues RUN from its last finished epoch (epochs=N extends it).
    on_epoch_end(epoch, metrics) is called after each epoch's files are written;
    on_snapshot(epoch, path) after an epoch that wrote a snapshot.

    visualize: layers to render on every snapshot as soon as it is written, into
    RUN/timeline/LAYER/merged.png (`featureshift train --visualize`), with
    visualize_channels (a count, "0-4,17" or a list) and visualize_settings (the
    render settings; default: RenderSettings()). At the end, whatever is still
    missing is rendered; the merged images' paths are printed to stderr.
    """
    cfg, resumed = configure(config, options)
    if cfg.nproc > 1 and (on_epoch_end is not None or on_snapshot is not None):
        raise FeatureshiftError("on_epoch_end and on_snapshot cannot be called from the processes nproc > 1 starts. "
                                "Train with nproc=1, or start the processes with torchrun (rank 0 calls them).")
    layers = [visualize] if isinstance(visualize, str) else list(visualize)
    if not layers or not main_process():
        return start(cfg, resumed, on_epoch_end, on_snapshot)

    # Loaded only here: rendering pulls in the whole optvis engine, which plain training never needs.
    from .timeline import SnapshotVisualizer

    visualizer = SnapshotVisualizer(layers, visualize_channels, settings=visualize_settings, device=cfg.device,
                                    quiet=cfg.quiet)

    def snapshot_written(epoch: int, path: Path) -> None:
        if on_snapshot is not None:
            on_snapshot(epoch, path)
        visualizer(epoch, path)

    run_dir = start(cfg, resumed, on_epoch_end, snapshot_written)
    result = visualizer.finish(run_dir)
    for epoch, why in result.missing.items():
        print(f"featureshift: warning: timeline row of epoch {epoch} is missing: {why}", file=sys.stderr)
    for path in result.merged.values():
        print(f"timeline: {path}", file=sys.stderr)
    return run_dir
