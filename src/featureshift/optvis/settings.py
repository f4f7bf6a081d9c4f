"""Every option that decides a render's pixels, with its default, in one record.

The API (`render(model, targets, settings)`), the command-line options of every
rendering command, the tile cache key and the report's "rendered with" line all read
a RenderSettings, so a default is written once, here. How a render is executed
(device, batch size, progress bars) is not a setting: it does not change the picture
beyond floating-point noise and is passed separately.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Mapping

from ..device import PRECISIONS
from ..flags import flag
from .transforms import Transforms

OBJECTIVES = ("channel", "neuron", "negative", "logit", "diversity", "gained", "lost")
PARAMS = ("fft", "pixel")
DIVERSITY_WEIGHT = 100.0
METHODS = ("lucid", "maco", "accent")
# Each method's learning rate and schedule (lr, lr_hold, lr_final), measured for each: MACO
# moves a standardized phase, accentuation a photo, and neither gains from Lucid's faster one.
METHOD_LR = {"lucid": (0.6, 0.7, 0.2), "maco": (0.2, 1.0, 1.0), "accent": (0.2, 1.0, 1.0)}
# Lucid's learning rate is lowered for long renders so that lr * steps stays at most this
# (Lucid's own: 0.05 * 512 = 25.6): at a fixed lr, every step past the first ~50 only raises the
# contrast until most pixels saturate (measured: 73% at 128 steps with lr 0.6, 22% with 0.225).
LUCID_LR_BUDGET = 28.8
# The settings only one method reads; a Lucid render's cache key leaves them all out.
METHOD_FIELDS = {"lucid": (), "maco": ("spectrum", "crops", "crop_scale", "noise"),
                 "accent": ("image", "accent_weight")}


_LUCID_LR = METHOD_LR["lucid"]


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """The fields with a flag are the rendering commands' options (help and default written here)."""

    steps: int = flag(64, "Optimization steps per image (the original tool: 2048).")  # Lucid: 512; docs/render.md
    size: int = flag(128, "Image size in pixels (the original tool: 144).")
    seed: int = flag(0, "Seed of each channel's starting noise and transforms; same seed, same image.")
    # Adam's learning rate, then its schedule: the lr is held for the first lr_hold of the steps,
    # then falls linearly to lr_final * lr at the last step. None: the method's own (METHOD_LR,
    # LUCID_LR_BUDGET; Lucid's recipe: 0.05, constant; see docs/render.md, "Time to quality").
    lr: float | None = flag(None, "Adam learning rate.", type=float, default_text=(
        f"lucid: {_LUCID_LR[0]:g}, or {LUCID_LR_BUDGET:g}/steps where that is lower; "
        + ", ".join(f"{m}: {lr:g}" for m, (lr, _, _) in METHOD_LR.items() if m != "lucid")
        + "; Lucid's own recipe: 0.05"))
    lr_hold: float | None = flag(None, "The fraction of the steps at the full learning rate, after which it falls "
                                 "linearly.", type=float,
                                 default_text=f"{_LUCID_LR[1]:g} (lucid), 1 (maco, accent); Lucid's: 1, constant")
    lr_final: float | None = flag(None, "The learning rate at the last step, as a fraction of --lr.", type=float,
                                  default_text=f"{_LUCID_LR[2]:g} (lucid), 1 (maco, accent)")
    betas: tuple[float, float] = (0.5, 0.99)  # Adam's moment decay rates (Lucid: torch's 0.9, 0.999)
    param: str = flag("fft", "Image parameterization: 1/f-scaled Fourier spectrum with decorrelated colour, or plain "
                      "pixels.", choices=PARAMS)
    # a name from OBJECTIVES, or an Objective from optvis.objectives
    objective: Any = flag("channel", "channel: spatial mean; neuron: center position; negative: minimize; logit: "
                          "class logit (layer 'logits', channels = class indices); diversity: several different "
                          "images per channel; gained, lost: what the channel responds to more after than before, and "
                          "the reverse, with two networks rendered together (`featureshift compare A B --diff`, "
                          "optvis.pair).", choices=OBJECTIVES)
    diversity: int | None = flag(None, "Images per channel, pushed apart by a Gram-matrix penalty.", type=int,
                                 default_text="4 with --objective diversity, else 1")  # see `copies`
    diversity_weight: float = flag(DIVERSITY_WEIGHT, "Weight of the diversity penalty (Lucid's; it depends on the "
                                   "scale of the layer's activations).")
    transforms: Transforms = Transforms()
    decay_power: float = 1.0
    init_sd: float = 0.01
    fft_divisor: float = 4.0
    decorrelate: bool = True
    relu_redirect_steps: int = 16
    precision: str = flag("auto", "The network's arithmetic during a render: auto is bf16 on CUDA and on CPUs with "
                          "native bf16 (AMX or AVX-512 BF16), where it is about 1.5x faster, else fp32.",
                          choices=PRECISIONS)  # the parameterization stays fp32
    include_cls: bool = flag(False, "Token layers of vision transformers: average a unit over the class (prefix) "
                             "tokens too, not the patch tokens only.", default_text="patch tokens only")
    method: str = flag("lucid", "lucid: Lucid's recipe (1/f spectrum, transforms); maco: only the Fourier phase is "
                       "optimized, the magnitude fixed to a natural-image spectrum (the run's own images where there "
                       "is a run); accent: start from --image and change it only as much as the channel needs.",
                       choices=METHODS)  # optvis.maco, optvis.accent
    spectrum: str | None = flag(None, "--method maco: a magnitude spectrum file (.npz/.npy).", path="file",
                                default_text="the run's training images, else the spectrum shipped with "
                                             "featureshift")  # maco.save_spectrum writes one
    crops: int = flag(4, "--method maco: random crops of the canvas the network sees per step.")
    crop_scale: tuple[float, float] = (0.5, 1.0)  # maco: range of a crop's side, as a fraction of the canvas
    noise: float = flag(0.05, "--method maco: sd of the Gaussian noise added to every crop each step.")
    image: str | tuple[str, ...] | None = flag(None, "--method accent: the photo to accentuate (the same photo on "
                                               "every snapshot).", path="file")  # or one per target
    accent_weight: float = flag(3.0, "--method accent: how strongly the picture is held to the photo.")

    def replace(self, **changes: Any) -> "RenderSettings":
        """A copy with CHANGES; None values keep the current setting ("as before")."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown render setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def resolved(self) -> "RenderSettings":
        """A copy with the learning rate and its schedule that the method uses where they are None."""
        own = dict(zip(("lr", "lr_hold", "lr_final"), METHOD_LR.get(self.method, METHOD_LR["lucid"])))
        if self.method == "lucid":
            own["lr"] = min(own["lr"], LUCID_LR_BUDGET / max(int(self.steps), 1))
        return dataclasses.replace(self, **{k: v for k, v in own.items() if getattr(self, k) is None})

    @property
    def copies(self) -> int:
        if self.diversity is not None:
            return int(self.diversity)
        return 4 if self.objective == "diversity" else 1

    def key_fields(self) -> dict[str, Any]:
        """What goes into a tile's cache key: every field, objectives by their repr, a method's
        own settings only for that method, files (spectrum, image) by name and content hash."""
        self = self.resolved()
        own = METHOD_FIELDS.get(self.method, ())
        unused = {name for fields in METHOD_FIELDS.values() for name in fields} - set(own)
        if self.method == "lucid":  # as before these settings existed: earlier tiles stay valid
            unused.add("method")
        if not self.include_cls:
            unused.add("include_cls")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in unused}
        d["transforms"] = dataclasses.asdict(self.transforms)
        for name in ("spectrum", "image"):  # files by content: a changed file is a new picture
            if d.get(name) is not None:
                paths = (d[name],) if isinstance(d[name], (str, os.PathLike)) else d[name]
                d[name] = [f"{os.path.basename(p)}:{file_digest(p)}" for p in paths]
        if not isinstance(d["objective"], str):
            d["objective"] = repr(d["objective"])
        return d

    def to_record(self) -> dict[str, Any]:
        """Every field as given (not resolved: a learning rate left to the method stays None,
        so settings reused with other steps get those steps' rate), as JSON values: what a
        tile header, a timeline's merged.png and atlas.json record. Files (spectrum, image) by
        path (`from_record` reopens them; the tile key holds their content), an Objective
        object by its repr (enough to name and key it, not to render it again)."""
        record: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "transforms":
                value = dataclasses.asdict(value)
            elif f.name == "objective" and not isinstance(value, str):
                value = repr(value)
            elif isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif isinstance(value, tuple):
                value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
            record[f.name] = value
        return json.loads(json.dumps(record))  # the very values a reader gets back from the file

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> "RenderSettings":
        """The settings a record holds: one from `to_record`, or one written by an earlier version
        (a timeline's few recorded settings, a tile header or atlas.json's settings with their
        fields at the top level). Missing fields keep their defaults and other keys (a tile
        header's layer, channel, score, ...) are ignored; lists come back as tuples."""
        names = {f.name for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for name, value in (record or {}).items():
            if name not in names or value is None:  # None is every optional field's default
                continue
            if name == "transforms" and isinstance(value, Mapping):
                known = {f.name for f in dataclasses.fields(Transforms)}
                value = Transforms(**{k: _as_tuple(v) for k, v in value.items() if k in known})
            changes[name] = _as_tuple(value)
        return cls(**changes)

    def describe(self) -> str:
        """One line for people: the settings that differ from the defaults shown first."""
        self = self.resolved()
        main = ("" if self.method == "lucid" else f"{self.method}, ") + \
               f"{self.objective if isinstance(self.objective, str) else repr(self.objective)}, " \
               f"{self.steps} steps, {self.size} px, seed {self.seed}, lr {self.lr:g}, {self.param}"
        default = RenderSettings(method=self.method).resolved()
        extra = [f"{f.name} {getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if f.name not in ("objective", "steps", "size", "seed", "lr", "param", "method")
                 and getattr(self, f.name) != getattr(default, f.name)]
        return main + "".join(f", {e}" for e in extra)


DEFAULT_SETTINGS = RenderSettings()


def _as_tuple(value: Any) -> Any:
    # JSON has lists only; the settings hold tuples (hashable, as a frozen record needs)
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def file_digest(path: str | os.PathLike) -> str:
    """The first 16 hex digits of the blake2b hash of a file's bytes ("missing" if unreadable)."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return _digest(os.fspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _digest(path: str, mtime_ns: int, size: int) -> str:  # a file is hashed again only once it changes
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
