"""Image datasets in the ImageFolder layout (one sub-folder per class), read lazily.

Images are decoded one at a time where they are used (DataLoader workers), never
all held in memory. Unreadable files are found while scanning and skipped with a
reason; every odd image mode is converted to 8-bit RGB. The validation split is a
pure function of the files and the seed, so every run and every resume sees the same one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import FeatureshiftError

Sample = tuple[Path, int]

# Pillow refuses images above ~179 megapixels as "decompression bombs"; photos from
# scanners and panoramas can be larger, and we only ever decode files the user chose.
MAX_PIXELS = 1_000_000_000


@dataclasses.dataclass
class DatasetIndex:
    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[tuple[Path, str]] = dataclasses.field(default_factory=list)

    def counts(self) -> dict[str, int]:
        n = [0] * len(self.classes)
        for _, c in self.samples:
            n[c] += 1
        return dict(zip(self.classes, n))


@contextlib.contextmanager
def _pixel_limit() -> Iterator[None]:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: 16/32-bit and float scaled (not clipped), alpha over white."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.min() >= 0 and 255 < a.max() <= 65535):
            a = a / 65535.0
        elif im.mode == "I" and a.min() >= 0 and a.max() <= 255:
            a = a / 255.0
        else:  # float or unusual integer range: stretch what is there
            lo, hi = np.nanmin(a), np.nanmax(a)
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(np.nan_to_num(a) * 255 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def to_channels(im: Image.Image, channels: int = 3) -> Image.Image:
    """IM in the mode of a network taking CHANNELS input bands: 8-bit RGB (to_rgb) for 3, 8-bit
    grayscale ("L") for 1, RGBA with alpha as the fourth band (opaque where the image has none) for 4.
    Pillow holds at most 4 bands per image: other counts need images saved as arrays, not read here."""
    if channels == 3:
        return to_rgb(im)
    if channels == 1:
        return im if im.mode == "L" else to_rgb(im).convert("L")
    if channels == 4:
        if im.mode == "RGBA":
            return im
        has_alpha = im.mode in ("LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)
        return im.convert("RGBA") if has_alpha else to_rgb(im).convert("RGBA")
    raise FeatureshiftError(f"Images with {channels} bands cannot be read from image files: featureshift reads "
                            "1 (grayscale), 3 (RGB) or 4 (RGBA, the fourth band as alpha) bands.")


def open_image(path: str | os.PathLike, min_size: int | None = None, channels: int = 3) -> Image.Image:
    """The image at `path` as 8-bit RGB (1 channel: grayscale; 4: RGBA, see to_channels), upright
    by its EXIF orientation.

    min_size: JPEGs are decoded at a reduced scale when both sides stay at least
    this large (much faster for big photos that are resized down anyway).
    """
    with _pixel_limit(), Image.open(path) as im:
        if min_size and im.format == "JPEG":
            im.draft("RGB" if channels != 1 else "L", (min_size, min_size))
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_channels(im, channels)


def check_image(path: Path) -> str | None:
    """Why `path` cannot be used as an image, or None if it can.

    Cheap: Pillow's verify() walks PNG/GIF chunks; JPEGs are decoded at 1/8 scale,
    which still reads every byte and so catches truncated files.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with _pixel_limit():
            with Image.open(path) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (1, 1))
                    im.load()
                    return None
                im.verify()
    except Image.UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        return f"unreadable image ({str(e) or e.__class__.__name__})"
    return None


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def class_files(folder: Path) -> list[Path]:
    """Every visible file under `folder`, at any depth, in a fixed (sorted) order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return files


def scan_image_folder(root: str | os.PathLike, progress: bool = False,
                      classes: Sequence[str] | None = None) -> DatasetIndex:
    """Index an ImageFolder tree: root/<class>/<image>. Unreadable files go to `skipped`.

    classes: the class list to index against (for a separate validation folder); folders
    not in it are an error. Class names are the folder names exactly as they are.
    """
    root = Path(root)
    if not root.exists():
        raise FeatureshiftError(f"The dataset folder {root} does not exist. Give a folder with one sub-folder "
                                "of images per class (the ImageFolder layout).")
    if not root.is_dir():
        raise FeatureshiftError(f"{root} is a file, not a folder. Give a folder with one sub-folder of images "
                                "per class (the ImageFolder layout).")
    folders = sorted((p for p in root.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)
    loose = [p for p in root.iterdir() if p.is_file() and _visible(p)]
    if not folders:
        hint = (f" It holds {len(loose)} file(s) directly; move each image into a folder named after its class."
                if loose else " It is empty.")
        raise FeatureshiftError(f"The dataset folder {root} has no class sub-folders.{hint} Expected the "
                                f"ImageFolder layout: {root}/<class name>/<image>.jpg, at least two classes.")
    if classes is not None:
        unknown = [f.name for f in folders if f.name not in classes]
        if unknown:
            raise FeatureshiftError(
                f"The folder {root} has class folder(s) {', '.join(repr(u) for u in unknown)} that the training "
                f"data does not have (its classes: {', '.join(classes)}). Validation classes must be training classes."
            )
    files = {f.name: class_files(f) for f in folders}
    todo = [p for fs in files.values() for p in fs]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(check_image, todo)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(todo), desc=f"scanning {root.name}", unit="file", leave=False)
        reasons = dict(zip(todo, results))
    skipped = [(p, reasons[p]) for p in todo if reasons[p]]
    kept = {name: [p for p in fs if not reasons[p]] for name, fs in files.items()}
    names = list(classes) if classes is not None else [n for n in kept if kept[n]]
    samples = [(p, names.index(n)) for n, fs in kept.items() if n in names for p in fs]
    for name in kept:
        if not kept[name] and classes is None:
            skipped.append((root / name, "class folder with no readable images (class left out)"))
    if classes is None and len(names) < 2:
        if not names:
            what = "no readable images" if todo else "no images"
            raise FeatureshiftError(f"The dataset folder {root} has {what} in its class folders "
                                    f"({', '.join(f.name for f in folders)}). Add images, at least two classes.")
        raise FeatureshiftError(
            f"The dataset folder {root} has a single class ('{names[0]}') with images; a classifier needs at least "
            "two. Add a sub-folder of images for each further class."
        )
    return DatasetIndex(root=root, classes=names, samples=samples, skipped=skipped)


def _split_key(seed: int, path: Path) -> str:
    # Keyed on the class folder and file name only: the split survives moving the
    # dataset, and adding or removing a file moves no other file across the split.
    return hashlib.sha256(f"{seed}/{path.parent.name}/{path.name}".encode()).hexdigest()


def stratified_split(samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0
                     ) -> tuple[list[Sample], list[Sample]]:
    """(train, val): about val_fraction of each class in val, identical on every call.

    A class with a single image keeps it in train.
    """
    if not 0 <= val_fraction < 1:
        raise FeatureshiftError(f"The validation fraction must be at least 0 and below 1, not {val_fraction}.")
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    val_set = set()
    for c, items in by_class.items():
        n_val = min(len(items) - 1, round(len(items) * val_fraction)) if val_fraction > 0 else 0
        if val_fraction > 0 and len(items) >= 2:
            n_val = max(1, n_val)
        ranked = sorted(items, key=lambda s: _split_key(seed, s[0]))
        val_set.update(ranked[:n_val])
    train = [s for s in samples if s not in val_set]
    val = [s for s in samples if s in val_set]
    return train, val


def transform_sizes(info, image_size: int | None = None) -> tuple[int, int]:
    """(crop size, resize size) of the preprocessing: the model's own unless image_size is given."""
    size = int(image_size or info.input_size)
    resize = max(size, round(size * info.resize_size / info.input_size))
    return size, resize


