"""`train --visualize`: a train hook that renders each snapshot into the run's timeline as
soon as it is written, so merged.png is current while training goes on."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

from ...optvis.settings import DEFAULT_SETTINGS, RenderSettings
from ...selection import DEFAULT_COLUMNS
from .timeline import TimelineResult, timeline


class SnapshotVisualizer:
    """A train hook, `train(..., on_snapshot=SnapshotVisualizer(layers, channels, ...))`:
    renders each snapshot into the run's timeline as soon as it is written and keeps
    merged.png current. The run folder is the one the snapshots are written to.

    `channels`, `settings` (with keyword `changes` to its fields), `device` and
    `batch_size` mean what they mean for `timeline`. On a CPU the render runs in between
    epochs (the hook returns when it is done); on a GPU it runs in a worker thread while
    training goes on (`background` decides instead when given). The first snapshot is
    always rendered at once, so a wrong layer name stops training at epoch 0, not at the
    end. Requests that arrive while a render is running are folded into the next one,
    which renders whatever is missing: the cache makes that (and resuming a run)
    automatic. At the end of training call `finish(run_dir)` (or `close()` to only wait).
    """

    def __init__(self, layers: str | Sequence[str], channels: int | str | Sequence[int] = DEFAULT_COLUMNS, *,
                 settings: RenderSettings | None = None, device: str = "auto", batch_size: int | None = None,
                 quiet: bool = False, background: bool | None = None, run_dir: str | Path | None = None,
                 **changes):
        from ...device import resolve_device

        self.layers, self.channels = layers, channels
        self.settings = (settings or DEFAULT_SETTINGS).replace(**changes)
        self.device, self.batch_size, self.quiet = device, batch_size, quiet
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.background = resolve_device(device).type == "cuda" if background is None else background
        self.result: TimelineResult | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = False

    def __call__(self, epoch: int, path: str | Path) -> None:
        """Render the snapshot of EPOCH, just written at PATH (and anything else still missing)."""
        if self.run_dir is None:
            self.run_dir = Path(path).parent.parent  # RUN/snapshots/NNN.safetensors
        if self.error is not None:
            self._raise()
        if not self.background or self.result is None:
            self._run()
            return
        self._wanted.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="featureshift-visualize", daemon=True)
            self._thread.start()

    def _timeline(self, run_dir: Path) -> TimelineResult:
        return timeline(run_dir, self.layers, self.channels, settings=self.settings, device=self.device,
                        batch_size=self.batch_size, quiet=self.quiet)

    def _run(self) -> None:
        with self._lock:
            self.result = self._timeline(self.run_dir)

    def _worker(self) -> None:
        while True:
            self._wanted.wait(timeout=0.5)
            if self._wanted.is_set():
                self._wanted.clear()
                try:
                    self._run()
                except BaseException as e:  # raised in the training thread, at its next call or close()
                    self.error = e
                    return
            elif self._closing:
                return

    def _raise(self) -> None:
        error, self.error = self.error, None
        raise error

    def close(self) -> TimelineResult | None:
        """Wait for the renders still running; re-raise an error they met. Returns the last result."""
        self._closing = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            self._raise()
        return self.result

    def finish(self, run_dir: str | Path) -> TimelineResult:
        """Wait for the last render, then render whatever is still missing in RUN_DIR with the same
        layers, channels and settings: a resumed run whose earlier snapshots were never
        visualized, or one that trained no new epoch. Returns the final timeline; its
        `missing` rows and `merged` paths are for the caller to report."""
        self.close()
        self.result = self._timeline(Path(run_dir))
        return self.result
