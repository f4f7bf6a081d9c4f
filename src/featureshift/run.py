"""The run folder that `featureshift train` writes and every later command reads.

    RUN/run.json                    resolved configuration, versions, dataset summary, status
    RUN/metrics.jsonl               one JSON object per epoch (epoch 0 = before training)
    RUN/split.json                  the exact train / validation files
    RUN/snapshots/NNN.safetensors   the network after epoch NNN (000 = before training)
    RUN/train_state.pt              what resuming needs: weights, optimizer, RNG states

Every file is replaced atomically, so a run killed at any moment stays readable.

A new run's folder is chosen here too (`choose_run_dir`): a folder that holds another run is
refused before anything is written, one whose run never finished an epoch starts again
(`restartable`), and --force clears only the files featureshift wrote (`clear_run`).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import FeatureshiftError
from .io import write_json, write_text

RUN_FORMAT = "featureshift.run/1"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SPLIT_FILE = "split.json"
STATE_FILE = "train_state.pt"
SNAPSHOT_DIR = "snapshots"
TENSORBOARD_DIR = "tensorboard"  # written with --tensorboard
TIMELINE_DIR = "timeline"  # timelines (one folder per layer) and the tile cache every render command shares
_SNAPSHOT_RE = re.compile(r"^(\d+)\.safetensors$")


def snapshot_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"{int(epoch):03d}.safetensors"


def tile_cache_dir(run_dir: str | os.PathLike) -> Path:
    """Where every rendered tile of the run is cached, whichever command rendered it."""
    return Path(run_dir) / TIMELINE_DIR / "cache"


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


@dataclasses.dataclass(frozen=True)
class UnreadableSnapshot:
    epoch: int
    path: Path
    why: str  # a sentence naming the file and what is wrong with it


def unreadable_snapshots(run_dir: str | os.PathLike) -> list[UnreadableSnapshot]:
    """The run's snapshots that cannot be opened (truncated, damaged, not a snapshot), in epoch order.

    Each file's header is read and its length checked against it (`read_meta`), which finds a
    truncated file; the weights' checksum is not verified, as that reads every byte of every
    snapshot (gigabytes for a long run of a large network)."""
    from .snapshot import read_meta

    folder = Path(run_dir) / SNAPSHOT_DIR
    found = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _SNAPSHOT_RE.match(p.name)
        if not m or not p.is_file():
            continue
        try:
            read_meta(p)
        except FeatureshiftError as e:
            found.append(UnreadableSnapshot(int(m.group(1)), p, str(e)))
    return sorted(found, key=lambda s: s.epoch)


def select_snapshots(entries: list[tuple[int, Path]], snapshots: str | Sequence[int] | None = None,
                     every: int | None = None) -> list[tuple[int, Path]]:
    """ENTRIES (from list_snapshots) narrowed to the epochs asked for: SNAPSHOTS ("0,1,5-10" or a
    list of epochs) or the multiples of EVERY; all of them when neither is given."""
    from .selection import parse_indices

    if snapshots is not None and every is not None:
        raise FeatureshiftError("Give either the snapshots to use or --every N, not both.")
    if snapshots is not None:
        by_epoch = dict(entries)
        # A single epoch must exist; a range takes the snapshots inside it (runs save every K epochs).
        parts = snapshots.split(",") if isinstance(snapshots, str) else [int(e) for e in snapshots]
        wanted, absent = set(), []
        for part in parts:
            epochs = parse_indices(part, "snapshot")
            found = [e for e in epochs if e in by_epoch]
            if not found:
                absent.append(str(part).strip())
            wanted.update(found)
        if absent:
            raise FeatureshiftError(
                f"The run has no snapshot for epoch(s) {', '.join(absent)}; its snapshots are at "
                f"epochs {_epoch_list([e for e, _ in entries])}.")
        return [(e, by_epoch[e]) for e in sorted(wanted)]
    if every is not None:
        if every < 1:
            raise FeatureshiftError(f"--every must be at least 1, not {every}.")
        chosen = [(e, p) for e, p in entries if e % every == 0]
        if not chosen:
            raise FeatureshiftError(
                f"No snapshot's epoch is a multiple of {every}; the run's snapshots are at epochs "
                f"{_epoch_list([e for e, _ in entries])}.")
        return chosen
    return list(entries)


def _epoch_list(epochs: list[int]) -> str:
    return ", ".join(map(str, epochs[:20])) + (f", ... ({len(epochs)} in all)" if len(epochs) > 20 else "")


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


# --- a run folder's lifecycle before training writes it: choose, refuse, restart, clear ---

@dataclasses.dataclass(frozen=True)
class RunDirChoice:
    path: Path
    restarting: str | None = None  # the status of a run there that never finished an epoch, started again


def default_run_dir(model: str, data: str) -> Path:
    """runs/MODEL-DATA-TIME: a new folder for every run started without --out."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(model).stem}-{Path(data).resolve().name}-{stamp}"


