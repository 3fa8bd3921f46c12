"""The checks of the images themselves (``imagefit check``): their statistics against
ImageNet's, colour modes, sizes against the cache's, unreadable files and constant images.
The checks of labels, folds and leakage are ``data/audit.py``."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .audit import Finding, row_names
from .cache import ImageCache
from .decode import DECODE_ERRORS
from .table import Table

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UPSCALED_WARN = 0.10  # share of images enlarged more than twice to the cache's size
MODE_SAMPLE = 2000  # file headers read for the colour modes


def image_statistics(table: Table, cache: ImageCache, train_rows: np.ndarray,
                     mean: list[float], std: list[float], normalize: str) -> list[Finding]:
    """Normalization statistics against ImageNet's, the colour modes of the files, the
    spread of image sizes, unreadable files and constant images."""
    findings = []
    channels = cache.images.shape[3]
    ref_mean = IMAGENET_MEAN if channels == 3 else (float(np.mean(IMAGENET_MEAN)),)
    ref_std = IMAGENET_STD if channels == 3 else (float(np.mean(IMAGENET_STD)),)
    text = (f"mean {_joined(mean)}, std {_joined(std)} (ImageNet {_joined(ref_mean)} / "
            f"{_joined(ref_std)})")
    details = {"mean": mean, "std": std, "imagenet_mean": list(ref_mean),
               "imagenet_std": list(ref_std), "normalize": normalize}
    flat = [channel for channel, value in enumerate(std) if value == 0]
    gap = max(abs(a - b) for a, b in zip(mean, ref_mean))
    spread = 0.0 if flat else max(max(a / b, b / a) for a, b in zip(std, ref_std))
    if len(flat) == len(std):
        findings.append(Finding("normalization", "fail", text, "the images have no variation "
                                "(std 0): check that the images are not blank", details))
    elif flat:
        findings.append(Finding("normalization", "warn", text, f"channel(s) "
                                f"{', '.join(map(str, flat))} have no variation (std 0): "
                                "they tell the model nothing; check the images", details))
    elif (gap > 0.15 or spread > 1.5) and normalize == "pretrained":
        findings.append(Finding("normalization", "warn", text, "these images are far from "
                                "ImageNet's statistics: --normalize data normalizes with "
                                "their own", details))
    else:
        findings.append(Finding("normalization", "pass", text + (
            "; normalized with these" if normalize == "data" else ""), "", details))
    findings.append(_modes(table, cache))
    findings.append(_sizes(cache, train_rows))
    findings.append(unreadable_files(table, cache))
    findings.append(constant_images(table, cache))
    return findings


def _joined(values) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def _modes(table: Table, cache: ImageCache) -> Finding:
    name = "colour modes"
    if table.paths is None:
        shape = table.arrays.shape if table.arrays is not None else cache.images.shape
        channels = 1 if len(shape) == 3 else shape[-1]
        return Finding(name, "pass", f"in-memory array of {channels} channel(s)", "",
                       {"modes": {f"{channels} channels": len(table)}})
    paths = table.paths
    sample = np.random.default_rng(0).choice(len(paths), min(len(paths), MODE_SAMPLE),
                                             replace=False)
    modes: dict[str, int] = {}
    for row in sample.tolist():
        try:
            with Image.open(paths[row]) as image:
                modes[image.mode] = modes.get(image.mode, 0) + 1
        except DECODE_ERRORS:
            continue
    grey = sum(n for m, n in modes.items() if m in ("1", "L", "LA", "I", "I;16", "F"))
    text = ", ".join(f"{m} {n}" for m, n in sorted(modes.items(), key=lambda t: -t[1]))
    text += f" (of {len(sample)} files read)" if len(sample) < len(paths) else ""
    channels = cache.images.shape[3]
    details = {"modes": modes, "cached_channels": channels}
    if grey and grey < sum(modes.values()):
        return Finding(name, "warn", text, f"grey and colour files are mixed: all are cached "
                       f"with {channels} channel(s); if colour matters, check the grey ones "
                       "(scanned differently?)", details)
    return Finding(name, "pass", text, "", details)


def _sizes(cache: ImageCache, train_rows: np.ndarray) -> Finding:
    sizes = np.asarray(cache.original_sizes)[train_rows].reshape(-1, 2).astype(np.float64)
    name = "image sizes"
    if not len(sizes) or not sizes.any():
        return Finding(name, "skip", "no sizes recorded")
    side = cache.images.shape[1]
    short = sizes.min(1)
    aspect = sizes.max(1) / np.maximum(short, 1)
    upscaled = float((short * 2 < side).mean())
    details = {"width": _quantiles(sizes[:, 0]), "height": _quantiles(sizes[:, 1]),
               "cache_side": side, "upscaled_over_2x": upscaled,
               "aspect_over_2": float((aspect > 2).mean())}
    text = (f"width {details['width']['min']:.0f}-{details['width']['max']:.0f} (median "
            f"{details['width']['median']:.0f}), height {details['height']['min']:.0f}-"
            f"{details['height']['max']:.0f} (median {details['height']['median']:.0f}); "
            f"cached at {side}x{side}")
    if upscaled > UPSCALED_WARN:
        return Finding(name, "warn", f"{text}; {upscaled:.0%} enlarged more than twice",
                       "enlarged images add no detail and cost time: give a smaller "
                       "--image-size", details)
    if details["aspect_over_2"] > UPSCALED_WARN:
        return Finding(name, "warn", f"{text}; {details['aspect_over_2']:.0%} are more than "
                       "twice as long as wide", "a centre crop loses their ends: --resize "
                       "pad or squish keeps them", details)
    return Finding(name, "pass", text, "", details)


def _quantiles(values: np.ndarray) -> dict:
    return {"min": float(values.min()), "median": float(np.median(values)),
            "max": float(values.max())}


def unreadable_files(table: Table, cache: ImageCache) -> Finding:
    failed = cache.failed
    if not failed:
        return Finding("unreadable files", "pass", "every image decodes", "", {"count": 0})
    shown = [f"{row_names(table, [r])[0]} ({cache.errors[r]})" for r in failed[:3]]
    share = len(failed) / max(len(table), 1)
    return Finding("unreadable files", "fail" if share > 0.5 else "warn",
                   f"{len(failed)} of {len(table)} images cannot be read: {'; '.join(shown)}",
                   "fix or remove them (training leaves them out)",
                   {"count": len(failed), "files": row_names(table, failed[:50])})


def constant_images(table: Table, cache: ImageCache) -> Finding:
    usable = np.setdiff1d(np.arange(len(table)), cache.failed)
    chunk = max(1, 32_000_000 // int(np.prod(cache.images.shape[1:])))
    constant = []
    for start in range(0, len(usable), chunk):
        rows = usable[start:start + chunk]
        flat = cache.images[rows].reshape(len(rows), -1)
        constant += rows[flat.min(1) == flat.max(1)].tolist()
    if not constant:
        return Finding("constant images", "pass", "no image is a single colour", "",
                       {"count": 0})
    return Finding("constant images", "warn", f"{len(constant)} image(s) are one colour "
                   f"throughout, e.g. {', '.join(row_names(table, constant[:3]))}",
                   "blank or failed exports teach nothing: remove them or fix the export",
                   {"count": len(constant), "files": row_names(table, constant[:50])})

