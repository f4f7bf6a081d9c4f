"""The device and precision policy: what `--device` accepts and what it means for a process, a
training rank and a Ray worker; the arithmetic training and rendering run in; batch caps; how
many cores there are and how they are shared.

Each rule is a pure decision on explicit facts about the machine (`choose_device(spec,
cuda_available=..., ...)`), so it can be checked for any machine anywhere, beside a thin
wrapper that asks torch for those facts. torch loads only inside the wrappers: the command
line checks a `--device` without it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import TYPE_CHECKING, Any

from .errors import FeatureshiftError

if TYPE_CHECKING:  # the annotations only
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?|mps")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # of a render's network

# The largest batch worth running at once, by device type: beyond it a CPU gains no speed, only
# memory use; a GPU fills larger ones. A render's batch and a render job's tiles are capped alike,
# so that a job that fills a batch is the unit a cluster schedules.
CPU_MAX_BATCH = 64
GPU_MAX_BATCH = 1024
MAX_LOADER_WORKERS = 8  # image decoders beside a GPU: more only crowd the cores


def check_device_spec(spec: str) -> str:
    """SPEC if it is a device featureshift understands; a clear error otherwise (no torch needed)."""
    spec = str(spec).strip()
    if not _SPEC.fullmatch(spec):
        raise FeatureshiftError(f"Unknown device '{spec}'. Use {DEVICE_CHOICES}.")
    return spec


# ---------------------------------------------------------------- a process

def choose_device(spec: str, *, cuda_available: bool, cuda_count: int, mps_available: bool) -> str:
    """The device a process runs on for SPEC, as torch names it: 'auto' is the first CUDA GPU, else
    Apple's MPS, else the CPU. Asking for a device this machine does not have is an error, never a
    silent fallback."""
    spec = check_device_spec(spec)
    if spec == "auto":
        return "cuda" if cuda_available else "mps" if mps_available else "cpu"
    if spec.startswith("cuda"):
        if not cuda_available:
            raise FeatureshiftError(f"--device {spec} was asked for, but PyTorch sees no CUDA GPU on this "
                                    "machine. Use --device cpu (or auto).")
        index = int(spec.split(":")[1]) if ":" in spec else None
        if index is not None and index >= cuda_count:
            raise FeatureshiftError(f"--device {spec}: this machine has {cuda_count} CUDA GPU(s), numbered from 0.")
    if spec == "mps" and not mps_available:
        raise FeatureshiftError(f"--device {spec} was asked for, but Apple's MPS is not available here. "
                                "Use --device cpu (or auto).")
    return spec


def resolve_device(spec: str = "auto") -> "torch.device":
    """The torch.device of SPEC on this machine (choose_device)."""
    import torch

    cuda = torch.cuda.is_available()
    return torch.device(choose_device(str(spec), cuda_available=cuda, cuda_count=torch.cuda.device_count() if cuda
                                      else 0, mps_available=mps_available()))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


# ---------------------------------------------------------------- a training rank

def choose_rank_device(spec: str, local_rank: int, *, cuda_available: bool, cuda_count: int) -> str:
    """The device of the training process LOCAL_RANK on its machine: cuda:LOCAL_RANK, or the CPU
    ('auto' without CUDA). A single device (cuda:N, mps) cannot be shared by several processes."""
    spec = check_device_spec(spec)
    if spec == "auto":
        spec = "cuda" if cuda_available else "cpu"
    if spec == "mps" or spec.startswith("cuda:"):
        raise FeatureshiftError(
            f"--device {spec} cannot be shared by several training processes: each process takes its own GPU "
            "(cuda:LOCAL_RANK). Give --device cuda (or auto), or cpu.")
    if spec == "cuda":
        choose_device("cuda", cuda_available=cuda_available, cuda_count=cuda_count, mps_available=False)
        if local_rank >= cuda_count:
            raise FeatureshiftError(
                f"Training process {local_rank} on this machine needs cuda:{local_rank}, but the machine has "
                f"{cuda_count} GPU(s). Start at most that many processes per machine "
                "(--nproc, or torchrun's --nproc_per_node).")
        return f"cuda:{local_rank}"
    return "cpu"


def rank_device(spec: str, local_rank: int) -> "torch.device":
    """The torch.device of the training process LOCAL_RANK on this machine (choose_rank_device)."""
    import torch

    cuda = torch.cuda.is_available()
    return torch.device(choose_rank_device(spec, local_rank, cuda_available=cuda,
                                           cuda_count=torch.cuda.device_count() if cuda else 0))


def ranks_use_gpus(spec: str, *, cuda_available: bool) -> bool:
    """Whether `--nproc` processes started for SPEC each take a GPU (else they share the CPU)."""
    return spec in ("auto", "cuda") and cuda_available


# ---------------------------------------------------------------- a render job or a Ray worker

def uses_gpu(spec: str, *, cuda_available: bool) -> bool:
    """Whether renders for SPEC run on a CUDA GPU (their batches and jobs are then GPU-sized)."""
    return spec.startswith("cuda") or (spec == "auto" and cuda_available)


@dataclasses.dataclass(frozen=True)
class RayPlacement:
    """Where a Ray cluster's render tasks run and what each one asks the cluster for."""

    device: str  # what each worker renders on
    gpu: bool
    threads: int | None  # torch threads of a CPU worker (None: a GPU worker keeps its own)
    slots: int  # tasks that run at once
    resources: dict[str, Any]  # each task's request: num_gpus and num_cpus


