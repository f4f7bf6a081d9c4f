"""The saved states of one network that a timeline follows, whatever their kind: the
snapshots of a featureshift run (RUN/snapshots/NNN.safetensors) or a folder of ONNX files
(the epochs of a network trained elsewhere, taken in natural order: epoch2 before epoch10).

A `State` names its file, the checksum its tiles are cached under and its metadata (or
why it cannot be used); `network.open_network` opens either kind from its path or from its
bytes (what a Ray worker receives), so that commands and executors treat both kinds alike.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .errors import FeatureshiftError
from .io import natural_key
from .run import RUN_FILE, SNAPSHOT_DIR, list_snapshots, select_snapshots

SNAPSHOT = "snapshot"
ONNX = "onnx"
ONNX_SUFFIX = ".onnx"  # as models.onnx.common


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How to feed ONNX files that do not carry their own preprocessing (the CLI's --mean, --std,
    --input-size); a value left None comes from each file's metadata or graph."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: int | tuple[int, int] | None = None  # pixels, or (height, width)

    @classmethod
    def of(cls, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           input_size: int | Sequence[int] | None = None) -> Preprocessing | None:
        """The preprocessing the arguments give, or None when they give nothing."""
        if mean is None and std is None and input_size is None:
            return None
        return cls(None if mean is None else tuple(float(v) for v in mean),
                   None if std is None else tuple(float(v) for v in std),
                   None if input_size is None else int(input_size) if isinstance(input_size, int)
                   else tuple(int(v) for v in input_size))

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `network.open_network` (and `models.onnx.convert.import_onnx`)."""
        return {"mean": self.mean, "std": self.std, "input_size": self.input_size}


@dataclasses.dataclass
class State:
    """One saved state of the network: a row of a timeline.

    `epoch` numbers the row: a snapshot's epoch, an ONNX file's position in natural order (0
    first). `meta` is None when the file cannot be used (`error` says why); an ONNX file's
    is made from its graph and metadata: its info, the `featureshift.epoch` of an export (else
    None), and as checksum the sha256 of its bytes (with the preprocessing given, if any).
    """

    epoch: int
    path: Path
    meta: Any = None  # snapshot.SnapshotMeta
    error: str | None = None
    kind: str = SNAPSHOT
    preprocessing: Preprocessing | None = None  # ONNX files only

    @property
    def checksum(self) -> str | None:
        """What names this state's tiles in the cache (None when it cannot be read)."""
        return None if self.meta is None else self.meta.checksum


def is_onnx_folder(folder: str | os.PathLike) -> bool:
    """Whether FOLDER holds ONNX files and is not a featureshift run."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / RUN_FILE).is_file() or (folder / SNAPSHOT_DIR).is_dir():
        return False
    return bool(onnx_files(folder))


def onnx_files(folder: str | os.PathLike) -> list[Path]:
    """The ONNX files in FOLDER (not in its sub-folders), in natural order of their names."""
    # Hidden files include half-written temporaries of atomic writes.
    return sorted((p for p in Path(folder).iterdir()
                   if p.suffix.lower() == ONNX_SUFFIX and p.is_file() and not p.name.startswith(".")),
                  key=natural_key)


def list_states(folder: str | os.PathLike, snapshots: str | Sequence[int] | None = None, every: int | None = None,
                *, preprocessing: Preprocessing | None = None) -> list[State]:
    """The states in FOLDER, in order: a run's snapshots, or the ONNX files of a folder of them.

    SNAPSHOTS ("0,1,5-10" or a list) or EVERY (multiples of N) choose by row number: the epoch
    of a snapshot, the position of an ONNX file (0 first). PREPROCESSING: for ONNX files that
    do not carry theirs. A file that cannot be used is a State with its `error`.
    """
    if is_onnx_folder(folder):
        entries = select_snapshots(list(enumerate(onnx_files(folder))), snapshots, every)
        return [read_onnx_state(i, path, preprocessing) for i, path in entries]
    try:
        found = list_snapshots(folder)
    except FeatureshiftError as e:
        if Path(folder).is_dir() and not (Path(folder) / RUN_FILE).is_file():
            raise FeatureshiftError(f"{e} Or give a folder of ONNX files (.onnx), one state each.") from e
        raise
    entries = select_snapshots(found, snapshots, every)
    return [read_snapshot_state(epoch, path) for epoch, path in entries]


def read_snapshot_state(epoch: int, path: str | os.PathLike) -> State:
    """The State of a snapshot file: its metadata (weights are not loaded), or why it cannot be read."""
    from .snapshot import read_meta

    try:
        return State(epoch, Path(path), read_meta(path))
    except FeatureshiftError as e:
        return State(epoch, Path(path), error=str(e))


def read_onnx_state(index: int, path: str | os.PathLike, preprocessing: Preprocessing | None = None) -> State:
    """The State of an ONNX file: its graph converted (unchecked) for the info, the sha256 of its
    bytes as checksum; or why it cannot be used."""
    from .models.onnx.convert import import_onnx
    from .models.onnx.metadata import read_metadata
    from .snapshot import SnapshotMeta

    path = Path(path)
    try:
        data = path.read_bytes()
        imported = import_onnx(path, data=data, check=False, **(preprocessing or Preprocessing()).kwargs())
        epoch = read_metadata(imported.model).get("epoch")
    except OSError as e:
        return State(index, path, error=f"{path} cannot be read ({e}).", kind=ONNX, preprocessing=preprocessing)
    except FeatureshiftError as e:
        return State(index, path, error=str(e), kind=ONNX, preprocessing=preprocessing)
    meta = SnapshotMeta(imported.module.featureshift_info, epoch=epoch if isinstance(epoch, int) else None,
                        checksum=onnx_checksum(data, preprocessing), path=str(path))
    return State(index, path, meta, kind=ONNX, preprocessing=preprocessing)


def onnx_checksum(data: bytes, preprocessing: Preprocessing | None = None) -> str:
    """The sha256 of an ONNX file's bytes; with PREPROCESSING, of the bytes and the preprocessing
    (it replaces the file's own and changes what the network is shown)."""
    digest = hashlib.sha256(data).hexdigest()
    if preprocessing is None:
        return digest
    given = json.dumps([digest, dataclasses.asdict(preprocessing)], sort_keys=True)
    return hashlib.sha256(given.encode()).hexdigest()