def _to_tensor(info, normalize: bool) -> list:
    from torchvision import transforms as T

    if not normalize:  # uint8 CHW: a quarter of the bytes to move; normalize_batch finishes on the device
        return [T.PILToTensor()]
    return [T.ToTensor(), T.Normalize(info.mean, info.std)]


def interpolation(info):
    """The model's own resize interpolation (its info's: bilinear, bicubic, nearest) for torchvision."""
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(str(getattr(info, "interpolation", "bilinear") or "bilinear").lower())
    except ValueError:
        return InterpolationMode.BILINEAR


def eval_transform(info, image_size: int | None = None, normalize: bool = True) -> Callable:
    """The model's own preprocessing: resize (with its interpolation), center crop, normalize (no randomness).

    normalize=False: uint8 tensors, to be finished by normalize_batch.
    """
    from torchvision import transforms as T

    size, resize = transform_sizes(info, image_size)
    return T.Compose([T.Resize(resize, interpolation=interpolation(info), antialias=True), T.CenterCrop(size),
                      *_to_tensor(info, normalize)])


def train_transform(info, image_size: int | None = None, normalize: bool = True) -> Callable:
    """Training augmentation: a random crop of 25-100% of the image, random horizontal flip."""
    from torchvision import transforms as T

    size, _ = transform_sizes(info, image_size)
    return T.Compose([T.RandomResizedCrop(size, scale=(0.25, 1.0), interpolation=interpolation(info),
                                          antialias=True),
                      T.RandomHorizontalFlip(), *_to_tensor(info, normalize)])


