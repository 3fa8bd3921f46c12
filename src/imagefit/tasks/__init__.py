"""What is being learned: the task kinds (``tasks.base``: what every kind answers;
``tasks.kinds``: the built-in ones)."""

from .base import HIGHER_IS_BETTER, KINDS, Task, resolve_loss, task_class
from .kinds import Classification, MultiLabel, Regression

__all__ = ["HIGHER_IS_BETTER", "KINDS", "Task", "resolve_loss", "task_class",
           "Classification", "MultiLabel", "Regression"]
