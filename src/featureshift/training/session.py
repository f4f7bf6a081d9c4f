"""A training session: a fresh run or a resumed one, from the options to the finished run folder
(`configure` then `start`; `featureshift.train` is the command around them).

Everything a run needs to continue lives in its folder (see featureshift.run): the
state after the last finished epoch (weights, optimizer, RNG) is rewritten
atomically after every epoch, so a run killed at any moment loses at most the epoch
in progress and `train(resume=RUN)` picks it up with the same data order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from ..data import DatasetIndex, Sample, scan_image_folder, stratified_split
from ..device import amp_dtype, core_count, loader_workers, resolve_device
from ..errors import FeatureshiftError
from ..io import WriteError, write_error
from ..models.info import ModelInfo, attach_info, model_info
from ..models.zoo import replace_head
from ..network import open_network
from ..run import (METRICS_FILE, RUN_FILE, SNAPSHOT_DIR, SPLIT_FILE, STATE_FILE, add_session, add_skipped,
                   choose_run_dir, clear_run, new_run, read_run, read_split, refuse_if_training, restartable,
                   snapshot_path, software_versions, this_process, update_run, write_metrics, write_run, write_split)
from ..snapshot import build_from_state, save_snapshot, state_on_cpu, with_input_size
from .config import NOT_STORED, RESUMABLE, TrainConfig, changed_options, check_keys, lr_at, make_config, stored_config
from .cutoff import CutoffPlan, apply_cutoff, plan_cutoff
from .distributed import Group, join, launch, launched_world, leave
from .loop import (Loaders, evaluate, make_loaders, make_optimizer, make_scaler,
                   param_groups, set_lr, train_one_epoch)
from .messages import Tensorboard, note, summary_writer, warn, warn_skipped, warn_unreadable_snapshots
from .precheck import AuxChoice, check_input_size, check_training_step, choose_aux, first_batch
from .state import TrainState, load_state, save_state, seed_all, set_rng_state, rng_state

EpochHook = Callable[[int, dict], None]
SnapshotHook = Callable[[int, Path], None]


def configure(config, options: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's configuration, and for a resume the run's record (run.json) as found."""
    if config is None and options.get("resume"):
        check_keys(options, "the arguments")
        run_dir = Path(options.pop("resume"))
        out = options.pop("out", None)
        if out and Path(out).resolve() != run_dir.resolve():
            raise FeatureshiftError(f"--resume {run_dir} writes to its own folder; leave out --out {out}.")
        options.pop("force", None)
        return _resume_config(options, run_dir)
    cfg = make_config(config, **options)
    if cfg.resume:
        return configure(None, changed_options(cfg))
    return cfg, None


def start(cfg: TrainConfig, resumed: dict[str, Any] | None, on_epoch_end: EpochHook | None,
           on_snapshot: SnapshotHook | None) -> Path:
    if cfg.nproc > 1:
        # The hooks stay in this process: --visualize renders the snapshots when training ends.
        return _launch(cfg, resumed)
    group = join(cfg.device)
    if group is not None and not group.main:
        cfg.quiet, on_epoch_end, on_snapshot = True, None, None
    try:
        if resumed is None:
            return _fresh(cfg, on_epoch_end, on_snapshot, group)
        return _resume(cfg, resumed, on_epoch_end, on_snapshot, group)
    finally:
        leave(group)


def _launch(cfg: TrainConfig, resumed: dict[str, Any] | None) -> Path:
    """--nproc N: the run trained by N processes started here (see distributed.py)."""
    if launched_world() > 1:
        raise FeatureshiftError("This process is one of several started by torchrun; leave out --nproc (torchrun's "
                                "--nproc_per_node says how many processes each machine runs).")
    if resumed is None:
        cfg.data, cfg.val = _abs(cfg.data), _abs(cfg.val)
        cfg.out = str(_check_out(cfg))  # every process must write to the same folder; refuse early
    run_dir = Path(cfg.out)
    config = dataclasses.asdict(cfg)
    config["nproc"] = 1
    return launch(run_rank, config, cfg.nproc, run_dir)


@record  # a failure's message reaches the process that started this one (distributed.launch)
def run_rank(config: dict[str, Any]) -> str:
    """One of the processes `--nproc` starts: train CONFIG as its rank."""
    cfg, resumed = configure(config, {})
    return str(start(cfg, resumed, None, None))


# --- the session: what the epochs share ---

