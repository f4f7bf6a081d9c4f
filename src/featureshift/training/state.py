"""What resuming a run needs, in RUN/train_state.pt: the weights, the optimizer, the RNG streams,
the snapshot chain and the metrics so far, after the last finished epoch.

The file holds plain types and tensors only, so it opens with torch.load(weights_only=True):
reading it never runs code from it.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..device import mps_available
from ..errors import FeatureshiftError
from ..io import atomic_path
from ..run import STATE_FILE

STATE_FORMAT = 1


@dataclasses.dataclass
class TrainState:
    epoch: int  # the last finished epoch
    model: dict[str, torch.Tensor]  # the weights, on the CPU
    optimizer: dict[str, Any]
    scaler: dict[str, Any]  # the GradScaler's state (float16 mixed precision)
    rng: dict[str, Any]  # see rng_state
    parent: str | None  # checksum of the last snapshot: the next one's parent
    history: list[dict[str, Any]]  # the metrics rows of epochs 0..epoch
    skipped: list[list[str]]  # [path, why] of files that could not be read during training


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(loader_gen: torch.Generator) -> dict[str, Any]:
    """Every random stream training draws from: the global ones and LOADER_GEN (data order, augmentation)."""
    # plain types and tensors only, so the file loads with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "loader": loader_gen.get_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(s: dict[str, Any], loader_gen: torch.Generator) -> None:
    """Restore what rng_state captured."""
    torch.set_rng_state(s["torch"])
    loader_gen.set_state(s["loader"])
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    if s.get("mps") is not None and mps_available():
        torch.mps.set_rng_state(s["mps"])



def save_state(run_dir: str | Path, state: TrainState) -> None:
    """Write RUN/train_state.pt atomically: a kill at any moment leaves the previous epoch's state."""
    # shallow on purpose: dataclasses.asdict would deep-copy every tensor
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    # The size lets a full disk be told from other failures: torch.save reports neither with an errno.
    with atomic_path(Path(run_dir) / STATE_FILE, size=tensor_bytes(fields)) as tmp:
        torch.save({"format": STATE_FORMAT, **fields}, tmp)


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in OBJ (nested dicts, lists and tuples): about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def load_state(run_dir: str | Path) -> TrainState:
    """RUN/train_state.pt, on the CPU; a clear error when the run has none or it cannot be read."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise FeatureshiftError(
            f"The run {run_dir} has no {STATE_FILE}, so it cannot be resumed (it was stopped before its first "
            "snapshot). Start it again with --force."
        )
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatureshiftError(f"{path} could not be read ({e.__class__.__name__}: {e}). "
                                "Start the run again with --force.") from e
    return TrainState(epoch=int(d["epoch"]), model=d["model"], optimizer=d["optimizer"], scaler=d.get("scaler") or {},
                      rng=d["rng"], parent=d["parent"], history=d["history"], skipped=d.get("skipped", []))
