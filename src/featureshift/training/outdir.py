"""The folder a fresh training run writes: where it goes, and whether a run already there may be
replaced (--force) or started again (it never finished an epoch), checked before anything is
written."""
from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import FeatureshiftError
from ..run import SNAPSHOT_DIR, STATE_FILE, describe_status, is_run, read_run, this_process, trainer_alive
from .config import TrainConfig
from .messages import note


def check_out(cfg: TrainConfig) -> Path:
    """The run folder to write; refuses one that holds another run, before anything is written."""
    if cfg.out:
        out = Path(cfg.out).expanduser()
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{Path(cfg.model).stem}-{Path(cfg.data).resolve().name}-{stamp}"
    data = Path(cfg.data).resolve()
    if out.resolve() == data or data in out.resolve().parents:
        raise FeatureshiftError(f"--out {out} is inside the dataset folder {data}; its files would become a class. "
                                "Choose an --out folder outside the data.")
    if out.exists() and not out.is_dir():
        raise FeatureshiftError(f"--out {out} is a file; give a folder.")
    if not is_run(out):
        return out
    try:
        r = read_run(out)
    except FeatureshiftError:
        r = None
    if cfg.force:
        refuse_if_training(r or {}, out, "--force replacing it")
        return out
    if r is not None and restartable(out, r):
        if not cfg.quiet:
            note(f"{out} holds a run that never finished an epoch ({describe_status(r)}); starting it again.")
        return out
    what = "" if r is None else (f" ({r.get('model', {}).get('arch', '?')} on {r.get('dataset', {}).get('root', '?')}, "
                                 f"{r.get('epochs_done', 0)} epochs, {describe_status(r)})")
    raise FeatureshiftError(
        f"{out} already holds a training run{what}. Continue it with `featureshift train --resume {out}`, "
        f"replace it with --force, or choose another --out folder."
    )


def restartable(out: Path, run: dict[str, Any] | None = None) -> bool:
    """Whether OUT holds a run that stopped before finishing its first epoch: nothing but the untrained
    network would be lost, so the same command starts it again (a failed first epoch is retried)."""
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


def clear_run(out: Path) -> None:
    """--force: remove the files of the run that was there (only files featureshift writes)."""
    for name in ("run.json", "metrics.jsonl", "split.json", STATE_FILE):
        (out / name).unlink(missing_ok=True)
    for p in (out / SNAPSHOT_DIR).glob("*.safetensors"):
        p.unlink()
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


def refuse_if_training(run: dict[str, Any], run_dir: Path, what: str) -> None:
    """Two processes writing one run folder would interleave its snapshots and logs."""
    if trainer_alive(run) and run["trainer"]["pid"] != os.getpid():
        raise FeatureshiftError(
            f"{run_dir} is being trained right now by process {run['trainer']['pid']}; {what} would write into the "
            f"same folder. Wait for it to finish, or stop it first (Ctrl-C, or `kill {run['trainer']['pid']}`).")
