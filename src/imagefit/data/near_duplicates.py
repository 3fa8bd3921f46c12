"""Near-duplicates: pairs of images that are copies of each other up to resizing,
re-encoding or small edits, within and across the train, valid and test splits.

Two images are near-duplicates when their 64-bit difference hashes (dHash: is each cell of a
9x8 grey thumbnail brighter than its right neighbour) differ in at most ``hamming`` bits *and*
their cached pixels differ by at most ``pixel_diff`` on average (of 255). The hash alone
is not enough on small, simple images: on Fashion-MNIST 1,373 of the 10,000 test images have
a training image of identical hash whose pixels differ by about 30 on average (a different
shirt of the same shape). The hash finds the candidates in one matrix product of +-1 codes
(Hamming distance = (64 - dot) / 2); the pixel difference confirms them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .table import SPLITS

HASH_BITS = 64
HAMMING = 4  # bits of 64
PIXEL_DIFF = 3.0  # mean absolute difference of the cached pixels, of 255
CHUNK = 2048  # rows of the distance matrix computed at once
MAX_CANDIDATES = 5_000_000  # hash matches checked against the pixels; beyond: a sample


def dhash(images: np.ndarray, rows: np.ndarray | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 64) bool difference hashes of uint8 NHWC ``images`` (or of ``images[rows]``),
    grey by channel mean, and the (N, C*16) uint8 4x4 thumbnails (area means)."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    chunk = _chunk(images)
    codes, thumbs = [], []
    for start in range(0, len(rows), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[rows[start:start + chunk]])).float()
        x = x.permute(0, 3, 1, 2)
        small = F.interpolate(x.mean(1, keepdim=True), size=(8, 9), mode="area")[:, 0]
        codes.append((small[:, :, 1:] > small[:, :, :-1]).reshape(len(x), -1))
        thumbs.append(F.interpolate(x, size=(4, 4), mode="area").flatten(1).round().byte())
    if not codes:
        return torch.zeros(0, HASH_BITS, dtype=torch.bool), torch.zeros(0, 16, dtype=torch.uint8)
    return torch.cat(codes), torch.cat(thumbs)


def _chunk(images: np.ndarray, values: int = 32_000_000) -> int:
    """Images per chunk: about ``values`` pixel values (128 MB as float32) at a time."""
    return max(1, values // max(int(np.prod(images.shape[1:])), 1))


def _mean_abs_diff(images: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    out = np.empty(len(first), dtype=np.float32)
    chunk = _chunk(images)
    for start in range(0, len(first), chunk):
        a = torch.from_numpy(images[first[start:start + chunk]]).to(torch.int16)
        b = torch.from_numpy(images[second[start:start + chunk]]).to(torch.int16)
        out[start:start + chunk] = (a - b).abs().float().flatten(1).mean(1).numpy()
    return out


def near_duplicate_pairs(images: np.ndarray, rows: np.ndarray, *, hamming: int = HAMMING,
                         pixel_diff: float = PIXEL_DIFF, progress=None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) of ``rows`` (i < j as rows) that are near-duplicates, as an (M, 2) array
    of row indices and their mean pixel differences. Exact copies are included (difference
    0). ``progress`` is called with the fraction done."""
    rows = np.sort(np.asarray(rows))
    if len(rows) < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    codes, thumbs = dhash(images, rows)
    signs = (codes.float() * 2 - 1).to(torch.bfloat16)  # +-1 and sums to 64: exact in bf16
    least = HASH_BITS - 2 * hamming
    found = []
    for start in range(0, len(rows), CHUNK):
        block = signs[start:start + CHUNK] @ signs[start:].T  # the upper triangle only
        i, j = torch.nonzero(block >= least, as_tuple=True)
        keep = j > i  # j counts from start: the diagonal is i == j
        i, j = i[keep] + start, j[keep] + start
        # the thumbnails' mean difference is at most the pixels' (a mean of differences):
        # a cheap test that leaves few pairs for the full one (+0.5: the thumbnails' rounding)
        near = (thumbs[i].short() - thumbs[j].short()).abs().float().mean(1) <= pixel_diff + 0.5
        found.append(np.stack([i[near].numpy(), j[near].numpy()], axis=1))
        if progress is not None:
            progress(min(start + CHUNK, len(rows)) / len(rows))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    if len(pairs) > MAX_CANDIDATES:  # so many shape-alike images that the hash says little
        keep = np.random.default_rng(0).choice(len(pairs), MAX_CANDIDATES, replace=False)
        pairs = pairs[np.sort(keep)]
    pairs = rows[pairs]
    diffs = _mean_abs_diff(images, pairs[:, 0], pairs[:, 1])
    close = diffs <= pixel_diff
    return pairs[close], diffs[close]


def summarize_pairs(pairs: np.ndarray, diffs: np.ndarray, split_of: np.ndarray,
                    shown: int = 12) -> dict:
    """Counts of near-duplicate pairs within and across splits, the images in the evaluated
    split that copy a training image, and the closest cross-split pairs."""
    first, second = split_of[pairs[:, 0]], split_of[pairs[:, 1]]
    counts, leaked = [], {}
    for a in range(len(SPLITS)):
        for b in range(a, len(SPLITS)):
            both = ((first == a) & (second == b)) | ((first == b) & (second == a))
            counts.append({"splits": SPLITS[a] if a == b else f"{SPLITS[a]}-{SPLITS[b]}",
                           "pairs": int(both.sum())})
    for k, split in enumerate(SPLITS[1:], start=1):  # valid or test images with a train copy
        mask = ((first == 0) & (second == k)) | ((first == k) & (second == 0))
        copies = np.where(first[mask] == k, pairs[mask, 0], pairs[mask, 1])
        leaked[split] = int(len(np.unique(copies)))
    cross = np.flatnonzero(first != second)
    closest = cross[np.argsort(diffs[cross], kind="stable")][:shown]
    return {"pairs": int(len(pairs)), "by_split": counts, "evaluated_with_train_copy": leaked,
            "examples": [(int(pairs[k, 0]), int(pairs[k, 1]), float(diffs[k]))
                         for k in closest]}
