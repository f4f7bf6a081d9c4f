"""MACO: magnitude-constrained optimization (Fel et al., NeurIPS 2023, arXiv 2306.06805).

Lucid's parameterization lets the optimizer set every Fourier coefficient, so deep layers
are drawn with whatever power in each frequency band excites them most, often a
high-frequency texture no photo has. MACO fixes the magnitude of every coefficient to
the average spectrum of natural images and optimizes only the phase: the picture keeps
a photo's distribution of energy over frequencies and colors, and only where things are
(the phase) is free. Each step the network sees several random crops of the canvas with
Gaussian noise added, so nothing that excites the channel at one exact crop counts.

The magnitude is a (3, size, size//2+1) array: the mean |rfft2| of images in Lucid's
decorrelated color space. `dataset_spectrum(paths, size)` computes it from a run's own
training images (the domain the network was fine-tuned to), `save_spectrum` caches it
as a .npy file that `RenderSettings(spectrum=PATH)` reads; without one, the spectrum
shipped with the package (spectrum.npz, see `sample_photo_spectrum`) is used.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FeatureshiftError
from ..io import atomic_path
from .param import COLOR_CORRELATION
from .settings import RenderSettings, file_digest
from .transforms import Transforms

SPECTRUM_FILE = Path(__file__).with_name("spectrum.npz")
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")
CROP_CENTER_SD = 0.15  # crop centers spread around the canvas center (MACO's reference code)
# The phase is standardized before use, so its starting spread sets how far one Adam step
# of size lr moves it: at 2 the default lr 0.4 is a step of 0.2 standard deviations.
PHASE_INIT_SD = 2.0


# --- the magnitude spectrum -------------------------------------------------------------

def image_spectrum(images: np.ndarray) -> np.ndarray:
    """Mean Fourier magnitude (3, H, W//2+1) of (N, H, W, 3) images in [0, 1], taken in
    Lucid's decorrelated color space (the space MACO's phase lives in), each image's mean
    color removed. A Hann window keeps the jump between opposite borders (the FFT wraps
    around) out of the spectrum: it would put streaks along both axes of every picture."""
    x = torch.as_tensor(np.asarray(images, np.float32)).permute(0, 3, 1, 2).double()
    x = x - x.mean((2, 3), keepdim=True)
    h, w = x.shape[-2:]
    window = torch.hann_window(h, periodic=False, dtype=torch.float64)[:, None] * \
        torch.hann_window(w, periodic=False, dtype=torch.float64)[None, :]
    x = x * window / window.square().mean().sqrt()  # the same energy as without the window
    x = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(COLOR_CORRELATION.double()), x)
    return torch.fft.rfft2(x).abs().mean(0).float().numpy()


def square_image(image, size: int) -> np.ndarray:
    """A PIL image or HxWx3 array -> its central square resized to SIZE px, (size, size, 3) float32 in [0, 1]."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(im.resize((size, size), Image.LANCZOS), np.float32) / 255


def dataset_spectrum(paths: Sequence[str | os.PathLike], size: int = 128, limit: int = 512) -> np.ndarray:
    """The MACO magnitude spectrum (3, size, size//2+1) of a set of images (e.g. a run's
    training images): the central square of each, resized to SIZE px; at most LIMIT
    images, evenly spread over PATHS."""
    from PIL import Image

    paths = list(paths)
    if not paths:
        raise FeatureshiftError("No images to compute a spectrum from.")
    if len(paths) > limit:
        paths = [paths[round(i * (len(paths) - 1) / (limit - 1))] for i in range(limit)]
    total = None
    for p in paths:  # one at a time: a data set need not fit in memory
        with Image.open(p) as im:
            s = image_spectrum(square_image(im, size)[None])
        total = s if total is None else total + s
    return total / len(paths)


def sample_photo_spectrum(size: int = 256, crops: int = 8, seed: int = 0) -> np.ndarray:
    """How the shipped default spectrum was made: the mean spectrum of the color photos in
    scikit-image's sample data (SAMPLE_PHOTOS), CROPS random square crops of each (sides
    from SIZE px to the photo's short side, so nothing is upsampled), resized to SIZE px."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    squares = []
    for name in SAMPLE_PHOTOS:
        a = getattr(data, name)()
        a = a[0] if isinstance(a, tuple) else a  # stereo pairs: the left image
        h, w = a.shape[:2]
        for _ in range(crops):
            side = int(rng.integers(size, min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            im = Image.fromarray(a[y:y + side, x:x + side, :3]).resize((size, size), Image.LANCZOS)
            squares.append(np.asarray(im, np.float32) / 255)
    return image_spectrum(np.stack(squares))


def save_spectrum(spectrum: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a spectrum where `RenderSettings(spectrum=PATH)` reads it (.npy, or .npz)."""
    path = Path(path)
    spectrum = np.asarray(spectrum, np.float32)
    _check_spectrum(spectrum, str(path))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no suffix
        if path.suffix == ".npz":
            np.savez_compressed(f, log_magnitude=np.log(np.maximum(spectrum, 1e-12)).astype(np.float16))
        else:
            np.save(f, spectrum)
    return path