def normalize_batch(x: torch.Tensor, info) -> torch.Tensor:
    """A uint8 batch (from a transform with normalize=False) as the network's normalized float input."""
    mean = torch.tensor(info.mean, device=x.device).view(1, -1, 1, 1) * 255
    std = torch.tensor(info.std, device=x.device).view(1, -1, 1, 1) * 255
    return (x.float() - mean) / std


class ImageDataset(torch.utils.data.Dataset):
    """(tensor, class index) per sample, decoded on access.

    skip_bad=False: an unreadable file raises FeatureshiftError naming it.
    skip_bad=True: it yields (None, (path, reason)) instead; `collate_skip` drops those
    from the batch and reports them, so one bad file never stops training.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable, min_size: int | None = None,
                 skip_bad: bool = False, channels: int = 3):
        self.channels = channels  # the network's input bands: images are read as open_image does for them
        self.samples = list(samples)
        self.transform = transform
        self.min_size = min_size
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int | tuple[int, int]):
        i, seed = i if isinstance(i, tuple) else (i, None)  # (index, seed) from SeededShuffle
        path, label = self.samples[i]
        try:
            image = open_image(path, self.min_size, self.channels)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
            reason = f"unreadable image ({str(e) or e.__class__.__name__})"
            if self.skip_bad:
                return None, (str(path), reason)
            raise FeatureshiftError(f"Could not read the image {path}: {reason}. Remove or replace the file.") from e
        if seed is None:
            return self.transform(image), label
        # The CPU generator only (torch.manual_seed would seed every device: 50x slower); the
        # caller's stream is put back, which matters when this runs in the main process.
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(seed)
        try:
            return self.transform(image), label
        finally:
            gen.set_state(state)


class SeededShuffle(torch.utils.data.Sampler):
    """A random order each epoch, and a random-augmentation seed per sample: yields (index, seed).

    Both are drawn in the main process from `generator`, so the augmented images depend only
    on its state: not on the number of DataLoader workers, nor on whether they were started
    afresh (a resumed run) or kept alive across epochs (persistent workers).
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        seeds = torch.randint(0, 2**62, (self.n,), generator=self.generator).tolist()
        return iter(zip(order, seeds))