@dataclasses.dataclass
class _Session:
    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    model: nn.Module
    info: ModelInfo
    plan: CutoffPlan
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    loaders: Loaders
    loader_gen: torch.Generator  # data order and augmentation
    workers: int
    on_epoch_end: EpochHook | None = None
    on_snapshot: SnapshotHook | None = None
    criterion: nn.Module = dataclasses.field(default_factory=nn.CrossEntropyLoss)
    run: dict[str, Any] = dataclasses.field(default_factory=dict)  # run.json
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # metrics rows so far
    parent: str | None = None  # checksum of the last snapshot
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why, met while training
    group: Group | None = None  # the processes training together; None when this one trains alone
    trainer: nn.Module | None = None  # what trains: MODEL, or MODEL in DistributedDataParallel
    saved_epoch: int | None = None  # the epoch train_state.pt holds: where a resume starts

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder (rank 0, or the only process)."""
        return self.group is None or self.group.main

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda" and self.cfg.channels_last

    def note_bad(self, bad: list[tuple[str, str]]) -> None:
        new = [(p, why) for p, why in bad if p not in self.skipped]
        for p, why in new:
            self.skipped[p] = why
        warn_skipped(new)

    def write_run(self, **changes: Any) -> None:
        if not self.main:
            return
        add_skipped(self.run, self.skipped.items())
        update_run(self.run_dir, self.run, **changes)


def _open_device(cfg: TrainConfig, group: Group | None = None) -> torch.device:
    if cfg.tensorboard:
        summary_writer()  # fail before anything is written
    return group.device if group is not None else resolve_device(cfg.device)


def _prepare(cfg: TrainConfig, run_dir: Path, device: torch.device, loader_gen: torch.Generator, model: nn.Module,
             info: ModelInfo, train: list[Sample], val: list[Sample], *, new_layers: list[str] | None,
             on_epoch_end: EpochHook | None, on_snapshot: SnapshotHook | None, group: Group | None = None) -> _Session:
    """The set-up a fresh run and a resume share: cutoff, device, optimizer, data loaders, and with
    several processes DistributedDataParallel (which waits for every rank: none reads the run
    folder after this, so rank 0 may write it). NEW_LAYERS: the layers that start untrained
    (see loop.param_groups)."""
    plan = plan_cutoff(model, cfg.cutoff, cfg.image_size)
    if cfg.epochs > 0 and not any(not l.frozen for l in plan.layers):
        raise FeatureshiftError(f"--cutoff {cfg.cutoff!r} freezes every layer, so nothing would train. "
                                "Give a smaller cutoff (the classifier must stay trainable).")
    apply_cutoff(model, plan)
    model = model.to(device)
    cuda = device.type == "cuda"
    if cuda and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, param_groups(model, new_layers, cfg.pretrained_lr_scale))
    workers = cfg.workers if cfg.workers is not None else loader_workers(device.type, core_count())
    loaders = make_loaders(train, val, info, batch_size=cfg.batch_size, workers=workers, loader_gen=loader_gen,
                           augment=cfg.augment, image_size=cfg.image_size, pin_memory=cuda,
                           rank=group.rank if group else 0, world=group.world if group else 1)
    dtype = amp_dtype(device, cfg.amp)
    if cfg.epochs > 0:
        per_process = cfg.batch_size // (group.world if group else 1)  # what each device holds
        batch = first_batch(train, info, cfg.image_size, per_process)
        if batch is not None:
            check_training_step(model, batch, info=info, plan=plan, criterion=nn.CrossEntropyLoss(), device=device,
                                batch_size=per_process, amp_dtype=dtype, channels_last=cuda and cfg.channels_last)
    return _Session(cfg=cfg, run_dir=run_dir, device=device, model=model, info=info, plan=plan, optimizer=optimizer,
                    scaler=make_scaler(dtype), amp_dtype=dtype, loaders=loaders, loader_gen=loader_gen,
                    workers=workers, on_epoch_end=on_epoch_end, on_snapshot=on_snapshot, group=group,
                    trainer=group.wrap(model) if group else model)


# --- the epochs ---

def _run_epochs(s: _Session, start: int) -> None:
    """Epochs START+1 .. cfg.epochs (and epoch 0, the network before training, for a new run), with
    run.json's status kept true whatever happens."""
    from tqdm import tqdm

    cfg = s.cfg
    progress = not cfg.quiet
    tb = Tensorboard(s.run_dir, start) if cfg.tensorboard and s.main else None
    bar = tqdm(total=cfg.epochs, initial=start, desc="training", unit="epoch", disable=not progress,
               file=sys.stderr)
    common = dict(info=s.info, amp_dtype=s.amp_dtype, channels_last=s.channels_last, on_bad=s.note_bad,
                  progress=progress)
    try:
        if start == 0 and not s.history:
            t = time.perf_counter()
            ev = evaluate(s.model, s.loaders.val, s.criterion, s.device, **common)
            if s.group:
                ev = s.group.reduce(ev)
            _finish_epoch(s, {"epoch": 0, "train_loss": None, "train_acc": None, "val_loss": ev.loss,
                              "val_acc": ev.acc, "lr": None, "seconds": round(time.perf_counter() - t, 3),
                              "train_seconds": 0.0}, bar, tb)
        for epoch in range(start + 1, cfg.epochs + 1):
            t = time.perf_counter()
            lr = lr_at(cfg, epoch)
            set_lr(s.optimizer, lr)
            if s.group:
                s.group.start_epoch(cfg.seed, epoch)
            tr = train_one_epoch(s.trainer, s.loaders.train, s.criterion, s.optimizer, s.device, epoch, plan=s.plan,
                                 scaler=s.scaler, loss_scale=s.group.loss_scale(s.loaders.train) if s.group else None,
                                 **common)
            if s.group:
                tr = s.group.reduce(tr)
                s.group.sync_buffers(s.model)
            train_seconds = time.perf_counter() - t
            ev = evaluate(s.model, s.loaders.val, s.criterion, s.device, **common)
            if s.group:
                ev = s.group.reduce(ev)
            row = {"epoch": epoch, "train_loss": tr.loss, "train_acc": tr.acc, "val_loss": ev.loss, "val_acc": ev.acc,
                   "lr": lr, "seconds": round(time.perf_counter() - t, 3), "train_seconds": round(train_seconds, 3),
                   "train_images": tr.images}
            _finish_epoch(s, row, bar, tb)
            bar.update(1)
    except torch.OutOfMemoryError as e:
        _record(s, status="failed", error="out of GPU memory")
        raise FeatureshiftError(
            f"The GPU ran out of memory at batch size {cfg.batch_size}. Use a smaller batch size, e.g. "
            f"`featureshift train --resume {s.run_dir} --batch-size {max(1, cfg.batch_size // 2)}` (the run keeps "
            f"every finished epoch), or a smaller --image-size."
        ) from e
    except KeyboardInterrupt:
        _record(s, status="interrupted")
        if s.main:
            warn(f"training interrupted; every finished epoch is saved. Continue with "
                 f"`featureshift train --resume {s.run_dir}{f' --nproc {s.group.world}' if s.group else ''}`.")
        raise
    except BaseException as e:
        _record(s, status="failed", error=f"{e.__class__.__name__}: {e}"[:500])
        lost = s.group.peer_failure(e, s.run_dir) if s.group else None
        if lost is not None:
            raise lost from e
        raise
    finally:
        bar.close()
        if tb:
            tb.close()
    with _writing(s, s.run_dir / RUN_FILE):
        s.write_run(status="finished", error=None)


