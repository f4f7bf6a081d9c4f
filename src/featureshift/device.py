"""The one device rule: what `--device` accepts and what it means, for every command."""
from __future__ import annotations

import re

from .errors import FeatureshiftError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def check_device_spec(spec: str) -> str:
    """SPEC if it is a device featureshift understands; a clear error otherwise (no torch needed)."""
    spec = str(spec).strip()
    if not _SPEC.fullmatch(spec):
        raise FeatureshiftError(f"Unknown device '{spec}'. Use {DEVICE_CHOICES}.")
    return spec


def resolve_device(spec: str = "auto"):
    """A torch.device for SPEC: 'auto' is the first CUDA GPU, else Apple's MPS, else the CPU.
    Asking for a device this machine does not have is an error, never a silent fallback."""
    import torch

    spec = check_device_spec(str(spec))
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FeatureshiftError(f"--device {spec} was asked for, but PyTorch sees no CUDA GPU on this "
                                    "machine. Use --device cpu (or auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FeatureshiftError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA "
                                    f"GPU(s), numbered from 0.")
    if dev.type == "mps" and not mps_available():
        raise FeatureshiftError(f"--device {spec} was asked for, but Apple's MPS is not available here. "
                                "Use --device cpu (or auto).")
    return dev


def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
