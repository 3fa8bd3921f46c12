"""Exact duplicates: images whose cached pixels are identical, found by a digest of each
cached image, within and across the train, valid and test splits."""

from __future__ import annotations

import numpy as np

from .cache import ImageCache
from .table import SPLITS, Table

EXAMPLES_PER_PAIR = 3
MEMBERS_PER_EXAMPLE = 4


def find_duplicates(table: Table, cache: ImageCache, split_of: np.ndarray) -> dict:
    """Exact duplicates among the used rows (``split_of`` >= 0, an index into SPLITS).

    "Exact" means identical cached pixels: equal after decoding, conversion to the cache's
    channels and resizing to the cache's size. Two files that differ only in format,
    compression or size beyond what resizing removes count as duplicates; an image and a
    shifted or re-encoded lossy copy usually do not. Groups are found by 128 bits of the
    pixels' SHA-256 digest, where an accidental collision is practically impossible.
    """
    rows = np.flatnonzero(split_of >= 0)
    empty = {"duplicate_images": 0, "duplicate_groups": 0, "duplicate_label_conflicts": 0,
             "cross_split_duplicates": [], "duplicate_examples": []}
    if not len(rows):
        return empty
    _, group, sizes = np.unique(cache.content_hashes()[rows], axis=0, return_inverse=True,
                                return_counts=True)
    group = group.reshape(-1)
    labels = split_of[rows]
    present = np.zeros((len(SPLITS), len(sizes)), dtype=bool)
    for k in range(len(SPLITS)):
        present[k, group[labels == k]] = True
    targets = np.asarray(table.targets)[rows].reshape(len(rows), -1)
    _, target_id = np.unique(targets, axis=0, return_inverse=True)
    pairs = np.unique(np.stack([group, target_id.reshape(-1)], axis=1), axis=0)
    conflicts = int((np.bincount(pairs[:, 0], minlength=len(sizes)) > 1).sum())

    cross, examples = [], []
    for first, second in ((0, 1), (0, 2), (1, 2)):
        shared = present[first] & present[second]
        name = f"{SPLITS[first]}-{SPLITS[second]}"
        cross.append({"splits": name, "groups": int(shared.sum()),
                      "leaked_images": int((shared[group] & (labels == second)).sum())})
        for g in np.flatnonzero(shared)[:EXAMPLES_PER_PAIR]:
            members = rows[group == g][:MEMBERS_PER_EXAMPLE]
            examples.append({
                "splits": name,
                "rows": members.tolist(),
                "row_splits": [SPLITS[k] for k in split_of[members]],
                "paths": [table.paths[r] for r in members] if table.paths is not None else [],
            })
    return {
        "duplicate_images": int(len(rows) - len(sizes)),
        "duplicate_groups": int((sizes > 1).sum()),
        "duplicate_label_conflicts": conflicts,
        "cross_split_duplicates": cross,
        "duplicate_examples": examples,
    }


def groups_of(hashes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per row of ``rows``, the index of its group of identical cached pixels."""
    _, group = np.unique(hashes[rows], axis=0, return_inverse=True)
    return group.reshape(-1)


def training_copies(hashes: np.ndarray, split_of: np.ndarray) -> dict[str, np.ndarray]:
    """Per evaluated split ('valid', 'test'), its rows whose cached pixels equal those of a
    training row (``split_of``: an index into SPLITS per row, -1 for unused rows)."""
    used = np.flatnonzero(split_of >= 0)
    if not len(used):
        return {s: np.zeros(0, dtype=np.int64) for s in SPLITS[1:]}
    group = groups_of(hashes, used)
    in_train = np.zeros(group.max() + 1, dtype=bool)
    in_train[group[split_of[used] == 0]] = True
    return {s: used[(split_of[used] == k) & in_train[group]] for k, s in enumerate(SPLITS) if k}
