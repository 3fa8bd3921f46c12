"""The public surface, listed once: the functions and result types of ``imagefit.api``, the
other public names with the modules they come from, and the public functions behind each
command of the command line. ``imagefit.__all__``, ``imagefit.api.__all__`` and the command
line's commands derive from these lists, and tests/test_surface.py checks that every name
resolves where it is listed. Pure data: reading it loads nothing."""

from __future__ import annotations

# imagefit.api's names (``imagefit.NAME`` loads api on first use); none may be the name of
# one of the package's modules (runs, models, report), which ``imagefit.NAME`` would give
API = (
    # training
    "fit", "resume", "cv", "sweep", "tune", "check", "label_issues", "lr_find", "show_batch",
    # a trained model
    "load_model", "predict", "evaluate", "explain", "export", "serve", "write_report",
    # listings: runs, caches, models
    "list_runs", "compare_runs", "list_caches", "clear_caches", "list_models", "summary",
    # arrays as data, and the results as text
    "from_arrays", "format_check", "format_cv", "format_issues", "format_sweep", "format_tune",
    # what they return or raise
    "CVResult", "CheckResult", "FitResult", "LabelIssuesResult", "SweepInterrupted",
    "SweepResult", "TuneInterrupted", "TuneResult",
)

# the other public names, each from its own module (relative to the package)
ELSEWHERE = {
    "CheckConfig": "config", "EvaluateOptions": "config", "FitConfig": "config",
    "LabelIssuesOptions": "config", "PredictOptions": "config",
    "Table": "data.table", "read_source": "data.sources",
    "LoadedModel": "evaluation.inference",
}

# each command of the command line and the public functions that do its work
COMMANDS = {
    "fit": ("fit", "resume"), "predict": ("predict",), "evaluate": ("evaluate",),
    "lr-find": ("lr_find",), "show-batch": ("show_batch",), "check": ("check",),
    "cv": ("cv",), "label-issues": ("label_issues",), "explain": ("explain",),
    "export": ("export",), "serve": ("serve",), "report": ("write_report",),
    "runs": ("list_runs", "compare_runs"), "cache": ("list_caches", "clear_caches"),
    "models": ("list_models",), "summary": ("summary",), "sweep": ("sweep",),
    "tune": ("tune",),
}
