"""Real data that nobody here made: scikit-learn's handwritten digits (1,797 8x8 scans, 10 classes)
written out as an ImageFolder of 8-bit grayscale PNGs, the way a user would export them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def export_digits(root: str | Path, per_class: int | None = None) -> Path:
    """ROOT/<digit>/<index>.png for every image of the digits set (or the first PER_CLASS of each digit)."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    counts: dict[int, int] = {}
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        # 16 grey levels in the original scans, stretched to 8 bits
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), "L").save(folder / f"{i:04d}.png")
    return root