def choose_run_dir(out: str | None, model: str, data: str, *, force: bool) -> RunDirChoice:
    """The run folder a new run writes (OUT, or a default one); refuses a folder that holds another
    run, before anything is written. FORCE replaces a run that is not being trained right now."""
    out = Path(out).expanduser() if out else default_run_dir(model, data)
    data_dir = Path(data).resolve()
    if out.resolve() == data_dir or data_dir in out.resolve().parents:
        raise FeatureshiftError(f"--out {out} is inside the dataset folder {data_dir}; its files would become a "
                                "class. Choose an --out folder outside the data.")
    if out.exists() and not out.is_dir():
        raise FeatureshiftError(f"--out {out} is a file; give a folder.")
    if not is_run(out):
        return RunDirChoice(out)
    try:
        r = read_run(out)
    except FeatureshiftError:
        r = None
    if force:
        refuse_if_training(r or {}, out, "--force replacing it")
        return RunDirChoice(out)
    if r is not None and restartable(out, r):
        return RunDirChoice(out, restarting=describe_status(r))
    what = "" if r is None else (f" ({r.get('model', {}).get('arch', '?')} on {r.get('dataset', {}).get('root', '?')}, "
                                 f"{r.get('epochs_done', 0)} epochs, {describe_status(r)})")
    raise FeatureshiftError(
        f"{out} already holds a training run{what}. Continue it with `featureshift train --resume {out}`, "
        f"replace it with --force, or choose another --out folder."
    )


def restartable(out: str | os.PathLike, run: dict[str, Any] | None = None) -> bool:
    """Whether OUT holds a run that stopped before finishing its first epoch: nothing but the untrained
    network would be lost, so the same command starts it again (a failed first epoch is retried)."""
    out = Path(out)
    if run is None:
        if not is_run(out):
            return False
        try:
            run = read_run(out)
        except FeatureshiftError:
            return False
    trainer, me = run.get("trainer") or {}, this_process()
    ours = trainer.get("pid") == me["pid"] and trainer.get("host") == me["host"]  # an earlier call in this process
    stopped = run.get("status") in ("failed", "interrupted") or (
        run.get("status") == "running" and (trainer_alive(run) is False or ours))
    trained = any(p.name != "000.safetensors" for p in (out / SNAPSHOT_DIR).glob("*.safetensors"))
    return stopped and not run.get("epochs_done") and not trained


def clear_run(out: str | os.PathLike) -> None:
    """--force: remove the files of the run that was there (only files featureshift writes)."""
    out = Path(out)
    for name in (RUN_FILE, METRICS_FILE, SPLIT_FILE, STATE_FILE):
        (out / name).unlink(missing_ok=True)
    for p in (out / SNAPSHOT_DIR).glob("*.safetensors"):
        p.unlink()
    shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)


def refuse_if_training(run: dict[str, Any], run_dir: str | os.PathLike, what: str) -> None:
    """Two processes writing one run folder would interleave its snapshots and logs."""
    if trainer_alive(run) and run["trainer"]["pid"] != os.getpid():
        raise FeatureshiftError(
            f"{run_dir} is being trained right now by process {run['trainer']['pid']}; {what} would write into the "
            f"same folder. Wait for it to finish, or stop it first (Ctrl-C, or `kill {run['trainer']['pid']}`).")


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


def timestamp() -> str:
    """Now, as run.json records times: UTC, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run(**sections: Any) -> dict[str, Any]:
    """The record of a run that starts now in this process (not yet written): SECTIONS (config, model,
    dataset, ...) after the bookkeeping fields every run.json has."""
    now = timestamp()
    return {"format": RUN_FORMAT, "status": "running", "trainer": this_process(), "created": now, "updated": now,
            "epochs_done": 0, **sections}


def update_run(run_dir: str | os.PathLike, run: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """Apply CHANGES to the record RUN (default: the run's run.json), stamp it and write it atomically.
    Returns the record."""
    if run is None:
        run = read_run(run_dir)
    run.update(changes, updated=timestamp())
    write_run(run_dir, run)
    return run


def add_skipped(run: dict[str, Any], skipped: Iterable[tuple[str, str]]) -> None:
    """Record files that could not be read, [(path, why)], in RUN's dataset summary (each path once)."""
    ds = run["dataset"]
    known = {s["path"] for s in ds["skipped"]}
    for path, why in skipped:
        if str(path) not in known:
            ds["skipped"].append({"path": str(path), "reason": why})
            known.add(str(path))
    ds["skipped_count"] = len(ds["skipped"])


def add_session(run: dict[str, Any], from_epoch: int, to_epoch: int) -> None:
    """Record in RUN that training (re)started now, from FROM_EPOCH towards TO_EPOCH."""
    run.setdefault("sessions", []).append({"started": timestamp(), "from_epoch": from_epoch, "to_epoch": to_epoch})


def software_versions() -> dict[str, str]:
    """The versions a run was trained with, for run.json."""
    import platform

    import numpy
    import PIL
    import torch
    import torchvision

    from .version import __version__

    return {"featureshift": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__, "numpy": numpy.__version__,
            "platform": platform.platform()}


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