def _record(s: _Session, **changes: Any) -> None:
    """Record how a session ended in run.json, if it can be written: on a full disk the error that
    stopped training is the one to report."""
    try:
        s.write_run(**changes)
    except OSError:
        pass


@contextlib.contextmanager
def _writing(s: _Session, path: Path):
    """Turn a failed write of PATH (a full disk, a read-only folder) into one paragraph that says what
    the run has saved and how to continue. The writes are atomic: nothing is left half-written."""
    try:
        yield
    except OSError as e:
        if isinstance(e, FeatureshiftError):
            raise
        raise _write_error(s, path, e) from e


def _write_error(s: _Session, path: Path, e: OSError) -> WriteError:
    named = OSError(e.errno, e.strerror or str(e) or e.__class__.__name__, os.fspath(path))  # not a temporary name
    if s.saved_epoch is None:
        return write_error(named, f"Nothing of the run {s.run_dir} is saved yet", "run the same command again")
    snaps = sorted((int(p.stem), p.name) for p in (s.run_dir / SNAPSHOT_DIR).glob("*.safetensors") if p.stem.isdigit())
    last = ""
    if snaps:
        epoch, name = snaps[-1]
        # A snapshot is written before the state of its epoch, so it can be one epoch ahead of it.
        last = (f" (its last snapshot: {SNAPSHOT_DIR}/{name})" if epoch <= s.saved_epoch else
                f" (and {SNAPSHOT_DIR}/{name}, whose epoch a resume trains again)")
    return write_error(named, f"The run {s.run_dir} is saved up to epoch {s.saved_epoch}{last}",
                       f"continue with `featureshift train --resume {s.run_dir}`")


