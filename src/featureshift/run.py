"""The run folder that `featureshift train` writes and every later command reads.

    RUN/run.json                    resolved configuration, versions, dataset summary, status
    RUN/metrics.jsonl               one JSON object per epoch (epoch 0 = before training)
    RUN/split.json                  the exact train / validation files
    RUN/snapshots/NNN.safetensors   the network after epoch NNN (000 = before training)
    RUN/train_state.pt              what resuming needs: weights, optimizer, RNG states

Every file is replaced atomically, so a run killed at any moment stays readable.
"""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any

from .errors import FeatureshiftError
from .io import write_json, write_text

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SPLIT_FILE = "split.json"
STATE_FILE = "train_state.pt"
SNAPSHOT_DIR = "snapshots"
_SNAPSHOT_RE = re.compile(r"^(\d+)\.safetensors$")


def snapshot_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"{int(epoch):03d}.safetensors"


def is_run(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / RUN_FILE).is_file()


def _not_a_run(run_dir: Path, what: str) -> FeatureshiftError:
    return FeatureshiftError(
        f"{run_dir} is not a featureshift run folder ({what}). Give the --out folder of `featureshift train`, "
        "which holds run.json and snapshots/."
    )


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(epoch, path)] of every snapshot in the run, sorted by epoch."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FeatureshiftError(f"The run folder {run_dir} does not exist.")
    folder = run_dir / SNAPSHOT_DIR
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _SNAPSHOT_RE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
    if not found:
        raise _not_a_run(run_dir, f"no snapshots in {folder}") if not is_run(run_dir) else FeatureshiftError(
            f"The run {run_dir} has no snapshots yet (training may not have started). "
            f"Resume it with `featureshift train --resume {run_dir}` or start it again with --force."
        )
    return sorted(found)


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise _not_a_run(run_dir, f"no {RUN_FILE}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise FeatureshiftError(f"{path} could not be read ({e}). The file was edited or damaged.") from e


def this_process() -> dict[str, Any]:
    """Who is training a run: stored in run.json while its status is "running"."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks (Linux), so that a recycled pid is not taken for it."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def trainer_alive(run: dict[str, Any]) -> bool | None:
    """For a run whose status is "running": is the process training it still alive?

    True or False where it can be told (the same machine), None where not (another machine,
    or a run written before featureshift recorded its trainer)."""
    owner = run.get("trainer") or {}
    pid = owner.get("pid")
    if run.get("status") != "running" or not isinstance(pid, int) or owner.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    start = _process_start(pid)
    return owner.get("start") is None or start is None or start == owner["start"]


def describe_status(run: dict[str, Any]) -> str:
    """run.json's status for people: a "running" run whose process died says so."""
    status = str(run.get("status", "?"))
    alive = trainer_alive(run)
    if alive is True:
        return f"running (process {run['trainer']['pid']})"
    if alive is False:
        return "stopped unexpectedly (its training process is gone, e.g. killed); resume it with --resume"
    return status


def trained_image_size(run_dir: str | os.PathLike | None) -> int | None:
    """The input size the run trained at (its --image-size), or None: the model's own size.

    Probe images go through the network at this size, so that activations, CKA and dataset
    examples describe the network as it was trained, not at a size it never saw."""
    if run_dir is None or not (Path(run_dir) / RUN_FILE).is_file():
        return None
    try:
        size = read_run(run_dir).get("config", {}).get("image_size")
    except FeatureshiftError:
        return None
    return int(size) if isinstance(size, int) and size > 0 else None


def write_run(run_dir: str | os.PathLike, run: dict[str, Any]) -> None:
    write_json(Path(run_dir) / RUN_FILE, run)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One dict per epoch, in order: epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds.

    The epoch-0 row measures the network before training (train_* and lr are null).
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        if not is_run(run_dir):
            raise _not_a_run(run_dir, f"no {METRICS_FILE}")
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise FeatureshiftError(f"{path} has a malformed line ({e}); the file was edited or damaged.") from e
    return rows


def write_metrics(run_dir: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def write_split(run_dir: str | os.PathLike, classes: list[str], train: list[tuple[Path, int]],
                val: list[tuple[Path, int]]) -> None:
    write_json(Path(run_dir) / SPLIT_FILE, {
        "classes": classes,
        "train": [[str(p), c] for p, c in train],
        "val": [[str(p), c] for p, c in val],
    })


def read_split(run_dir: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(classes, train samples, validation samples) exactly as the run used them."""
    run_dir = Path(run_dir)
    path = run_dir / SPLIT_FILE
    if not path.is_file():
        raise _not_a_run(run_dir, f"no {SPLIT_FILE}") if not is_run(run_dir) else FeatureshiftError(
            f"The run {run_dir} has no {SPLIT_FILE}; it was not written by this version of featureshift "
            "or was stopped before its data was scanned."
        )
    d = json.loads(path.read_text(encoding="utf-8"))
    return d["classes"], [(Path(p), c) for p, c in d["train"]], [(Path(p), c) for p, c in d["val"]]


def probe_samples(run_dir: str | os.PathLike) -> list[tuple[Path, int]]:
    """The run's validation images [(path, class index)], from its seeded split.

    A run trained without validation data gives its training images instead.
    """
    _, train, val = read_split(run_dir)
    return val or train
