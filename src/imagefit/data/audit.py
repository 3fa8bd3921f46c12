"""Checks of a dataset before training (``imagefit check``): what the labels, the images and
their statistics say, each as a ``Finding`` with a pass / warn / fail verdict, what was
measured and what to do. The rules are in docs/CHECKS.md; the checks that train a model are
in ``workflows/check.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .cache import ImageCache
from .duplicates import find_duplicates, groups_of, training_copies
from .near_duplicates import near_duplicate_pairs, summarize_pairs
from .table import SPLITS, Table

MIN_CLASS_COUNT = 10  # training images a class needs before it is warned about
IMBALANCE_WARN = 10.0  # largest over smallest class
LEAK_FAIL = 0.01  # evaluated images that copy a training image, as a share of their split
PROBE_ROWS = 4000  # training (and validation) images the one-pixel probe reads
PROBE_VALUES = 200_000_000  # pixel values read per split, at most (fewer images when large)
PROBE_BINS = 32
PROBE_FAIL = 0.90  # balanced accuracy of the best single pixel
OUTLIER_Z = 5.0  # robust z-score (median / MAD) of a regression target
SHOWN = 5


@dataclass
class Finding:
    """One check's verdict: ``status`` is 'pass', 'warn' or 'fail' (or 'skip' when it does
    not apply); ``result`` what was measured, ``advice`` what to do, ``details`` the numbers
    for check.json."""

    check: str
    status: str
    result: str
    advice: str = ""
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"check": self.check, "status": self.status, "result": self.result,
                "advice": self.advice, "details": self.details}


def split_labels(n: int, rows: dict[str, np.ndarray]) -> np.ndarray:
    """Per table row the index of its split in SPLITS, or -1 (unreadable, unused)."""
    split_of = np.full(n, -1, dtype=np.int8)
    for k, name in enumerate(SPLITS):
        split_of[rows[name]] = k
    return split_of


def row_names(table: Table, rows) -> list[str]:
    """The files of ``rows`` (or 'row N' for in-memory data), as findings name them."""
    return [table.paths[r] if table.paths is not None else f"row {r}" for r in rows]


# ---- duplicates ----

def duplicates(table: Table, cache: ImageCache, rows: dict[str, np.ndarray], *,
               hamming: int, pixel_diff: float) -> tuple[list[Finding], dict]:
    """Exact copies (identical cached pixels) and near-duplicates (see ``near_duplicates``),
    within and across splits; a fail when more than 1% of the validation or test images
    copy a training image. Returns the findings and the near pairs for the page."""
    split_of = split_labels(len(table), rows)
    used = np.flatnonzero(split_of >= 0)
    group = groups_of(cache.content_hashes(), used)
    _, first = np.unique(group, return_index=True)
    representatives = np.sort(used[first])  # one row of each group of identical images
    exact_leaked = {s: set(r.tolist())
                    for s, r in training_copies(cache.content_hashes(), split_of).items()}
    found = find_duplicates(table, cache, split_of)
    exact_details = {"duplicate_images": found["duplicate_images"],
                     "groups": found["duplicate_groups"],
                     "label_conflicts": found["duplicate_label_conflicts"],
                     "evaluated_with_train_copy": {s: len(v) for s, v in exact_leaked.items()}}

    pairs, diffs = near_duplicate_pairs(cache.images, representatives, hamming=hamming,
                                        pixel_diff=pixel_diff)
    pairs = pairs[diffs > 0] if len(pairs) else pairs  # identical ones are the exact check's
    diffs = diffs[diffs > 0] if len(diffs) else diffs
    near = summarize_pairs(pairs, diffs, split_of)
    near_leaked = {s: set() for s in SPLITS[1:]}
    for a, b in pairs.tolist():
        for x, y in ((a, b), (b, a)):
            if split_of[x] == 0 and split_of[y] > 0:
                near_leaked[SPLITS[split_of[y]]].add(y)
    findings = [_exact_finding(table, exact_details, rows, exact_leaked),
                _near_finding(table, near, rows, near_leaked, hamming, pixel_diff)]
    leaked = {s: len(exact_leaked[s] | near_leaked[s]) for s in SPLITS[1:]}
    findings.append(leak_finding(leaked, rows))
    return findings, {"pairs": [(a, b, d) for a, b, d in near["examples"]], "near": near}


def _exact_finding(table, details, rows, leaked) -> Finding:
    count, conflicts = details["duplicate_images"], details["label_conflicts"]
    across = ", ".join(f"{len(v)} {s}" for s, v in leaked.items() if v)
    result = (f"{count} exact copies in {details['groups']} groups" if count
              else "no two images are identical")
    if across:
        example = sorted(next(v for v in leaked.values() if v))[0]
        result += (f"; {across} image(s) copy a training image (e.g. "
                   f"{row_names(table, [example])[0]})")
    if conflicts:
        result += f"; {conflicts} group(s) carry different labels"
        return Finding("exact duplicates", "warn", result,
                       "identical images with different labels contradict each other: fix "
                       "the labels or remove the copies", details)
    if count:
        return Finding("exact duplicates", "warn", result,
                       "copies weigh twice in training and inflate figures across splits: "
                       "remove them, or keep each in one split", details)
    return Finding("exact duplicates", "pass", result, "", details)


def _near_finding(table, near, rows, leaked, hamming, pixel_diff) -> Finding:
    by_split = ", ".join(f"{e['pairs']} {e['splits']}" for e in near["by_split"] if e["pairs"])
    rule = f"dHash within {hamming} of 64 bits and pixels within {pixel_diff:g} of 255"
    details = {**near, "hamming": hamming, "pixel_diff": pixel_diff,
               "evaluated_with_train_copy": {s: len(v) for s, v in leaked.items()}}
    if not near["pairs"]:
        return Finding("near duplicates", "pass", f"no near-duplicate pairs ({rule})", "",
                       details)
    cross = sum(e["pairs"] for e in near["by_split"] if "-" in e["splits"])
    result = f"{near['pairs']} pairs ({by_split}; {rule})"
    if near["examples"]:
        a, b, _ = near["examples"][0]
        result += f", e.g. {' ~ '.join(row_names(table, [a, b]))}"
    advice = ("near copies across splits make validation figures optimistic: remove one of "
              "each pair, or split by source (a group column)" if cross else
              "near copies weigh twice in training: remove one of each pair if they are "
              "the same picture")
    return Finding("near duplicates", "warn", result, advice, details)


def leak_finding(leaked: dict, rows: dict) -> Finding:
    shares = {s: leaked[s] / max(len(rows[s]), 1) for s in leaked if len(rows[s])}
    text = ", ".join(f"{leaked[s]} of {len(rows[s])} {s} images ({shares[s]:.2%})"
                     for s in shares)
    details = {"copies": leaked, "shares": shares, "fail_above": LEAK_FAIL}
    if not shares:
        return Finding("leakage across splits", "skip", "no validation or test split", "",
                       details)
    worst = max(shares.values())
    if worst > LEAK_FAIL:
        return Finding("leakage across splits", "fail", f"{text} copy a training image",
                       "their figures measure memory, not generalization: remove the copies "
                       "from validation and test (or from training)", details)
    if worst > 0:
        return Finding("leakage across splits", "warn", f"{text} copy a training image",
                       "under 1%: figures barely change; remove them for clean numbers",
                       details)
    return Finding("leakage across splits", "pass", "no validation or test image copies a "
                   "training image", "", details)


# ---- labels ----

def label_balance(table: Table, train_rows: np.ndarray, folds: int, folds_asked: bool,
                  min_count: int = MIN_CLASS_COUNT) -> list[Finding]:
    """Class counts, small classes and whether ``folds`` stratified folds are possible;
    label frequencies and co-occurrence for multi-label data."""
    names = list(table.task.names)
    if not table.task.has_classes:
        return []
    if table.task.multi_label:
        return _multilabel(table, train_rows, folds, folds_asked)
    counts = np.bincount(np.asarray(table.targets)[train_rows].astype(np.int64),
                         minlength=len(names))
    details = {"counts": {n: int(c) for n, c in zip(names, counts)}}
    smallest, largest = int(counts.min()), int(counts.max())
    ratio = largest / max(smallest, 1)
    text = (f"{len(names)} classes, {smallest} to {largest} training images "
            f"(ratio {ratio:.1f})")
    findings = []
    if ratio > IMBALANCE_WARN:
        findings.append(Finding("label balance", "warn", text,
                                "the model will favour the large classes: --class-weights, "
                                "--balance over or --weighted-sampler, and watch the balanced "
                                "accuracy", details))
    else:
        findings.append(Finding("label balance", "pass", text, "", details))
    small = [(n, int(c)) for n, c in zip(names, counts) if c < min_count]
    if small:
        listed = ", ".join(f"'{n}' ({c})" for n, c in small[:SHOWN])
        findings.append(Finding("small classes", "fail" if any(c == 0 for _, c in small)
                                else "warn",
                                f"{len(small)} class(es) under {min_count} training images: "
                                f"{listed}", "add images of them, or merge them into a "
                                "related class", {"small": dict(small)}))
    else:
        findings.append(Finding("small classes", "pass", f"every class has at least "
                                f"{min_count} training images", "", {}))
    findings.append(_folds(names, counts, folds, folds_asked))
    return findings


def _folds(names, counts, folds: int, asked: bool) -> Finding:
    short = [(n, int(c)) for n, c in zip(names, counts) if c < folds]
    details = {"folds": folds, "classes_too_small": dict(short)}
    if not short:
        return Finding("folds", "pass", f"{folds} stratified folds: every class has at least "
                       f"{folds} images", "", details)
    listed = ", ".join(f"'{n}' ({c})" for n, c in short[:SHOWN])
    possible = int(min(c for _, c in short))
    return Finding("folds", "fail" if asked else "warn",
                   f"{folds} stratified folds need {folds} images of each class: {listed}",
                   f"use --folds {max(possible, 2)} at most, or add images of "
                   f"{'those classes' if len(short) > 1 else 'it'}", details)


def _multilabel(table: Table, train_rows, folds: int, folds_asked: bool) -> list[Finding]:
    names = list(table.task.names)
    y = np.asarray(table.targets)[train_rows].astype(np.float32) > 0.5
    counts = y.sum(0)
    together = y.T.astype(np.int64) @ y.astype(np.int64)
    pairs = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if together[i, j]:
                union = counts[i] + counts[j] - together[i, j]
                pairs.append({"labels": f"{names[i]} + {names[j]}",
                              "together": int(together[i, j]),
                              "jaccard": round(float(together[i, j] / union), 3)})
    pairs.sort(key=lambda p: -p["jaccard"])
    details = {"counts": {n: int(c) for n, c in zip(names, counts)},
               "no_label": int((~y.any(1)).sum()), "co_occurrence": pairs[:20]}
    findings = [Finding("label frequency", "pass", f"{len(names)} labels, "
                        f"{int(counts.min())} to {int(counts.max())} training images each; "
                        f"{details['no_label']} images with none", "", details)]
    if counts.min() < MIN_CLASS_COUNT:
        rare = [f"'{n}' ({int(c)})" for n, c in zip(names, counts) if c < MIN_CLASS_COUNT]
        findings[0] = Finding("label frequency", "warn", findings[0].result + "; rare: "
                              + ", ".join(rare[:SHOWN]), "add images of the rare labels, or "
                              "drop them: their per-label figures will be noise", details)
    same = [p for p in pairs if p["jaccard"] == 1.0]
    if same:
        findings.append(Finding("co-occurrence", "warn", f"{len(same)} pair(s) of labels are "
                                f"always together: {', '.join(p['labels'] for p in same[:SHOWN])}",
                                "labels that always co-occur cannot be told apart: merge "
                                "them, or add images that have one without the other",
                                {"always_together": same}))
    else:
        top = pairs[0] if pairs else None
        findings.append(Finding("co-occurrence", "pass", "no two labels always co-occur" +
                                (f" (most: {top['labels']}, Jaccard {top['jaccard']})"
                                 if top else ""), "", {}))
    short = int(counts.min()) < folds
    findings.append(Finding("folds", ("fail" if folds_asked else "warn") if short else "pass",
                            f"{folds} folds: the rarest label has {int(counts.min())} images",
                            f"use --folds {max(int(counts.min()), 2)} at most" if short
                            else "", {"folds": folds}))
    return findings


def regression_targets(table: Table, rows: np.ndarray) -> list[Finding]:
    """Target range, non-finite values and outliers (robust z-score above 5) over ``rows``
    (every split: a typo in validation misleads too)."""
    train_rows = np.sort(rows)
    if table.task.has_classes:
        return []
    values = np.asarray(table.targets, dtype=np.float64).reshape(len(table), -1)[train_rows]
    findings = []
    for column, name in enumerate(table.task.names):
        v = values[:, column]
        bad = ~np.isfinite(v)
        finite = v[~bad]
        median = float(np.median(finite)) if len(finite) else float("nan")
        mad = float(np.median(np.abs(finite - median))) * 1.4826 if len(finite) else 0.0
        z = np.abs(finite - median) / mad if mad > 0 else np.zeros_like(finite)
        outliers = np.flatnonzero(~bad)[z > OUTLIER_Z]
        details = {"min": float(finite.min()) if len(finite) else None,
                   "max": float(finite.max()) if len(finite) else None,
                   "mean": float(finite.mean()) if len(finite) else None,
                   "std": float(finite.std()) if len(finite) else None,
                   "median": median, "non_finite": int(bad.sum()),
                   "outliers": [row_names(table, [train_rows[i]])[0] for i in outliers[:SHOWN]],
                   "n_outliers": int(len(outliers))}
        text = (f"'{name}': {details['min']:.4g} to {details['max']:.4g}, mean "
                f"{details['mean']:.4g}, std {details['std']:.4g}") if len(finite) else \
            f"'{name}': no finite value"
        if bad.any():
            findings.append(Finding(f"target {name}", "fail", f"{text}; {int(bad.sum())} "
                                    "missing or non-finite", "fill in or remove those rows",
                                    details))
        elif len(outliers):
            shown = ", ".join(details["outliers"][:3])
            findings.append(Finding(f"target {name}", "warn",
                                    f"{text}; {len(outliers)} outlier(s) more than "
                                    f"{OUTLIER_Z:g} robust deviations from the median "
                                    f"(e.g. {shown})", "check them for typos or units; "
                                    "--loss huber or l1 is less pulled by outliers", details))
        else:
            findings.append(Finding(f"target {name}", "pass", text, "", details))
    return findings


def label_in_pixels(table: Table, cache: ImageCache, train_rows: np.ndarray,
                    valid_rows: np.ndarray, seed: int = 0) -> Finding:
    """Whether one pixel position alone tells the class: a lookup from each position's value
    (32 levels) to the class most frequent there in training, scored on validation by
    balanced accuracy. A label written into the images (a marker, a burnt-in tag, a corner
    pixel) scores near 1; real images score far lower at any single pixel."""
    name = "label in pixels"
    if not table.task.single_label:
        return Finding(name, "skip", "single-label classification only")
    if not len(valid_rows):
        return Finding(name, "skip", "no validation rows")
    rng = np.random.default_rng(seed)
    positions = int(np.prod(cache.images.shape[1:]))
    n = max(200, min(PROBE_ROWS, PROBE_VALUES // positions))
    train = np.sort(rng.choice(train_rows, min(len(train_rows), n), replace=False))
    valid = np.sort(rng.choice(valid_rows, min(len(valid_rows), n), replace=False))
    targets = np.asarray(table.targets).astype(np.int64)
    n_classes = len(table.task.names)
    x_train = cache.images[train].reshape(len(train), -1) // (256 // PROBE_BINS)
    x_valid = cache.images[valid].reshape(len(valid), -1) // (256 // PROBE_BINS)
    best, where = 0.0, 0
    y_train, y_valid = targets[train], targets[valid]
    weights = 1.0 / np.maximum(np.bincount(y_valid, minlength=n_classes), 1)
    chunk = max(1, 2_000_000 // max(len(train), 1))
    for start in range(0, positions, chunk):
        cols = np.arange(start, min(start + chunk, positions))
        levels = x_train[:, cols].T.astype(np.int64)
        cells = (np.arange(len(cols))[:, None] * PROBE_BINS + levels) * n_classes + y_train
        counts = np.bincount(cells.reshape(-1), minlength=len(cols) * PROBE_BINS * n_classes
                             ).reshape(len(cols), PROBE_BINS, n_classes)
        lookup = counts.argmax(-1)  # (cols, bins)
        guess = np.take_along_axis(lookup, x_valid[:, cols].T.astype(np.int64), axis=1)
        right = guess == y_valid[None, :]
        scores = (right * weights[y_valid][None, :]).sum(1) / n_classes
        k = int(scores.argmax())
        if scores[k] > best:
            best, where = float(scores[k]), int(cols[k])
    size, channels = cache.images.shape[1], cache.images.shape[3]
    y, x, c = where // (size * channels), (where // channels) % size, where % channels
    details = {"balanced_accuracy": best, "pixel": {"x": x, "y": y, "channel": c},
               "chance": 1 / n_classes, "fail_at": PROBE_FAIL}
    text = f"the best single pixel (x {x}, y {y}) tells the class with balanced accuracy " \
        f"{best:.3f} (chance {1 / n_classes:.3f})"
    if best >= PROBE_FAIL:
        return Finding(name, "fail", text, "the label is written into the images (a marker "
                       "or tag at that pixel?): the model will read it instead of learning; "
                       "crop or mask it", details)
    return Finding(name, "pass", text, "", details)
