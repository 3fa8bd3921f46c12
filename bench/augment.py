"""Augmentation speed: imagefit's decode-once cache + batched augmentation against the usual
user's pipeline, torchvision.transforms.v2 per image in a DataLoader with 2 workers.

1. End to end, files to normalized augmented 224 px batches, second epoch onwards, on two sets
   of JPEGs (quality 90) written from scikit-image's bundled photos: 2048x1365 and 500x375.
   imagefit: cache of 256 px (built once, reported apart), Loader + BatchPipeline with the
   ``side_on`` preset. torchvision: decode_jpeg, Resize(256), RandomAffine(10 deg, scale 1.1),
   CenterCrop(224), flip, ColorJitter(0.2, 0.2), ToDtype, Normalize.
2. The augmentation step alone on decoded images already in memory, for ``side_on`` and
   ``randaugment`` at 32, 64, 128 and 224 px (input 8/7 of the output size): imagefit's batched
   pipeline against torchvision v2 per image in a DataLoader with 2 workers.

    .venv/bin/python -m pip install scikit-image   # the photos
    .venv/bin/python bench/augment.py [--images 2000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import write_result
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import decode_jpeg, read_file
from torchvision.transforms import v2

from imagefit.augment.pipeline import BatchPipeline
from imagefit.augment.presets import resolve_augment
from imagefit.data.cache import CacheSettings, build_cache
from imagefit.data.loader import Loader

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
BATCH = 64
SETS = {"2048x1365": (2048, 1365), "500x375": (500, 375)}


def photos() -> list[np.ndarray]:
    import skimage.data as data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
             "hubble_deep_field"]
    return [getattr(data, name)() for name in names]


def write_jpegs(folder: Path, size: tuple[int, int], count: int) -> list[str]:
    """``count`` distinct JPEGs: each a photo, randomly cropped, resized to ``size``."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = photos()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        paths.append(str(path))
        if path.exists():
            continue
        photo = sources[i % len(sources)]
        h, w = photo.shape[:2]
        top, left = rng.integers(0, h // 8), rng.integers(0, w // 8)
        crop = photo[top:h - rng.integers(0, h // 8), left:w - rng.integers(0, w // 8)]
        Image.fromarray(crop).resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
    return paths


def torchvision_side_on(size: int) -> v2.Compose:
    return v2.Compose([
        v2.Resize(size * 8 // 7, antialias=True),
        v2.RandomAffine(degrees=10, scale=(1.0, 1.1)),
        v2.CenterCrop(size),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def torchvision_randaugment(size: int) -> v2.Compose:
    return v2.Compose([
        v2.Resize(size * 8 // 7, antialias=True),
        v2.CenterCrop(size),
        v2.RandomHorizontalFlip(),
        v2.RandAugment(num_ops=2, magnitude=9),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


class Files(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(decode_jpeg(read_file(self.paths[index]))), 0


class Tensors(Dataset):
    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), 0


def torchvision_rates(dataset: Dataset, epochs: int) -> list[float]:
    """Images/s of each epoch after the first, DataLoader with 2 persistent workers."""
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=2,
                        persistent_workers=True, drop_last=False)
    rates = []
    for epoch in range(epochs):
        started = time.perf_counter()
        count = sum(len(x) for x, _ in loader)
        if epoch:
            rates.append(count / (time.perf_counter() - started))
    return rates


def imagefit_rates(images: torch.Tensor, preset: str, size: int, epochs: int) -> list[float]:
    """Images/s of each epoch after the first: Loader (background thread) + BatchPipeline."""
    pipeline = BatchPipeline(MEAN, STD, resolve_augment(preset))
    loader = Loader(images, torch.zeros(len(images), dtype=torch.int64),
                    np.arange(len(images)), BATCH, shuffle=True)
    generator = torch.Generator().manual_seed(0)
    rates = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        started = time.perf_counter()
        count = 0
        for x, y in loader:
            batch, _ = pipeline.train_batch(x, y, generator, size=size)
            count += len(batch)
        if epoch:
            rates.append(count / (time.perf_counter() - started))
    return rates


def end_to_end(root: Path, count: int, epochs: int) -> dict:
    results = {}
    for name, size in SETS.items():
        paths = write_jpegs(root / name, size, count)
        started = time.perf_counter()
        cache = build_cache(paths, CacheSettings(256, 3, "crop"), root / "cache", progress=True)
        cache_seconds = time.perf_counter() - started
        ours = imagefit_rates(cache.tensor(), "side_on", 224, epochs)
        theirs = torchvision_rates(Files(paths, torchvision_side_on(224)), epochs)
        results[name] = {
            "images": count,
            "imagefit_cache_build_seconds": round(cache_seconds, 1),
            "imagefit_images_per_second": round(statistics.median(ours), 1),
            "torchvision_images_per_second": round(statistics.median(theirs), 1),
            "ratio": round(statistics.median(ours) / statistics.median(theirs), 2),
        }
        print(name, results[name])
    return results


def augmentation_alone(count: int, epochs: int) -> list[dict]:
    sources = photos()
    rows = []
    for size in (32, 64, 128, 224):
        side = size * 8 // 7
        images = torch.stack([
            torch.from_numpy(np.asarray(Image.fromarray(sources[i % len(sources)])
                                        .resize((side, side), Image.Resampling.BILINEAR)))
            for i in range(count)
        ])  # (N, H, W, 3) uint8
        chw = images.permute(0, 3, 1, 2).contiguous()
        for preset, reference in (("side_on", torchvision_side_on),
                                  ("randaugment", torchvision_randaugment)):
            ours = statistics.median(imagefit_rates(images, preset, size, epochs))
            theirs = statistics.median(torchvision_rates(Tensors(chw, reference(size)), epochs))
            rows.append({"size": size, "preset": preset,
                         "imagefit_images_per_second": round(ours, 1),
                         "torchvision_images_per_second": round(theirs, 1),
                         "ratio": round(ours / theirs, 2)})
            print(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("/tmp/imagefit-bench-augment"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3, help="the first is not counted")
    args = parser.parse_args()
    torch.set_num_threads(2)
    write_result("augment", {
        "command": f"bench/augment.py --images {args.images} --epochs {args.epochs}",
        "batch_size": BATCH,
        "end_to_end_224": end_to_end(args.root, args.images, args.epochs),
        "augmentation_alone": augmentation_alone(min(args.images, 2000), args.epochs),
    })


if __name__ == "__main__":
    main()
