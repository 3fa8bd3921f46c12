"""The one exception type users see, and the warning category for skipped input."""


class ImagefitError(Exception):
    """Bad input or a bad option: the message says what is wrong and what to do.

    The command line prints it on one line and exits with status 2.
    """


class ImagefitWarning(UserWarning):
    """Something was skipped or adjusted; the work goes on."""


class FitInterrupted(KeyboardInterrupt):
    """Ctrl-C during a fit: the run directory keeps the last finished epoch (``run_dir`` is
    None when none had finished: the directory was removed)."""

    def __init__(self, run_dir, epochs_done: int) -> None:
        super().__init__(f"interrupted after {epochs_done} finished epoch(s)")
        self.run_dir = run_dir
        self.epochs_done = epochs_done


class TrainingDiverged(ImagefitError):
    """The loss (or the weights) stopped being finite: training stops at once, and the run
    is marked failed with the last finished epoch kept."""


class ChecksFailed(ImagefitError):
    """``fit --check``: a check of the data or the pipeline failed, so the fit did not
    start. The command line prints the message and exits with status 1, as
    ``imagefit check`` does."""