def _fit_to_size(model: nn.Module, info: ModelInfo) -> AuxChoice | None:
    """Check the run's input size against the network before anything is written, and leave out
    auxiliary classifiers that cannot run at it."""
    check_input_size(model, info.input_size, info.arch)
    return choose_aux(model, info.input_size, info.arch)


def _finish_epoch(s: _Session, row: dict[str, Any], bar, tb: Tensorboard | None) -> None:
    """Snapshot (every K epochs and the last), then state, then logs: each step atomic, in an order
    where a kill between two steps leaves a consistent, resumable run."""
    e = row["epoch"]
    s.history.append(row)
    snap = e % s.cfg.snapshot_every == 0 or e == s.cfg.epochs
    if not s.main:
        s.group.barrier()  # rank 0 is writing the epoch
        return
    weights = state_on_cpu(s.model)
    if snap:
        with _writing(s, snapshot_path(s.run_dir, e)):
            meta = save_snapshot(s.model, snapshot_path(s.run_dir, e), epoch=e, metrics=row, config=s.run["config"],
                                 parent=s.parent, info=s.info, state=weights)
        s.parent = meta.checksum
    with _writing(s, s.run_dir / STATE_FILE):
        save_state(s.run_dir, TrainState(
            epoch=e, model=weights, optimizer=s.optimizer.state_dict(), scaler=s.scaler.state_dict(),
            rng=rng_state(s.loader_gen), parent=s.parent, history=s.history,
            skipped=[[p, why] for p, why in s.skipped.items()]))
    s.saved_epoch = e
    with _writing(s, s.run_dir / METRICS_FILE):
        write_metrics(s.run_dir, s.history)
    with _writing(s, s.run_dir / RUN_FILE):
        s.write_run(epochs_done=e)
    if s.group:
        # No rank starts the next epoch before this one is on disk: a rank that fails in it
        # leaves a run that resumes from here.
        s.group.barrier()
    if tb:
        tb.log(row)
    if not s.cfg.quiet:
        bar.write(_summary_line(row, s.cfg.epochs, snap), file=sys.stderr)
    if s.on_epoch_end is not None:
        s.on_epoch_end(e, dict(row))
    if snap and s.on_snapshot is not None:
        s.on_snapshot(e, snapshot_path(s.run_dir, e))


def _summary_line(row: dict[str, Any], epochs: int, snap: bool) -> str:
    e = row["epoch"]
    parts = [f"epoch {e:>3}/{epochs}"]
    if e:
        parts.append(f"train loss {_fmt(row['train_loss'])} acc {_fmt(row['train_acc'], '.3f')}")
    parts.append(f"val loss {_fmt(row['val_loss'])} acc {_fmt(row['val_acc'], '.3f')}")
    if row.get("lr") is not None:
        parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"{row['seconds']:.1f}s")
    if snap:
        parts.append(f"-> {SNAPSHOT_DIR}/{e:03d}")
    return "  ".join(parts)


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


# --- a fresh run ---

@dataclasses.dataclass
class _Data:
    index: DatasetIndex  # the training folder: its classes and images
    train: list[Sample]
    val: list[Sample]
    skipped: list[tuple[Any, str]]  # (file, why) of files that are not usable images


def _read_data(cfg: TrainConfig) -> _Data:
    """The training and validation images: --val's folder, else a seeded split of --data."""
    index = scan_image_folder(cfg.data, progress=not cfg.quiet)
    skipped = list(index.skipped)
    if cfg.val:
        vindex = scan_image_folder(cfg.val, progress=not cfg.quiet, classes=index.classes)
        skipped += vindex.skipped
        train, val = index.samples, vindex.samples
        if not val:
            raise FeatureshiftError(f"The validation folder {cfg.val} has no readable images.")
    else:
        train, val = stratified_split(index.samples, cfg.val_fraction, cfg.seed)
    return _Data(index, train, val, skipped)


