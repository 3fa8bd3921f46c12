"""Progressive label correction: the loader's batch rows, the theta schedule, corrections of
stored labels, and the counts and CSV a fit writes."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import imagefit
from imagefit import ImagefitError
from imagefit.data.loader import Loader
from imagefit.tasks import Task
from imagefit.train.callbacks import ProgressiveLabelCorrection
from imagefit.train.callbacks.label_correction import CORRECTED_LABELS, theta_schedule

NAMES = ["cat", "dog", "fox"]


@pytest.mark.parametrize("prefetch", [True, False])
def test_batch_rows_name_the_rows_of_the_batch_in_use(prefetch):
    images = torch.arange(30, dtype=torch.uint8)[:, None, None, None].expand(30, 2, 2, 1)
    targets = torch.arange(30, dtype=torch.int64) * 10
    loader = Loader(images.contiguous(), targets, np.arange(3, 30), batch_size=8, shuffle=True,
                    prefetch=prefetch)
    seen = []
    for x, y in loader:
        assert torch.equal(loader.batch_rows, x[:, 0, 0, 0].long())
        assert torch.equal(targets[loader.batch_rows], y)
        seen += loader.batch_rows.tolist()
    assert sorted(seen) == list(range(3, 30))


def test_theta_falls_from_start_to_end_after_the_warm_up():
    linear = theta_schedule(0.3, 0.1, "linear")
    assert [linear(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.3, 0.2, 0.1])
    cosine = theta_schedule(0.3, 0.1, "cosine")
    assert [cosine(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.3, 0.2, 0.1])
    assert cosine(0.25) > linear(0.25)
    step = theta_schedule(0.3, 0.1, "step")
    assert [step(p) for p in (0.0, 0.49, 0.5, 1.0)] == pytest.approx([0.3, 0.3, 0.1, 0.1])
    plc = ProgressiveLabelCorrection(warmup=0.2, theta_start=0.3, theta_end=0.1)
    assert plc.theta_at(0.0) is None and plc.theta_at(0.19) is None
    assert plc.theta_at(0.2) == pytest.approx(0.3)
    assert plc.theta_at(0.6) == pytest.approx(0.2)
    assert plc.theta_at(1.0) == pytest.approx(0.1)
    assert ProgressiveLabelCorrection(warmup=1.0).theta_at(0.999) is None


def logits_for(classes: list[int], confidence: float = 0.99) -> torch.Tensor:
    """Outputs whose softmax gives ``confidence`` to each row's class, the rest shared."""
    probabilities = torch.full((len(classes), len(NAMES)),
                               (1 - confidence) / (len(NAMES) - 1))
    probabilities[torch.arange(len(classes)), torch.tensor(classes)] = confidence
    return probabilities.log()


def fake_learner(labels: list[int], frozen: bool = False) -> SimpleNamespace:
    """The learner state PLC reads: a real loader over ``labels``, a classification task."""
    targets = torch.tensor(labels, dtype=torch.int64)
    images = torch.zeros(len(labels), 2, 2, 1, dtype=torch.uint8)
    model = torch.nn.Linear(2, len(NAMES))
    model.bias.requires_grad_(not frozen)
    return SimpleNamespace(
        task=Task("classification", list(NAMES)),
        pipeline=SimpleNamespace(mix=SimpleNamespace(active=False)),
        model=model,
        train_loader=Loader(images, targets, np.arange(len(labels)), batch_size=len(labels)),
        progress=0.0, outputs=None, history=[],
    )


def run_epoch(plc: ProgressiveLabelCorrection, learner, predicted: list[int],
              progress: float) -> None:
    """One epoch of one batch whose outputs predict ``predicted``."""
    for _ in learner.train_loader:
        learner.progress, learner.outputs = progress, logits_for(predicted)
        plc.after_batch(learner)
    learner.history.append({"epoch": len(learner.history) + 1})
    plc.after_epoch(learner)


TRUE = [0, 1, 2, 0, 1, 2]
STORED = [0, 1, 2, 1, 1, 0]  # rows 3 and 5 are mislabelled


def test_no_label_changes_during_the_warm_up(tmp_path):
    learner = fake_learner(STORED)
    plc = ProgressiveLabelCorrection(warmup=0.5, run_dir=tmp_path)
    plc.before_fit(learner)
    run_epoch(plc, learner, TRUE, progress=0.49)
    assert learner.train_loader.targets.tolist() == STORED
    assert learner.history[-1]["plc_changed"] == 0
    with open(tmp_path / CORRECTED_LABELS) as lines:
        assert list(csv.reader(lines)) == [["row", "original", "corrected"]]