def ray_placement(spec: str, *, cluster_gpus: int, cluster_cpus: int, widest_node_cpus: int,
                  own_threads: int) -> RayPlacement:
    """The placement of SPEC's render tasks on a cluster: one GPU each where the cluster has GPUs
    ('auto') or SPEC asks for CUDA, else CPU tasks with this process's thread count (OWN_THREADS),
    at most the widest node's cores."""
    if spec.startswith("cuda") and not cluster_gpus:
        raise FeatureshiftError(f"--device {spec} was asked for, but the Ray cluster has no GPUs.")
    if uses_gpu(spec, cuda_available=cluster_gpus > 0):
        return RayPlacement("cuda", True, None, cluster_gpus, {"num_gpus": 1, "num_cpus": 1})
    threads = max(1, min(own_threads, widest_node_cpus or 1))
    return RayPlacement("cpu" if spec in ("auto", "cpu") else spec, False, threads,
                        max(1, cluster_cpus // threads), {"num_cpus": threads})


# ---------------------------------------------------------------- batch caps and cores

def max_batch(gpu: bool) -> int:
    """The largest batch (and render job) worth running at once on a GPU, or elsewhere."""
    return GPU_MAX_BATCH if gpu else CPU_MAX_BATCH


def core_count() -> int:
    """The cores this process may run on (its affinity where the system says, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loader_workers(device_type: str, cores: int) -> int:
    """Image-decoding worker processes for training on DEVICE_TYPE with CORES. On CPU the network's
    own threads use every core and decoding is 5-12% of a step, so one or two (persistent) workers
    overlap it without crowding the cores (benchmarks/train_speed.py on 2 cores: 0.94x a plain
    in-memory loop with one worker, 0.88x with none); a GPU leaves the cores to decoding."""
    if device_type == "cuda":
        return min(MAX_LOADER_WORKERS, max(1, cores - 1))
    return min(2, max(1, cores // 4)) if cores > 1 else 0


def threads_per_process(cores: int, processes: int) -> int:
    """CPU threads for each of PROCESSES sharing CORES (each would otherwise use every core)."""
    return max(1, cores // processes)


# ---------------------------------------------------------------- precision

def choose_training_precision(device_type: str, amp: bool, *, cuda_bf16: bool) -> str | None:
    """Training's mixed precision: bf16 where the GPU has it, else fp16; None (fp32) off CUDA or without AMP."""
    if device_type != "cuda" or not amp:
        return None
    return "bf16" if cuda_bf16 else "fp16"


def choose_render_precision(requested: str, device_type: str, *, cuda_bf16: bool, cpu_native_bf16: bool) -> str:
    """A render network's precision: REQUESTED, or for 'auto' bf16 (fp16 where bf16 is missing) on
    CUDA and on CPUs with native bf16 matrix units, fp32 elsewhere."""
    if requested not in PRECISIONS:
        raise FeatureshiftError(f"Unknown precision '{requested}'; use one of {', '.join(PRECISIONS)}.")
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bf16" if cuda_bf16 else "fp16"
    return "bf16" if device_type == "cpu" and cpu_native_bf16 else "fp32"


def cuda_bf16_supported(device: "torch.device") -> bool:
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def cpu_has_native_bf16() -> bool:
    # AMX tiles or AVX-512 BF16 dot products: oneDNN runs a render's network 1.2-1.9x faster in
    # bf16 than in fp32 (measured on an AVX-512 BF16 CPU: SqueezeNet, GoogLeNet, VGG16, ResNet-50,
    # InceptionV3); without either, bf16 is emulated and slower than fp32.
    import torch

    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(device: "torch.device", requested: str) -> str:
    """A render network's precision on DEVICE of this machine (choose_render_precision)."""
    auto = requested == "auto"  # only then do the machine's facts matter
    return choose_render_precision(requested, device.type, cuda_bf16=auto and cuda_bf16_supported(device),
                                   cpu_native_bf16=auto and device.type == "cpu" and cpu_has_native_bf16())


def amp_dtype(device: "torch.device", amp: bool) -> "torch.dtype | None":
    """Training's mixed-precision type on DEVICE (choose_training_precision); None: float32."""
    return torch_dtype(choose_training_precision(device.type, amp, cuda_bf16=cuda_bf16_supported(device)))


def torch_dtype(precision: str | None) -> "torch.dtype | None":
    """The autocast type of a precision name; None for fp32 (no autocast)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision or "fp32")


def autocast(device: "torch.device", dtype: "torch.dtype | None"):
    """The network's forward pass in DTYPE on DEVICE (torch.autocast); as it is when DTYPE is None."""
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device.type, dtype=dtype)
