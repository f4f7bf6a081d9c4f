"""Training in several processes with DistributedDataParallel: `featureshift train --nproc N` on
this machine, or `torchrun ... -m featureshift train ...` on one or more machines.

Each process (rank) trains on its part of every global batch (`--batch-size` is the global batch,
data.ShardedSeededBatches cuts it) on its own device: cuda:LOCAL_RANK over NCCL, or the CPU over
gloo. Gradients are averaged by DDP; the epoch's metrics are summed over the ranks; validation is
sharded (each rank evaluates every world-th image) and summed. Rank 0 alone writes the run folder,
and every rank waits for it at the end of each epoch, so a failure in epoch E leaves epochs
before E complete on disk and the run resumable, with any number of processes.

Random streams: the initial weights, the data order and the augmentation seeds come from the
run's seed, the same on every rank; the global generators that training draws from (dropout)
are seeded anew each epoch from (seed, epoch, rank), so ranks draw independently and a resumed
run continues exactly as an uninterrupted one with the same number of processes.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..device import core_count, rank_device, ranks_use_gpus, threads_per_process
from ..errors import FeatureshiftError
from .loop import Stats
from .state import seed_all

# Test hook: the last rank kills itself with SIGKILL when this epoch begins (a rank that dies).
DIE_AT_EPOCH_ENV = "FEATURESHIFT_TEST_DIE_AT_EPOCH"
# Rank 0 may render a --visualize row between epochs while the others wait for it.
TIMEOUT = _dt.timedelta(minutes=60)


def launched_world() -> int:
    """The number of processes torchrun (or --nproc) started this one among; 1 when run plainly."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def main_process() -> bool:
    """Whether this process is rank 0 of the processes torchrun started, or was started alone."""
    return os.environ.get("RANK", "0") == "0" or launched_world() <= 1


