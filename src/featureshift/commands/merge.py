"""Stack existing images into one, in natural numeric order (2 before 10).

The inputs are only read: never renamed, moved or deleted. The output, and anything
featureshift wrote as a stacked image before (tagged in its PNG text), is never
taken as an input, so running the same command twice gives the same picture.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from ..errors import FeatureshiftError
from ..grid import make_grid
from ..io import is_featureshift_output, is_write_error, natural_key, save_merged, write_error

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


@dataclasses.dataclass
class MergeResult:
    output: Path
    inputs: list[Path]  # in the order stacked, top to bottom
    skipped: list[tuple[Path, str]]  # (file, why it was left out)


def _collect(inputs: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            # Hidden files include half-written temporaries of atomic writes.
            files.extend(f for f in p.iterdir()
                         if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise FeatureshiftError(f"{p} does not exist. Give image files or folders of images to merge.")
    return list(dict.fromkeys(files))


def merge(inputs: Sequence[str | Path], output: str | Path, *, labels: bool = False, keep_order: bool = False,
          pad: int = 2, title: str | None = None) -> MergeResult:
    """Stack the images in `inputs` (files, or folders whose images are all taken) top to
    bottom into `output`. Images of different sizes are centred and padded.

    Order: natural numeric order of the file names, or the order given if `keep_order`.
    `labels` writes each file's name (without suffix) to the left of its row.
    An output that cannot be written raises `featureshift.io.WriteError`.
    """
    output = Path(output)
    if output.suffix.lower() not in {".png", ".jpg", ".jpeg", ".webp"}:
        raise FeatureshiftError(f"The output {output} must end in .png, .jpg or .webp.")
    files = _collect(inputs)
    if not keep_order:
        files.sort(key=natural_key)
    target = output.resolve()
    used, images, skipped = [], [], []
    for f in files:
        if f.resolve() == target:
            skipped.append((f, "it is the output file"))
            continue
        try:
            with Image.open(f) as im:
                if is_featureshift_output(im):
                    skipped.append((f, "it is a stacked image featureshift wrote earlier"))
                    continue
                if getattr(im, "is_animated", False):  # a timeline's per-channel GIFs sit beside its rows
                    skipped.append((f, "it is animated"))
                    continue
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            skipped.append((f, f"it cannot be read as an image ({e.__class__.__name__})"))
            continue
        used.append(f)
    if not images:
        why = f" (left out: {'; '.join(f'{p.name}: {w}' for p, w in skipped[:5])})" if skipped else ""
        raise FeatureshiftError(f"No images to merge in {', '.join(map(str, inputs))}{why}. "
                                "Give PNG/JPEG files or a folder that holds them.")
    row_labels = [f.stem for f in used] if labels else None
    grid = make_grid([[im] for im in images], row_labels=row_labels, title=title, pad=pad)
    try:
        save_merged(output, grid, kind="merge", inputs=[os.fspath(f) for f in used])
    except OSError as e:
        if not is_write_error(e):
            raise
        raise write_error(e, f"{output} was not written (an earlier file of that name is unchanged); the "
                             f"{len(used)} input image(s) were only read") from e
    return MergeResult(output, used, skipped)