def test_confidently_contradicted_labels_flip_to_the_prediction(tmp_path):
    learner = fake_learner(STORED)
    paths = [f"img{i}.png" for i in range(len(STORED))]
    plc = ProgressiveLabelCorrection(warmup=0.2, run_dir=tmp_path, paths=paths)
    plc.before_fit(learner)
    run_epoch(plc, learner, TRUE, progress=0.5)
    assert learner.train_loader.targets.tolist() == TRUE
    assert learner.history[-1]["plc_changed"] == 2
    with open(tmp_path / CORRECTED_LABELS) as lines:
        assert list(csv.DictReader(lines)) == [
            {"row": "3", "path": "img3.png", "original": "dog", "corrected": "cat"},
            {"row": "5", "path": "img5.png", "original": "cat", "corrected": "fox"}]
    run_epoch(plc, learner, TRUE, progress=0.9)  # the next epoch reads corrected labels
    assert learner.history[-1]["plc_changed"] == 0
    assert [y.tolist() for _, y in learner.train_loader] == [TRUE]


def test_a_small_margin_keeps_the_label():
    learner = fake_learner([0])
    plc = ProgressiveLabelCorrection(warmup=0.0, theta_start=0.3, theta_end=0.3)
    plc.before_fit(learner)
    for _ in learner.train_loader:
        learner.progress = 0.5
        learner.outputs = torch.tensor([[0.35, 0.45, 0.20]]).log()  # margin 0.1 < 0.3
        plc.after_batch(learner)
    assert learner.train_loader.targets.tolist() == [0]


def test_fits_with_frozen_layers_only_warm_up():
    learner = fake_learner(STORED, frozen=True)
    plc = ProgressiveLabelCorrection(warmup=0.0)
    plc.before_fit(learner)
    run_epoch(plc, learner, TRUE, progress=0.9)
    assert learner.train_loader.targets.tolist() == STORED


def test_a_resumed_fit_takes_up_the_saved_corrections(tmp_path):
    first = fake_learner(STORED)
    plc = ProgressiveLabelCorrection(warmup=0.0, run_dir=tmp_path)
    plc.before_fit(first)
    run_epoch(plc, first, TRUE, progress=0.5)
    again = fake_learner(STORED)
    ProgressiveLabelCorrection(run_dir=tmp_path).before_fit(again)
    assert again.train_loader.targets.tolist() == TRUE


def noisy_squares(n: int = 160, flipped: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty or squared 16 px images; the first ``flipped`` labels are wrong."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 50, (n, 16, 16), dtype=np.uint8)
    truth = np.arange(n) % 2
    images[truth == 1, 4:12, 4:12] = 220
    labels = truth.copy()
    labels[:flipped] = 1 - labels[:flipped]
    return images, labels, truth


def test_fit_counts_changes_per_epoch_and_lists_the_corrected_labels(tmp_path):
    images, labels, truth = noisy_squares()
    split = np.where(np.arange(len(labels)) < 130, "train", "valid")
    table = imagefit.from_arrays(images, labels, names=["empty", "square"], split=split)
    result = imagefit.fit(table, epochs=6, runs_dir=str(tmp_path), progress=False, plc=True,
                          report=False, tta=False)
    counts = [row["plc_changed"] for row in result.history]
    with open(result.run_dir / "metrics.csv") as lines:
        assert [int(row["plc_changed"]) for row in csv.DictReader(lines)] == counts
    assert "plc_changed" in (result.run_dir / "log.txt").read_text()
    with open(result.run_dir / CORRECTED_LABELS) as lines:
        corrected = list(csv.DictReader(lines))
    assert sorted(int(entry["row"]) for entry in corrected) == list(range(12))  # the planted
    names = ["empty", "square"]
    for entry in corrected:
        row = int(entry["row"])
        assert entry["original"] == names[labels[row]]
        assert entry["corrected"] == names[truth[row]]
    assert sum(counts) >= len(corrected)  # an early correction may be taken back later


def test_plc_is_refused_for_regression_and_mixed_batches(tmp_path):
    images, labels, _ = noisy_squares(40)
    values = imagefit.from_arrays(images, labels.astype(np.float32))
    with pytest.raises(ImagefitError, match="needs single-label classification"):
        imagefit.fit(values, epochs=1, runs_dir=str(tmp_path), progress=False, plc=True)
    classes = imagefit.from_arrays(images, labels)
    with pytest.raises(ImagefitError, match="needs unmixed batches: turn off mixup/cutmix"):
        imagefit.fit(classes, epochs=1, runs_dir=str(tmp_path), progress=False, plc=True,
                     augment_options={"mixup": 0.2})
    assert not list(tmp_path.iterdir())  # refused before a run directory is made
