"""Callbacks: objects with methods named after the learner's events.

Events, in order: before_fit, before_epoch, before_batch, after_loss, after_step,
after_batch, after_epoch, after_fit. A callback may read and change the learner's state.
"""

from .augment import MixOff, ProgressiveResize
from .base import Callback
from .checkpoint import BestCheckpoint, EarlyStopping, ReduceOnPlateau, SnapshotSaver
from .label_correction import ProgressiveLabelCorrection
from .progress import ProgressCallback
from .run_writer import RunWriter

__all__ = [
    "BestCheckpoint", "Callback", "EarlyStopping", "MixOff", "ProgressCallback",
    "ProgressiveLabelCorrection", "ProgressiveResize", "ReduceOnPlateau", "RunWriter",
    "SnapshotSaver",
]