@dataclasses.dataclass(frozen=True)
class Group:
    """This process's place among the training processes, and the collective steps training uses."""

    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run folder and prints."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """MODEL in DistributedDataParallel (its weights are broadcast from rank 0).

        static_graph: the same parameters take part in every step (frozen ones never), so DDP learns
        which once rather than searching the graph every step, and a parameter the forward pass
        never uses does not stop training.
        """
        ids = [self.device] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)

    def share(self, value: Any) -> Any:
        """Rank 0's VALUE, on every rank (a small picklable object)."""
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        torch.distributed.barrier()

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank: each rank's last forward
        pass updated its own, and validation and the snapshots must see one network."""
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)

    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def reduce(self, s: Stats) -> Stats:
        """Training or validation metrics over every rank's images."""
        n = s.images
        loss, correct, n = self._sum([(s.loss or 0.0) * n, round((s.acc or 0.0) * n), n])
        n = int(n)
        return Stats(loss / n, correct / n, n) if n else Stats(None, None, 0)

    def loss_scale(self, loader: torch.utils.data.DataLoader) -> Callable[[int, int], float]:
        """train_one_epoch's loss_scale for LOADER (from make_loaders): each rank's loss weighted by its
        share of the global batch, so that DDP's mean of the ranks' gradients is the gradient of the
        global batch's mean loss also where the parts differ in size (a last, smaller batch)."""
        sizes = loader.batch_sampler.global_sizes()
        return lambda i, n: n * self.world / sizes[i]

    def start_epoch(self, seed: int, epoch: int) -> None:
        """Seed the global generators for EPOCH on this rank (see the module's docstring)."""
        seed_all(int(np.random.SeedSequence([seed, epoch, self.rank]).generate_state(1, np.uint64)[0]) % 2**63)
        if os.environ.get(DIE_AT_EPOCH_ENV) == str(epoch) and self.rank == self.world - 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def peer_failure(self, error: BaseException, run_dir: Path) -> FeatureshiftError | None:
        """A clear error for a collective step that failed because another rank is gone; None for other errors."""
        dist_errors = tuple(getattr(torch.distributed, n) for n in ("DistError",) if hasattr(torch.distributed, n))
        text = str(error)
        if not (isinstance(error, dist_errors) or (isinstance(error, RuntimeError) and any(
                w in text for w in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset")))):
            return None
        first = text.strip().splitlines()[0][:300] if text.strip() else error.__class__.__name__
        return FeatureshiftError(
            f"Training process rank {self.rank} lost the other processes of the run ({first}): another rank "
            f"stopped. Every finished epoch is saved in {run_dir}; continue with "
            f"`featureshift train --resume {run_dir} --nproc {self.world}` (or the same torchrun command with "
            f"--resume {run_dir}).")


def join(device_spec: str) -> Group | None:
    """Under torchrun or --nproc: this process's Group, with the process group started (NCCL on
    GPUs, gloo on CPUs). None when this is the only process."""
    world = launched_world()
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device_spec, local_rank)
    if not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=TIMEOUT,
                                             device_id=device if device.type == "cuda" else None)
    return Group(rank=rank, local_rank=local_rank, world=world, device=device)


def leave(group: Group | None) -> None:
    """End the process group started by join."""
    if group is not None and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --- `--nproc N`: start the processes here ---

def launch(entrypoint: Callable[[dict[str, Any]], Any], config: dict[str, Any], nproc: int, run_dir: Path) -> Path:
    """Call ENTRYPOINT(CONFIG) in NPROC processes on this machine, as `torchrun --standalone
    --nproc_per_node NPROC` would; returns the run folder RUN_DIR. ENTRYPOINT trains CONFIG
    (TrainConfig's fields, nproc 1) as one rank: a module-level function wrapped in
    torch.distributed.elastic's `record`, so that a failure's message reaches this process.

    A process that fails ends every other one; the error says which, and how to continue."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    device = str(config.get("device") or "auto")
    threads: dict[str, str] = {}
    if ranks_use_gpus(device, cuda_available=torch.cuda.is_available()):
        if nproc > torch.cuda.device_count():
            raise FeatureshiftError(f"--nproc {nproc} needs {nproc} GPUs (one per process); this machine has "
                                    f"{torch.cuda.device_count()}. Give --nproc {torch.cuda.device_count()} or less.")
    else:
        rank_device(device, 0)  # refuse cuda:N and mps before starting anything
        # Every process would otherwise use every core: share them out (torchrun gives each 1).
        threads = {"OMP_NUM_THREADS": str(threads_per_process(core_count(), nproc))}
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"featureshift-{os.getpid()}",
                      rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                      start_method="spawn",
                      # When one process fails, the others may be waiting inside a collective step, where
                      # SIGTERM is not handled: don't wait the default 30 s before ending them.
                      shutdown_timeout=5)
    # The launcher logs every failure at length; the error below says what matters.
    logs = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    threads = {k: v for k, v in threads.items() if k not in os.environ}  # the user's setting wins
    os.environ.update(threads)  # the processes start with this process's environment
    try:
        elastic_launch(lc, entrypoint)(config)
    except ChildFailedError as e:
        raise _launch_failure(e, run_dir, nproc) from None
    except SignalException as e:
        # Ctrl-C reached every process; rank 0 has marked the run interrupted
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise FeatureshiftError(f"Training was stopped by {e.sigval.name}. Every finished epoch is saved; continue "
                                f"with `featureshift train --resume {run_dir} --nproc {nproc}`.") from None
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
        for k in threads:
            os.environ.pop(k, None)
    return run_dir


def _launch_failure(e, run_dir: Path, nproc: int) -> FeatureshiftError:
    from ..run import STATE_FILE, is_run, read_run, update_run

    def text_of(f) -> str:
        return f.message.get("message", "") if isinstance(f.message, dict) else str(f.message or "")

    def consequence(f) -> bool:
        # a rank that noticed another one was gone, or that the launcher stopped after one failed
        return "lost the other processes" in text_of(f) or f.exitcode == -signal.SIGTERM

    rank, f = min(e.failures.items(), key=lambda kv: (consequence(kv[1]), kv[1].timestamp, kv[0]))
    message = text_of(f)
    if message.startswith("To enable traceback"):  # elastic's text when the process left no error of its own
        message = ""
    own = message.startswith("FeatureshiftError: ")
    if f.exitcode < 0:
        try:
            what = f"was killed by signal {signal.Signals(-f.exitcode).name}"
        except ValueError:
            what = f"was killed by signal {-f.exitcode}"
    elif own:
        what = "stopped"
    else:
        what = f"failed with exit code {f.exitcode}" + (f" ({message.splitlines()[0][:300]})" if message else "")
    resumable = is_run(run_dir) and (run_dir / STATE_FILE).is_file()
    if own and not resumable:
        return FeatureshiftError(message[len("FeatureshiftError: "):])
    if is_run(run_dir):
        try:
            run = read_run(run_dir)
            if run.get("status") in ("running", "failed"):  # the cause, rather than what rank 0 saw
                update_run(run_dir, run, status="failed", error=f"training process rank {rank} {what}")
        except (FeatureshiftError, OSError):
            pass
    detail = f" {message[len('FeatureshiftError: '):]}" if own else ""
    cont = (f" Every finished epoch is saved; continue with `featureshift train --resume {run_dir} --nproc {nproc}`."
            if resumable else " Nothing was trained yet; run the same command again.")
    return FeatureshiftError(f"Training process rank {rank} (pid {f.pid}) {what}, which ended the run.{detail}{cont}")
