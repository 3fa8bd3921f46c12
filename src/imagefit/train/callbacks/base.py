"""The callback base class."""

from __future__ import annotations

EVENTS = ("before_fit", "before_epoch", "before_batch", "after_loss", "after_step",
          "after_batch", "after_epoch", "after_fit")


class Callback:
    """Subclass and define any of the methods named in ``EVENTS``; each receives the learner.
    Callbacks run in increasing ``order``."""

    order: int = 0


def callback_order(callback: object) -> int:
    """Where a callback runs among the others: its ``order``, or 0 for any object that has
    some of the event methods and nothing else (as the README promises)."""
    return getattr(callback, "order", 0)
