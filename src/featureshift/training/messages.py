"""What a training session prints (progress notes and warnings, above tqdm's bars) and its
TensorBoard scalars."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..errors import FeatureshiftError
from ..run import RUN_FILE, STATE_FILE, TENSORBOARD_DIR
from .config import TrainConfig


def note(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def warn(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"featureshift: warning: {msg}", file=sys.stderr)


def warn_unreadable_snapshots(run_dir: Path, done: int, cfg: TrainConfig) -> None:
    """Resuming needs only train_state.pt, but a damaged snapshot leaves its epoch out of every later
    timeline, atlas and report: say so while it can still be restored."""
    from ..run import unreadable_snapshots

    for bad in unreadable_snapshots(run_dir):
        e = bad.epoch
        if done < e <= cfg.epochs and (e % cfg.snapshot_every == 0 or e == cfg.epochs):
            warn(f"{bad.why} Training resumes from {STATE_FILE} and writes it again when it reaches epoch {e}.")
        else:
            warn(f"{bad.why} Training resumes from {STATE_FILE}, which does not need it, but does not write it "
                 f"again, so timelines, atlases and reports leave epoch {e} out. Restore the file from a copy, or "
                 f"train the run again into another folder with the settings in {run_dir / RUN_FILE} (on a CPU "
                 "the same settings and seed give the same weights).")


def warn_skipped(skipped: list[tuple[Any, str]]) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{p} ({why})" for p, why in skipped[:10])
    more = f"; and {len(skipped) - 10} more (all listed in run.json)" if len(skipped) > 10 else ""
    warn(f"skipping {len(skipped)} file(s) that are not usable images: {shown}{more}")


def summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise FeatureshiftError(
            "--tensorboard needs the tensorboard package, which is not installed. Install it with "
            "`pip install 'featureshift[tensorboard]'`, or leave out --tensorboard (metrics.jsonl has the same numbers)."
        ) from e
    return SummaryWriter


class Tensorboard:
    """RUN/tensorboard: each number of an epoch's row as a scalar."""

    def __init__(self, run_dir: Path, start_epoch: int):
        SummaryWriter = summary_writer()
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_epoch + 1 if start_epoch else None)

    def log(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and v is not None:
                self.writer.add_scalar(k, v, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
