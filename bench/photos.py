"""Class folders of JPEGs cut from scikit-image's bundled photos, for benchmarks that need a
folder source: each class is one photo, each file a random crop of it (a quarter to all of its
short side, random place, half of them mirrored), resized to a square and saved at quality 90.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
          "hubble_deep_field"]


def write_photo_folder(root: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` JPEGs of ``size`` x ``size`` px in ``root/<photo>/``, spread evenly over the
    photos; files already there are kept."""
    import skimage.data

    sources = [getattr(skimage.data, name)() for name in PHOTOS]
    rng = np.random.default_rng(seed)
    for index in range(count):
        photo = sources[index % len(sources)]
        path = root / PHOTOS[index % len(sources)] / f"{index:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        height, width = photo.shape[:2]
        side = int(rng.uniform(0.25, 1.0) * min(height, width))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = Image.fromarray(photo[top:top + side, left:left + side]).convert("RGB")
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0).save(
            path, quality=90)
    return root