RUN_SPECTRUM = "cache/maco-spectrum-{size}.npz"


def run_spectrum(run_dir: str | os.PathLike, size: int) -> Path:
    """The MACO spectrum of a training run's own training images (the domain it was fine-tuned
    to; its validation images for a run without any) at SIZE px, computed once and kept in
    RUN/cache/."""
    from ..run import read_split

    path = Path(run_dir) / RUN_SPECTRUM.format(size=int(size))
    if not path.exists():
        _, train, val = read_split(run_dir)
        save_spectrum(dataset_spectrum([p for p, _ in train or val], size), path)
    return path


def for_run(settings: RenderSettings, run_dir: str | os.PathLike) -> RenderSettings:
    """SETTINGS for rendering snapshots of a run: MACO without a spectrum file of its own takes
    the run's training images' spectrum; every other method is unchanged."""
    from ..run import is_run

    if settings.method != "maco" or settings.spectrum is not None or not is_run(run_dir):
        return settings
    return settings.replace(spectrum=str(run_spectrum(run_dir, settings.size)))


def load_spectrum(path: str | os.PathLike | None = None) -> np.ndarray:
    """A spectrum written by `save_spectrum` (None: the one shipped with the package)."""
    path = Path(path) if path is not None else SPECTRUM_FILE
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                spectrum = np.exp(z["log_magnitude"].astype(np.float32))
        else:
            spectrum = np.load(path).astype(np.float32)
    except (OSError, ValueError, KeyError) as e:
        raise FeatureshiftError(f"Cannot read the MACO spectrum {path}: {e}") from e
    _check_spectrum(spectrum, str(path))
    return spectrum


def _check_spectrum(spectrum: np.ndarray, where: str) -> None:
    ok = spectrum.ndim == 3 and spectrum.shape[0] == 3 and spectrum.shape[2] == spectrum.shape[1] // 2 + 1
    if not ok or not np.isfinite(spectrum).all():
        raise FeatureshiftError(f"{where} is not a MACO spectrum: expected a finite (3, N, N//2+1) array "
                                f"(see featureshift.optvis.maco.dataset_spectrum), got shape {spectrum.shape}.")


def spectrum_at(spectrum: np.ndarray, size: int) -> torch.Tensor:
    """SPECTRUM resampled to a SIZE px canvas, (3, size, size//2+1), its DC term 0.

    Natural images are close to scale invariant, so the magnitude at a frequency in cycles
    per pixel carries over between canvas sizes: the log magnitude is interpolated on that
    axis. The DC term (the mean color) is left out: the image is standardized anyway."""
    log = torch.as_tensor(np.log(np.maximum(spectrum, 1e-12)), dtype=torch.float32)
    if log.shape[1] != size:
        shifted = torch.fft.fftshift(log, dim=1)[None]  # rows from the lowest to the highest frequency
        log = torch.fft.ifftshift(F.interpolate(shifted, size=(size, size // 2 + 1), mode="bilinear",
                                                align_corners=True)[0], dim=1)
    magnitude = log.exp()
    magnitude[:, 0, 0] = 0
    return magnitude


@functools.lru_cache(maxsize=4)
def _cached_spectrum(path: str | None, digest: str) -> np.ndarray:  # digest: a rewritten file is read again
    return load_spectrum(path)


# --- the method -------------------------------------------------------------------------

def _standardize(x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, x.dim()))
    return (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-4)