def _fresh(cfg: TrainConfig, on_epoch_end: EpochHook | None, on_snapshot: SnapshotHook | None,
           group: Group | None = None) -> Path:
    cfg.data, cfg.val = _abs(cfg.data), _abs(cfg.val)
    for k in ("model", "weights"):
        v = getattr(cfg, k)
        if Path(v).exists():
            setattr(cfg, k, _abs(v))
    run_dir = _check_out(cfg)
    if group is not None:
        run_dir = group.share(run_dir)  # a default --out is stamped with the time, which ranks may not agree on
    device = _open_device(cfg, group)
    seed_all(cfg.seed)
    loader_gen = torch.Generator()
    loader_gen.manual_seed(cfg.seed)

    data = _read_data(cfg)
    index, train, val, skipped = data.index, data.train, data.val, data.skipped
    if group is None or group.main:
        warn_skipped(skipped)

    net = open_network(cfg.model, cfg.weights, in_chans=cfg.in_chans, image_size=cfg.img_size)
    model = net.module
    info = model_info(model)
    # What starts untrained learns at --lr, the rest at --pretrained-lr-scale of it (loop.param_groups).
    new_layers: list[str] | None = None if net.weights == "random" else []
    if list(info.class_names) != index.classes:
        replaced = replace_head(model, len(index.classes))
        if new_layers is not None:
            new_layers = replaced
    info = dataclasses.replace(info, num_classes=len(index.classes), class_names=list(index.classes))
    info = with_input_size(info, cfg.image_size)
    attach_info(model, info)
    aux = _fit_to_size(model, info)
    if aux and not aux.used and not cfg.quiet and (group is None or group.main):
        note(f"{info.arch}: {aux.why}.")
    s = _prepare(cfg, run_dir, device, loader_gen, model, info, train, val, new_layers=new_layers,
                 on_epoch_end=on_epoch_end, on_snapshot=on_snapshot, group=group)
    s.parent = net.meta.checksum if net.meta else None

    counts = {c: {"train": 0, "val": 0} for c in index.classes}
    for part, samples in (("train", train), ("val", val)):
        for _, ci in samples:
            counts[index.classes[ci]][part] += 1
    s.run = new_run(
        config=stored_config(cfg),
        model={**info.to_dict(), **({"aux_logits": aux.to_dict()} if aux else {})},
        source={"model": cfg.model, "weights": cfg.weights, "parent": s.parent,
                # None: every layer started untrained; else the layers that did (the new head)
                "new_layers": new_layers},
        dataset={
            "root": cfg.data, "val_root": cfg.val,
            "split": "folder" if cfg.val else f"seeded stratified split: {cfg.val_fraction:g} of each class, seed {cfg.seed}",
            "classes": index.classes, "counts": counts, "train_images": len(train), "val_images": len(val),
            "skipped": [{"path": str(p), "reason": why} for p, why in skipped], "skipped_count": len(skipped),
        },
        cutoff={"value": cfg.cutoff, **s.plan.summary(), "frozen": s.plan.frozen,
                "frozen_batchnorm": s.plan.frozen_norms},
        device=str(device), amp=str(s.amp_dtype).replace("torch.", "") if s.amp_dtype else None,
        workers=s.workers, processes=group.world if group else 1, versions=software_versions(),
    )
    add_session(s.run, 0, cfg.epochs)
    # Every check has passed: only now is anything written or replaced.
    if s.main:
        if cfg.force or restartable(run_dir):
            clear_run(run_dir)
        with _writing(s, run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
        with _writing(s, run_dir / SPLIT_FILE):
            write_split(run_dir, index.classes, train, val)
        with _writing(s, run_dir / RUN_FILE):
            write_run(run_dir, s.run)
    if not cfg.quiet:
        note(s.plan.table(cfg.cutoff))
        note(f"{len(index.classes)} classes, {len(train)} training and {len(val)} validation images; "
             f"device {device}; run folder {run_dir}")
    _run_epochs(s, 0)
    return run_dir


def _abs(p: str | None) -> str | None:
    return str(Path(p).expanduser().resolve()) if p else p


def _check_out(cfg: TrainConfig) -> Path:
    """The run folder to write; refuses one that holds another run, before anything is written."""
    chosen = choose_run_dir(cfg.out, cfg.model, cfg.data, force=cfg.force)
    if chosen.restarting and not cfg.quiet:
        note(f"{chosen.path} holds a run that never finished an epoch ({chosen.restarting}); starting it again.")
    return chosen.path


# --- a resumed run ---

def _resume_config(overrides: dict[str, Any], run_dir: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The configuration of the run in RUN_DIR with OVERRIDES, which may only change how it runs."""
    run = read_run(run_dir)
    refuse_if_training(run, run_dir, "resuming it")
    stored = run["config"]
    for k, v in overrides.items():
        if k in RESUMABLE or k in NOT_STORED:
            continue
        if k in stored and stored[k] != v:
            raise FeatureshiftError(
                f"--resume continues a run with its own settings; '{k}' was {stored[k]!r} and cannot change to {v!r}. "
                f"Only {', '.join(sorted(RESUMABLE))} may change. Start a new run (another --out) to train differently."
            )
    merged = {**stored, **{k: v for k, v in overrides.items() if k in RESUMABLE}}
    merged.setdefault("pretrained_lr_scale", 1.0)  # runs made before the scale existed trained every layer at lr
    cfg = make_config(merged, quiet=overrides.get("quiet", False), resume=str(run_dir), out=str(run_dir))
    return cfg, run


def _resume(cfg: TrainConfig, run: dict[str, Any], on_epoch_end: EpochHook | None,
            on_snapshot: SnapshotHook | None, group: Group | None = None) -> Path:
    run_dir = Path(cfg.resume)
    state = load_state(run_dir)
    done = state.epoch
    history = [r for r in state.history if r["epoch"] <= done]
    if cfg.epochs < done:
        raise FeatureshiftError(f"The run {run_dir} has already trained {done} epochs; --epochs {cfg.epochs} would "
                                f"shorten it. Give --epochs {done} or more.")
    if group is None or group.main:
        warn_unreadable_snapshots(run_dir, done, cfg)
    if cfg.epochs == done:
        if not cfg.quiet:
            note(f"The run {run_dir} has finished all {done} epochs; nothing to do. "
                  f"Extend it with `featureshift train --resume {run_dir} --epochs N`.")
        # A kill between saving the state and updating run.json leaves these a step behind the state.
        if group is None or group.main:
            write_metrics(run_dir, history)
            update_run(run_dir, run, status="finished", epochs_done=done)
        return run_dir

    info = with_input_size(ModelInfo.from_dict(run["model"]), cfg.image_size)
    model = attach_info(build_from_state(info, state.model, run_dir / STATE_FILE), info)
    _fit_to_size(model, info)
    classes, train, val = read_split(run_dir)
    missing = [(p, "missing since the run started") for p, _ in train + val if not p.exists()]
    if missing:
        if group is None or group.main:
            warn_skipped(missing)
        gone = {p for p, _ in missing}
        train, val = [s for s in train if s[0] not in gone], [s for s in val if s[0] not in gone]
        if not train:
            raise FeatureshiftError(f"None of the training images of {run_dir} exist any more (was {run['dataset']['root']} "
                                    "moved?). Put the dataset back where it was to resume.")
    device = _open_device(cfg, group)
    loader_gen = torch.Generator()
    s = _prepare(cfg, run_dir, device, loader_gen, model, info, train, val,
                 new_layers=run.get("source", {}).get("new_layers"), on_epoch_end=on_epoch_end,
                 on_snapshot=on_snapshot, group=group)
    s.optimizer.load_state_dict(state.optimizer)
    if state.scaler:
        s.scaler.load_state_dict(state.scaler)
    set_rng_state(state.rng, loader_gen)
    s.saved_epoch = done
    s.history = history
    s.parent = state.parent
    s.skipped = {p: why for p, why in state.skipped}
    run["config"] = stored_config(cfg)
    add_session(run, done, cfg.epochs)
    run.update(status="running", trainer=this_process(), device=str(device), workers=s.workers,
               processes=group.world if group else 1, error=None)
    s.run = run
    if missing:
        add_skipped(run, missing)
    with _writing(s, run_dir / METRICS_FILE):
        if s.main:
            write_metrics(run_dir, s.history)  # drop rows of an epoch that was in progress
    with _writing(s, run_dir / RUN_FILE):
        s.write_run()
    if not cfg.quiet:
        note(f"resuming {run_dir} after epoch {done}, training to epoch {cfg.epochs}")
    _run_epochs(s, done)
    return run_dir