class ShardedSeededBatches(torch.utils.data.Sampler):
    """SeededShuffle's order and seeds, cut into global batches of `batch_size` and each batch split
    among `world` processes: yields this rank's part of every global batch, a list of (index, seed).

    Every rank draws the whole epoch from its own `generator` (all in the same state), so the ranks'
    parts put together are exactly the batches one process would train on with a DataLoader over
    SeededShuffle, and the generator ends the epoch in the same state whatever the number of ranks.
    A last, smaller batch is split as evenly as it goes, and dropped where a rank would get fewer
    than 2 images (one image breaks batch-norm in train mode; with one rank this is
    make_loaders' rule). Use it as a DataLoader's batch_sampler.
    """

    def __init__(self, n: int, generator: torch.Generator, batch_size: int, rank: int, world: int):
        if batch_size % world:
            raise FeatureshiftError(f"The batch size {batch_size} does not divide among {world} processes; "
                                    f"give a multiple of {world}.")
        self.n, self.generator, self.batch_size, self.rank, self.world = n, generator, batch_size, rank, world

    def global_sizes(self) -> list[int]:
        """The number of images in each global batch of an epoch (before unreadable files are dropped)."""
        full, last = divmod(self.n, self.batch_size)
        return [self.batch_size] * full + ([last] if last >= 2 * self.world else [])

    def __len__(self) -> int:
        return len(self.global_sizes())

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        seeds = torch.randint(0, 2**62, (self.n,), generator=self.generator).tolist()
        pairs = list(zip(order, seeds))
        batches, start = [], 0
        for size in self.global_sizes():
            part, extra = divmod(size, self.world)
            lo = start + self.rank * part + min(self.rank, extra)
            batches.append(pairs[lo:lo + part + (self.rank < extra)])
            start += size
        return iter(batches)


def collate_skip(batch):
    """-> (images or None, labels or None, [(path, reason) of files that could not be read])."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[1] for b in batch if b[0] is None]
    if not good:
        return None, None, bad
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good]), bad


# --- a generated dataset: no download needed (demo, tests) ---

def _coords(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    a = rng.uniform(0, np.pi)
    return x * np.cos(a) + y * np.sin(a), -x * np.sin(a) + y * np.cos(a)


def _stripes(size, rng):
    u, _ = _coords(size, rng)
    return np.sin(2 * np.pi * rng.uniform(3, 8) * u + rng.uniform(0, 6.3)) > 0


def _checkers(size, rng):
    u, v = _coords(size, rng)
    n = rng.uniform(3, 7)
    return (np.floor(u * n + rng.uniform(0, 1)) + np.floor(v * n + rng.uniform(0, 1))) % 2 > 0


def _dots(size, rng):
    u, v = _coords(size, rng)
    n = rng.uniform(4, 8)
    fu, fv = (u * n + rng.uniform(0, 1)) % 1 - 0.5, (v * n + rng.uniform(0, 1)) % 1 - 0.5
    return fu ** 2 + fv ** 2 < rng.uniform(0.06, 0.12)


def _waves(size, rng):
    u, v = _coords(size, rng)
    return np.sin(2 * np.pi * (rng.uniform(3, 6) * u + rng.uniform(0.05, 0.15) * np.sin(2 * np.pi * rng.uniform(2, 4) * v))) > 0


def _rings(size, rng):
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    r = np.hypot(x - rng.uniform(0.2, 0.8), y - rng.uniform(0.2, 0.8))
    return np.sin(2 * np.pi * rng.uniform(4, 9) * r) > 0


PATTERNS = {"stripes": _stripes, "checkers": _checkers, "dots": _dots, "waves": _waves, "rings": _rings}


def synthetic_image(pattern: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One texture of the given family, with random geometry and two random colors."""
    mask = PATTERNS[pattern](size, rng)[..., None]
    c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = np.where(mask, c1, c2) + rng.normal(0, 0.04, (size, size, 3))
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


def make_synthetic_dataset(root: str | os.PathLike, classes: Sequence[str] = ("stripes", "checkers", "dots"),
                           per_class: int = 32, size: int = 64, seed: int = 0) -> Path:
    """Write a small textures dataset (ImageFolder layout, JPEG) to `root`; the same files for the same seed.

    classes: texture families among stripes, checkers, dots, waves, rings.
    """
    from .errors import did_you_mean
    from .io import save_image

    for c in classes:
        if c not in PATTERNS:
            raise FeatureshiftError(f"No synthetic texture '{c}'.{did_you_mean(c, PATTERNS)} "
                                    f"Choose among {', '.join(PATTERNS)}.")
    root = Path(root)
    for ci, c in enumerate(classes):
        for i in range(per_class):
            rng = np.random.default_rng([seed, ci, i])
            save_image(root / c / f"{c}_{i:03d}.jpg", synthetic_image(c, size, rng), quality=92)
    return root