class PhaseImage:
    """Callable turning (B, 3, size, size//2+1) phases into (B, 3, size, size) images in
    [0, 1] under a fixed magnitude: standardized phase, inverse FFT, standardized image,
    ImageNet's color correlation, sigmoid (MACO's reference recipe)."""

    def __init__(self, magnitude: torch.Tensor, size: int, decorrelate: bool = True):
        self.magnitude, self.size, self.decorrelate = magnitude, size, decorrelate
        self.color = COLOR_CORRELATION.to(magnitude.device)

    def __call__(self, phase: torch.Tensor) -> torch.Tensor:
        phase = _standardize(phase.float())
        spectrum = torch.complex(torch.cos(phase) * self.magnitude, torch.sin(phase) * self.magnitude)
        x = _standardize(torch.fft.irfft2(spectrum, s=(self.size, self.size)))
        if self.decorrelate:
            x = torch.einsum("ij,bjhw->bihw", self.color, x)
        return torch.sigmoid(x)


def crop_thetas(draws: torch.Tensor) -> torch.Tensor:
    """(..., 3) draws of (center x, center y, side), as fractions of the canvas -> (..., 2, 3)
    matrices for `F.affine_grid` that cut out each square and scale it to the output."""
    cx, cy, side = draws.unbind(-1)
    zero = torch.zeros_like(side)
    return torch.stack([torch.stack([side, zero, 2 * cx - 1], -1),
                        torch.stack([zero, side, 2 * cy - 1], -1)], -2)


class MacoPlan:
    """What a MACO render optimizes and shows the network, for the engine's method loop:
    one random phase per image, `crops` noisy random crops of it per step."""

    def __init__(self, settings: RenderSettings, device: torch.device):
        s = settings
        low, high = s.crop_scale
        if not (0 < low <= high <= 1) or int(s.crops) < 1 or s.noise < 0:
            raise FeatureshiftError(f"MACO needs 0 < crop_scale[0] <= crop_scale[1] <= 1, crops >= 1 and noise "
                                    f">= 0 (got crop_scale {s.crop_scale}, crops {s.crops}, noise {s.noise}).")
        self.size, self.crop_scale, self.noise = s.size, (float(low), float(high)), float(s.noise)
        self.views_per_image = int(s.crops)
        self.input_size = s.size  # every crop is scaled to the canvas size
        self.transforms = Transforms.none()  # the network sees canvas-sized inputs only
        self.param_numel = 3 * s.size * (s.size // 2 + 1)
        self.settings = ("spectrum", "crops", "crop_scale", "noise", "decorrelate")  # recorded with the result
        self.device = device
        spectrum = _cached_spectrum(s.spectrum, file_digest(s.spectrum) if s.spectrum else "")
        self.image = PhaseImage(spectrum_at(spectrum, s.size).to(device), s.size, s.decorrelate)

    def init(self, generators: Sequence[torch.Generator], index: Sequence[int]) -> torch.Tensor:
        """N(0, PHASE_INIT_SD) phases, one row per generator (each image's start is its own)."""
        shape = (3, self.size, self.size // 2 + 1)
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device) * PHASE_INIT_SD

    def draw(self, generators: Sequence[torch.Generator], steps: int) -> torch.Tensor:
        """(n, steps, crops, 3) crop centers and sides, drawn from each image's own generator."""
        k, (low, high) = self.views_per_image, self.crop_scale
        rows = []
        for g in generators:
            u = torch.rand((steps, k, 1), generator=g)
            side = low + (high - low) * u
            center = 0.5 + CROP_CENTER_SD * torch.randn((steps, k, 2), generator=g)
            center = torch.minimum(torch.maximum(center, side / 2), 1 - side / 2)  # the crop stays on the canvas
            rows.append(torch.cat([center, side], -1))
        return crop_thetas(torch.stack(rows)).to(self.device)

    def views(self, images: torch.Tensor, thetas: torch.Tensor, noise_generators: Sequence[torch.Generator]
              ) -> torch.Tensor:
        """(n, 3, S, S) images and this step's (n, crops, 2, 3) matrices -> (n*crops, 3, S, S) noisy crops."""
        n, k = thetas.shape[:2]
        size = self.input_size
        grid = F.affine_grid(thetas.reshape(n * k, 2, 3), [n * k, 3, size, size], align_corners=False)
        crops = F.grid_sample(images.repeat_interleave(k, 0), grid, mode="bilinear", padding_mode="border",
                              align_corners=False)
        if self.noise:
            noise = torch.cat([torch.randn((k, 3, size, size), generator=g, device=images.device)
                               for g in noise_generators])
            crops = crops + self.noise * noise
        return crops

    def penalty_grad(self, params: torch.Tensor, index: Sequence[int]) -> torch.Tensor | None:
        """MACO has no penalty: only the objective moves the phase."""
        return None
