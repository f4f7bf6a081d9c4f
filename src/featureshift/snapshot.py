"""The snapshot file: one network state, self-contained and safe to open.

A snapshot is a safetensors file: the weights plus JSON metadata (architecture,
classes, preprocessing, epoch, metrics, training configuration, the parent
snapshot's checksum). Opening one never executes code from the file. Files are
written atomically, so a crash never leaves a half-written snapshot under its name.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FeatureshiftError
from .io import atomic_path
from .models.info import ModelInfo, attach_info, model_info
from .models.zoo import aux_heads, build, drop_aux_heads
from .version import __version__

FORMAT = "featureshift.snapshot/1"


@dataclasses.dataclass
class SnapshotMeta:
    info: ModelInfo
    epoch: int | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    parent: str | None = None  # checksum of the snapshot this one was trained from
    checksum: str = ""  # sha256 of the weights (names, dtypes, shapes, bytes); metadata excluded
    created: str = ""
    version: str = __version__
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["info"] = self.info.to_dict()
        d.pop("path")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | None = None) -> "SnapshotMeta":
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d["info"] = ModelInfo.from_dict(d["info"])
        # Snapshots written before the info recorded the training size still have it in their config.
        size = (d.get("config") or {}).get("image_size")
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            d["info"] = with_input_size(d["info"], size)
        return cls(**d, path=path)


def with_input_size(info: ModelInfo, size: int | None) -> ModelInfo:
    """INFO for a network trained on SIZE px crops: the input size every later command uses by
    default (info, layers, probes), with the resize before the crop scaled alike. None: INFO as is."""
    if not size or size == info.input_size:
        return info
    resize = max(size, round(size * info.resize_size / info.input_size))
    return dataclasses.replace(info, input_size=int(size), resize_size=int(resize))


def weights_checksum(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the bytes
    return h.hexdigest()


def state_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def network_checksum(model: nn.Module, checksum: str | None = None, *, with_preprocessing: bool = False) -> str:
    """The checksum that names MODEL in a cache: CHECKSUM, its snapshot's (from the metadata),
    when it was loaded from one; else one made from the module itself.

    Made here, it is the `weights_checksum` of its state dict, the checksum a snapshot of these
    weights records, so the probe statistics of a network in memory and of its snapshot share
    their cache. `with_preprocessing` (tile keys): a picture also depends on the module's class
    and on the input it expects, so the checksum made here covers those too ("held-" and a
    sha256 of the weights checksum, the class, the input bands, mean and std)."""
    if checksum:
        return checksum
    weights = weights_checksum(state_on_cpu(model))
    if not with_preprocessing:
        return weights
    info = model_info(model)
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    blob = repr((weights, kind, info.in_chans, tuple(info.mean), tuple(info.std)))
    return "held-" + hashlib.sha256(blob.encode()).hexdigest()


def save_snapshot(model: nn.Module, path: str | Path, *, epoch: int | None = None,
                  metrics: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                  parent: str | None = None, info: ModelInfo | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> SnapshotMeta:
    """Write `model` and its metadata to `path` atomically; returns the metadata written.

    state: `state_on_cpu(model)` when the caller already made it (training saves the same
    weights in its resume state), so the weights are copied off the device once."""
    from safetensors.torch import save_file

    state = state_on_cpu(model) if state is None else state
    meta = SnapshotMeta(
        info=info or model_info(model), epoch=epoch, metrics=dict(metrics or {}), config=dict(config or {}),
        parent=parent, checksum=weights_checksum(state),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    # The size lets a full disk be told from other failures: safetensors reports neither with an errno.
    with atomic_path(path, size=sum(t.numel() * t.element_size() for t in state.values())) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "featureshift": json.dumps(meta.to_dict(), default=str)})
    meta.path = str(path)
    return meta


def _bad(path: Path | str, why: str) -> FeatureshiftError:
    return FeatureshiftError(
        f"{path} is not a readable featureshift snapshot: {why}. It may be truncated or damaged; "
        "use another snapshot or save it again."
    )


def read_meta(path: str | Path) -> SnapshotMeta:
    """The metadata of a snapshot, without loading its weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FeatureshiftError(f"Snapshot {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:
        raise _bad(path, f"{e.__class__.__name__}: {e}") from e
    return meta_from_header(raw, path)


def meta_from_header(raw: dict, source: str | Path) -> SnapshotMeta:
    """The featureshift metadata of a safetensors header's `__metadata__` (RAW), checked."""
    if raw.get("format") != FORMAT or "featureshift" not in raw:
        raise _bad(source, "it holds no featureshift metadata (plain safetensors weights can be loaded with "
                   "`--model NAME --weights FILE` once saved as a state dict)")
    try:
        return SnapshotMeta.from_dict(json.loads(raw["featureshift"]), path=str(source))
    except (ValueError, KeyError, TypeError) as e:
        raise _bad(source, f"its metadata is malformed ({e})") from e


def load_snapshot(path: str | Path, device: str | torch.device = "cpu", verify: bool = True, *,
                  data: bytes | None = None) -> tuple[nn.Module, SnapshotMeta]:
    """(network in eval mode, metadata) of the snapshot at PATH, or in DATA, the file's bytes (what a
    process receives that cannot read the file; PATH then only names it in messages). The weights'
    checksum is verified unless verify=False. Commands open networks with `network.open_network`."""
    meta, state = _read_file(Path(path)) if data is None else _read_bytes(data, str(path))
    if verify and weights_checksum(state) != meta.checksum:
        raise _bad(path, "its weights do not match the checksum stored with them")
    model = build_from_state(meta.info, state, path)
    return attach_info(model.to(device).eval(), meta.info), meta


def _read_file(path: Path) -> tuple[SnapshotMeta, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    meta = read_meta(path)
    try:
        return meta, load_file(str(path))
    except Exception as e:
        raise _bad(path, f"{e.__class__.__name__}: {e}") from e


def _read_bytes(data: bytes, source: str) -> tuple[SnapshotMeta, dict[str, torch.Tensor]]:
    import struct

    from safetensors.torch import load as load_safetensors

    try:
        (length,) = struct.unpack("<Q", data[:8])
        raw = json.loads(data[8:8 + length]).get("__metadata__") or {}
    except Exception as e:
        raise _bad(source, f"{e.__class__.__name__}: {e}") from e
    meta = meta_from_header(raw, source)  # the same checks as read_meta
    try:
        return meta, load_safetensors(data)
    except Exception as e:
        raise _bad(source, f"{e.__class__.__name__}: {e}") from e


def build_from_state(info: ModelInfo, state: dict[str, torch.Tensor], source: Path | str) -> nn.Module:
    # Build on the meta device (no time spent on a random init that is overwritten at once).
    with torch.device("meta"):
        model = build(info.arch, num_classes=info.num_classes, pretrained=False, in_chans=info.in_chans,
                      img_size=info.img_size)
    _drop_absent_aux_heads(model, state)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()][:3]
        raise FeatureshiftError(
            f"The weights in {source} do not fit the '{info.arch}' architecture its metadata names "
            f"({' '.join(lines)[:400]}). The file was probably edited or written by another tool."
        ) from e
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:  # non-persistent buffers: build normally and load again
        model = build(info.arch, num_classes=info.num_classes, pretrained=False, in_chans=info.in_chans,
                      img_size=info.img_size)
        _drop_absent_aux_heads(model, state)
        model.load_state_dict(state)
    return model


def _drop_absent_aux_heads(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    # A network fine-tuned at a size too small for its auxiliary classifier was trained without it.
    absent = [h for h in aux_heads(model) if not any(k.startswith(h + ".") for k in state)]
    drop_aux_heads(model, absent)
