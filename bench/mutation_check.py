"""Mutation check of the tests: for each option and feature, one effect in the source is
disabled (a call replaced by None, a condition by False, a value by another), the tests named
for it run, and at least one must fail.

Each mutation names its place by module, function (qualified: ``Class.method``, or
``outer.inner`` for a nested function) and a pattern over the function's syntax tree, not by
source text, so reformatting a line or moving a function keeps it; a refactor that removes
the effect removes the anchor, and tests/test_mutation_anchors.py fails saying which. The
source in src/ is never changed: each mutation is applied to a fresh copy of src/, tests/ and
pyproject.toml in a temporary folder, whose src/ comes first on PYTHONPATH.

    .venv/bin/python bench/mutation_check.py            # all; writes results/mutation_check.json
    .venv/bin/python bench/mutation_check.py --list
    .venv/bin/python bench/mutation_check.py --only "grad clip,run lock"   # prints only
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("src", "tests", "pyproject.toml")
PYTEST = ["-x", "-q", "-p", "no:cacheprovider"]
TIMEOUT_S = 600  # per pytest run; a mutant that hangs a test counts as caught, marked so
LOGS = ROOT / "bench" / "results" / "tmp" / "mutation_check"  # pytest's output per run

Find = Callable[[ast.AST], bool]


# -- patterns over syntax-tree nodes ---------------------------------------------------------
# Each takes a node whose ``parent`` is set (``anchor`` sets it) and says whether it is the
# node to replace.

def _name(node: ast.AST) -> str | None:
    """The last name of a Name or Attribute (``clip_grad_norm_`` of torch.nn.utils...)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _name(node.value)
    return None


def code(node: ast.AST) -> str:
    return ast.unparse(node)


def call(name: str, *, args: str | None = None) -> Find:
    """A call to ``name``: a function or method name (``update``), or the whole unparsed
    callee (``self.ema.update``); with ``args``, only with these unparsed arguments."""
    def find(node):
        return isinstance(node, ast.Call) and name in (_name(node.func), code(node.func)) and (
            args is None or ", ".join(code(a) for a in [*node.args, *node.keywords]) == args)
    return find


def indexed(find: Find) -> Find:
    """An item taken from what ``find`` matches: ``f(x)[k]`` as a whole."""
    return lambda node: isinstance(node, ast.Subscript) and find(node.value)


def value_assigned_to(target: str, value: str | None = None) -> Find:
    """The value of an assignment (plain or augmented) to ``target``: a name or attribute
    (``stop`` matches ``learner.stop``), or the unparsed target (``info['task']['threshold']``);
    with ``value``, only where the value unparses to it."""
    def find(node):
        parent = getattr(node, "parent", None)
        if not isinstance(parent, (ast.Assign, ast.AugAssign, ast.AnnAssign)) or \
                parent.value is not node:
            return False
        targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
        return any(target in (_name(t), code(t)) for t in targets) and (
            value is None or code(node) == value)
    return find


def assignment_to(target: str) -> Find:
    """A whole assignment statement to the unparsed ``target`` (to replace by pass)."""
    return lambda node: isinstance(node, ast.Assign) and any(code(t) == target
                                                            for t in node.targets)


def condition(text: str) -> Find:
    """The test of an ``if``, ``while`` or conditional expression that unparses to ``text``."""
    def find(node):
        parent = getattr(node, "parent", None)
        return isinstance(parent, (ast.If, ast.While, ast.IfExp)) and parent.test is node \
            and code(node) == text
    return find


def loop_over(text: str) -> Find:
    """The iterable of a ``for`` loop that unparses to ``text``."""
    def find(node):
        parent = getattr(node, "parent", None)
        return isinstance(parent, ast.For) and parent.iter is node and code(node) == text
    return find


def keyword_value(name: str) -> Find:
    """The value given to keyword argument ``name`` in a call."""
    def find(node):
        parent = getattr(node, "parent", None)
        return isinstance(parent, ast.keyword) and parent.arg == name and parent.value is node
    return find


def expression(text: str) -> Find:
    """Any expression that unparses to ``text``."""
    return lambda node: isinstance(node, ast.expr) and code(node) == text


def inside_handler_of(exception: str, find: Find) -> Find:
    """``find``, within an ``except exception`` clause."""
    def within(node):
        up = getattr(node, "parent", None)
        while up is not None:
            if isinstance(up, ast.ExceptHandler) and up.type is not None and \
                    _name(up.type) == exception:
                return find(node)
            up = getattr(up, "parent", None)
        return False
    return within


# -- mutations --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mutation:
    """``find`` picks exactly one node of ``function`` in ``module``; its source is replaced
    by ``mutate``; one of ``tests`` (pytest ids) must then fail."""

    name: str
    module: str  # imagefit.train.learner
    function: str  # Learner._backward_and_step; outer.inner for a nested function
    find: Find
    mutate: str
    tests: tuple[str, ...]
    what: str  # the pattern in words, for --list

    @property
    def path(self) -> Path:
        """The module's file, relative to the source root."""
        return Path(*self.module.split(".")).with_suffix(".py")


def _definitions(scope: ast.AST):
    """The functions and classes defined in ``scope`` itself (under if, try or with too),
    not those inside them."""
    for node in ast.iter_child_nodes(scope):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
        else:
            yield from _definitions(node)


def function_node(tree: ast.Module, qualname: str) -> ast.AST | None:
    """The function (or method, or nested function) ``qualname`` names in ``tree``."""
    node: ast.AST | None = tree
    for part in qualname.split("."):
        node = next((d for d in _definitions(node) if d.name == part), None)
        if node is None:
            return None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def anchor(mutation: Mutation, source: str) -> list[ast.AST]:
    """The nodes of the mutation's function that its pattern matches (one, when the anchor
    holds); raises LookupError when the function is gone."""
    function = function_node(ast.parse(source), mutation.function)
    if function is None:
        raise LookupError(f"{mutation.module}:{mutation.function} not found")
    for node in ast.walk(function):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    return [node for node in ast.walk(function) if node is not function and mutation.find(node)]


def apply(mutation: Mutation, source: str) -> tuple[str, str, str]:
    """The mutated source, and the changed lines before and after."""
    nodes = anchor(mutation, source)
    if len(nodes) != 1:
        raise LookupError(f"{mutation.module}:{mutation.function}: {mutation.what} matches "
                          f"{len(nodes)} nodes, not one")
    node = nodes[0]
    lines = source.splitlines(keepends=True)
    first, last = node.lineno - 1, node.end_lineno - 1
    head = lines[first].encode()[:node.col_offset].decode()  # offsets count UTF-8 bytes
    tail = lines[last].encode()[node.end_col_offset:].decode()
    changed = head + mutation.mutate + tail
    before = "".join(lines[first:last + 1])
    return "".join(lines[:first]) + changed + "".join(lines[last + 1:]), before, changed


OPTIONS = "tests/test_option_effects.py::"
TUNE, LABELS, EXPORT, SERVE = ("tests/test_tune.py::", "tests/test_label_issues.py::",
                               "tests/test_export.py::", "tests/test_serve.py::")
GAPS_FILE = "tests/test_mutation_gaps.py::"

MUTATIONS = [
    # the training options of test_option_effects.py
    Mutation("lr auto", "imagefit.workflows.fit", "prepare", value_assigned_to("cfg.lr"),
             "0.1", (OPTIONS + "test_lr_auto_trains_at_the_finders_valley",),
             "the value assigned to cfg.lr"),
    Mutation("early stop", "imagefit.train.callbacks.checkpoint", "EarlyStopping.exhausted",
             value_assigned_to("stop", "True"), "False",
             (OPTIONS + "test_early_stop_ends_exactly_patience_epochs_after_the_best",),
             "the True assigned to learner.stop"),
    Mutation("EMA", "imagefit.train.learner", "Learner._step_if_due", call("self.ema.update"),
             "None", (OPTIONS + "test_ema_is_the_hand_computed_average_and_the_model_saved",),
             "the call to self.ema.update"),
    Mutation("accumulate", "imagefit.train.learner", "Learner._steps_optimizer",
             expression("self.accumulate"), "1",
             (OPTIONS + "test_accumulating_two_batches_steps_as_one_batch_twice_the_size",),
             "self.accumulate in the step test"),
    Mutation("grad clip", "imagefit.train.step", "optimizer_step",
             call("clip_grad_norm_"), "None",
             (OPTIONS + "test_grad_clip_bounds_the_norm_the_optimizer_steps_with",),
             "the call to clip_grad_norm_"),
    Mutation("label smoothing", "imagefit.tasks.kinds", "Classification.loss",
             keyword_value("label_smoothing"), "0.0",
             (OPTIONS + "test_label_smoothing_is_the_loss_trained_on",),
             "the value of keyword label_smoothing"),
    Mutation("plateau", "imagefit.train.callbacks.checkpoint", "ReduceOnPlateau.exhausted",
             value_assigned_to("lr_factor"), "1.0",
             (OPTIONS + "test_reduce_on_plateau_multiplies_the_rate_after_patience_epochs",),
             "the factor learner.lr_factor is multiplied by"),
    Mutation("lr groups", "imagefit.train.learner", "Learner.group_lrs",
             value_assigned_to("lr_scales"), "None",
             (OPTIONS + "test_lr_groups_give_each_layer_group_its_rate",),
             "the value assigned to self.lr_scales"),
    Mutation("freeze epochs", "imagefit.workflows.phases", "train_phases", call("freeze"),
             "None", (OPTIONS + "test_freeze_epochs_keep_the_body_fixed_while_the_head_learns",),
             "the call to learner.freeze"),
    Mutation("TTA", "imagefit.forward", "loader_outputs", loop_over("range(tta.n)"),
             "range(0)", (OPTIONS + "test_flip_tta_figures_are_the_average_with_the_mirror_image",),
             "the for loop over range(tta.n)"),
    Mutation("image sizes", "imagefit.train.callbacks.augment", "ProgressiveResize.before_epoch",
             value_assigned_to("image_size"), "None",
             (OPTIONS + "test_each_progressive_size_reaches_the_model",),
             "the value assigned to learner.image_size"),
    Mutation("threshold", "imagefit.workflows.conclude", "_store_threshold",
             value_assigned_to("info['task']['threshold']"), "0.5",
             (OPTIONS + "test_the_threshold_chosen_on_validation_is_the_one_predict_applies",),
             "the value assigned to info['task']['threshold']"),
    # tune
    Mutation("tune pruning", "imagefit.workflows.tune", "Pruning.after_epoch",
             call("should_prune"), "False",
             (TUNE + "test_the_pruner_stops_a_clearly_bad_trial_after_its_second_epoch",),
             "the call to trial.should_prune"),
    Mutation("tune pruning by progress", "imagefit.workflows.tune", "Pruning.after_epoch",
             call("report", args="at, step"), "None",
             (TUNE + "test_budget_trials_are_compared_at_the_same_point_of_their_schedules",),
             "the call report(at, step) of a --budget trial"),
    Mutation("tune confirm ranking", "imagefit.workflows.tune", "confirm",
             expression("ranked[0]"), "entries[1]",
             (GAPS_FILE + "test_confirm_chooses_the_best_median_not_the_best_search_value",),
             "ranked[0], the candidate chosen"),
    # label issues and the fit acting on them
    Mutation("label-issues drop-rows", "imagefit.data.label_edits", "apply_label_edits",
             assignment_to("split[chosen]"), "pass",
             (GAPS_FILE + "test_drop_rows_leaves_out_the_listed_training_rows_only",),
             "the assignment to split[chosen]"),
    Mutation("relabel", "imagefit.data.label_edits", "apply_label_edits",
             value_assigned_to("targets[row]", "names[label]"), "targets[row]",
             (GAPS_FILE + "test_relabel_gives_the_listed_training_rows_the_suggested_class",),
             "the suggested class assigned to targets[row]"),
    Mutation("label-issue rule", "imagefit.evaluation.label_issues", "find_label_issues",
             expression("'low_self_confidence'"), "'prune_by_noise_rate'",
             (GAPS_FILE + "test_auto_flags_by_low_self_confidence_for_single_label_data",),
             "the constant 'low_self_confidence' of filter_by 'auto'"),
    Mutation("label-issue rule given", "imagefit.evaluation.label_issues", "_single_label",
             keyword_value("filter_by"), "'prune_by_noise_rate'",
             (GAPS_FILE + "test_each_rule_flags_cleanlabs_own_rows",),
             "the value of keyword filter_by to cleanlab"),
    # export and serving
    Mutation("export parity", "imagefit.evaluation.export", "export_onnx",
             condition("description['parity']['max_abs_diff'] > PARITY_LIMIT"), "False",
             (EXPORT + "test_every_promised_export_error_is_one_line",),
             "the parity limit test"),
    Mutation("ONNX TTA", "imagefit.evaluation.inference", "_predict_onnx",
             loop_over("range(tta.n)"), "range(0)",
             (EXPORT + "test_predict_runs_an_exported_file_as_the_run_in_fp32",),
             "the for loop over range(tta.n)"),
    Mutation("serve batching", "imagefit.evaluation.serving", "Batcher._work",
             condition("count < self.max_batch"), "False",
             (SERVE + "test_the_batcher_splits_batches_at_max_batch_and_survives_a_failed_pass",),
             "the while loop that lets requests join a batch"),
    Mutation("serve max batch", "imagefit.evaluation.serving", "Batcher._work",
             condition("count + len(job[0]) > self.max_batch"), "False",
             (SERVE + "test_the_batcher_splits_batches_at_max_batch_and_survives_a_failed_pass",),
             "the test that a joining request would overfill the batch"),
    Mutation("serve upload size", "imagefit.workflows.serve", "_read_uploads",
             condition("len(data) > max_file"), "False",
             (SERVE + "test_bad_uploads_get_4xx_with_a_message_and_the_server_goes_on",),
             "the test of a file over --max-file-mb"),
    Mutation("serve pixels", "imagefit.evaluation.serving", "ServedModel.decode",
             condition("width * height > max_pixels"), "False",
             (SERVE + "test_bad_uploads_get_4xx_with_a_message_and_the_server_goes_on",),
             "the test of an image over --max-pixels"),
    Mutation("serve request size", "imagefit.workflows.serve", "_BodyLimit.__call__.limited",
             condition("received > self.limit"), "False",
             (SERVE + "test_bad_uploads_get_4xx_with_a_message_and_the_server_goes_on",),
             "the test of a streamed body over the limit"),
    # data
    Mutation("near-duplicate pixel threshold", "imagefit.data.near_duplicates",
             "near_duplicate_pairs", value_assigned_to("close"), "diffs >= 0",
             (GAPS_FILE + "test_the_same_shape_with_other_pixels_is_not_a_near_duplicate",),
             "the pixel-difference test of the candidates"),
    Mutation("near-duplicate hash threshold", "imagefit.data.near_duplicates",
             "near_duplicate_pairs", value_assigned_to("least"), "-HASH_BITS",
             ("tests/test_check.py::"
              "test_resized_and_reencoded_copies_are_near_and_distinct_images_are_not",
              GAPS_FILE + "test_the_same_shape_with_other_pixels_is_not_a_near_duplicate"),
             "the least hash agreement of a candidate"),
    Mutation("shard split", "imagefit.distributed", "training_shares",
             expression("order[k::ranks]"), "order",
             ("tests/test_loader.py::test_sharded_ranks_read_their_own_rows_once_per_epoch",),
             "order[k::ranks], rank k's deal of the rows"),
    Mutation("batch share", "imagefit.data.loader", "Loader._share",
             indexed(call("tensor_split")), "batch",
             ("tests/test_distributed.py::"
              "test_ranks_read_their_share_of_the_same_global_batches",),
             "this rank's part of tensor_split(batch)"),
    Mutation("cache invalidation", "imagefit.data.cache", "file_stats",
             value_assigned_to("stats[row]"), "(0, 0, 0, 0)",
             ("tests/test_cache.py::test_changed_file_alone_is_decoded_again_in_place",
              "tests/test_cache.py::test_a_rewrite_keeping_size_and_mtime_is_noticed"),
             "the size, times and inode recorded per file"),
    Mutation("cache key settings", "imagefit.data.cache", "cache_key", call("asdict"), "None",
             ("tests/test_cache.py::test_cache_key_changes_with_the_file_list_and_settings",),
             "the call to asdict(settings) in the key"),
    Mutation("text lowercase", "imagefit.data.text", "Vocabulary.encode",
             value_assigned_to("text"), "text",
             ("tests/test_text.py::test_unseen_characters_are_unknown_and_lengths_pad_or_cut",),
             "the value assigned to text (lower-cased)"),
    Mutation("text unknown characters", "imagefit.data.text", "Vocabulary.encode",
             expression("UNKNOWN"), "PAD",
             ("tests/test_text.py::test_unseen_characters_are_unknown_and_lengths_pad_or_cut",),
             "UNKNOWN, the code of an unseen character"),
    # runs and stopping
    Mutation("run lock", "imagefit.runs", "RunLock.__enter__", call("flock"), "None",
             ("tests/test_run_files.py::"
              "test_a_run_being_written_cannot_be_resumed_and_a_dead_owner_does_not_block",),
             "the call to fcntl.flock"),
    Mutation("divergence stop", "imagefit.train.learner", "Learner._watch_loss",
             condition("bad"), "False",
             ("tests/test_divergence.py::"
              "test_divergence_keeps_the_last_finite_epoch_and_marks_the_run_failed",),
             "the test of a non-finite loss on the CPU"),
    Mutation("divergence marks failed", "imagefit.workflows.fit", "train_in_run_dir",
             inside_handler_of("TrainingDiverged", call("record_failure")), "None",
             ("tests/test_divergence.py::"
              "test_divergence_keeps_the_last_finite_epoch_and_marks_the_run_failed",),
             "the call to record_failure for a diverged fit"),
    Mutation("budget stop", "imagefit.train.budget", "BudgetPlanner.after_batch",
             value_assigned_to("stop", "True"), "False",
             ("tests/test_budget.py::"
              "test_a_slowdown_is_planned_for_after_the_epoch_or_stopped_at_the_deadline",),
             "the True assigned to learner.stop at the deadline"),
    Mutation("budget frozen phase", "imagefit.workflows.phases", "train_phases",
             call("planner.phase"), "None",
             ("tests/test_budget.py::"
              "test_a_budget_fit_plans_its_frozen_epochs_within_their_share",),
             "the frozen epochs' own planner of a --budget fine-tune"),
    Mutation("budget phase cap", "imagefit.train.budget", "plan_steps",
             expression("low if max_steps is None else max(min(low, max_steps), steps_done)"),
             "low",
             ("tests/test_budget.py::"
              "test_a_phase_before_the_fit_takes_at_most_its_share_of_the_budget_and_its_steps",),
             "the cap of a phase's planned steps at its own length"),
    Mutation("budget drops TTA", "imagefit.workflows.phases", "budget_planner.told",
             condition("extra > TTA_BUDGET_SHARE * budget_seconds"), "False",
             ("tests/test_budget.py::test_a_budget_fit_drops_tta_that_would_take_too_much_of_it",),
             "the test of TTA's share of a --budget"),
    Mutation("lr auto within the budget", "imagefit.train.lr_finder", "find_lr",
             condition("seconds is not None and len(lrs) == TIMED_STEPS"), "False",
             ("tests/test_train.py::"
              "test_lr_finder_within_seconds_spreads_its_whole_range_over_the_steps_that_fit",),
             "the LR finder's sweep spread over the steps that fit its seconds"),
    Mutation("photo weights' frozen options", "imagefit.config", "_frozen_first",
             call("may_take_photo_weights"), "False",
             ("tests/test_photo_default.py::test_no_train_bn_acts_on_the_default_photo_weights",),
             "--no-train-bn accepted before the images tell whether weights come"),
    Mutation("photo augmentation of long fits", "imagefit.workflows.recipes",
             "apply_photo_augmentation", value_assigned_to("cfg.augment"), "'none'",
             ("tests/test_photo_default.py::test_long_fits_from_the_photo_weights_augment",),
             "light augmentation for a fit of 10 epochs or more from the photo weights"),
    Mutation("photo budget keeps TTA", "imagefit.workflows.fit", "augmentation_by_plan",
             value_assigned_to("small"), "True",
             ("tests/test_photo_default.py::"
              "test_a_photo_budget_fit_decides_augmentation_at_its_first_plan_and_keeps_tta",),
             "a short photo --budget fit turns augmentation off and keeps TTA"),
]

# Mutations no test catches: why, and what would catch them.
GAPS: dict[str, str] = {
    "near-duplicate hash threshold": (
        "equivalent in outcome: the hash only picks the candidates that the thumbnail and "
        "pixel tests then decide on, and a pair within 3 of 255 per pixel on average agrees "
        "in hash as well (but for nearly flat images, whose hash is noise), so without it the "
        "same pairs are found, more slowly (every pair reaches the thumbnail test). No test of "
        "an outcome can tell; the timing of bench/check_speed.py would"),
}


# -- running ----------------------------------------------------------------------------------

def copy_tree() -> Path:
    """A fresh copy of what the tests need, in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="imagefit-mutation-"))
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, folder / name)
    return folder


def environment(copy: Path) -> dict:
    """The tests' environment: the copy's src first on the path (before the venv's editable
    install of this tree), and CI unset, so that a test skipped here does not fail."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy / "src"),
                                                      env.get("PYTHONPATH")]))
    return env


def check_import(copy: Path) -> Path:
    """Where ``import imagefit`` finds the package in the tests' environment; refuses to go
    on unless that is the copy."""
    found = subprocess.run([sys.executable, "-c", "import imagefit; print(imagefit.__file__)"],
                           cwd=copy, env=environment(copy), capture_output=True, text=True)
    where = Path(found.stdout.strip()).resolve()
    if not where.is_relative_to((copy / "src").resolve()):
        raise SystemExit(f"import imagefit gives {where or found.stderr}, not the copy in "
                         f"{copy}: the mutants would not be tested")
    return where


def run_tests(copy: Path, tests: list[str], log: Path, timeout: float,
              options: tuple[str, ...] = ()) -> dict:
    """pytest on ``tests`` in ``copy``, its output in ``log``: its exit code (or "timeout"),
    the failing test ids, the seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "pytest", *PYTEST, *options, *tests],
                                   cwd=copy, env=environment(copy), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | str = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # pytest and what its tests started
            process.wait()
            code = "timeout"
    output = log.read_text(errors="replace")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    return {"code": code, "failed": list(dict.fromkeys(failed)), "output": output,
            "seconds": round(time.perf_counter() - started, 1)}


def seconds_per_test(output: str) -> dict[str, float]:
    """Seconds per test (setup, call and teardown) from pytest's --durations report."""
    seconds: dict[str, float] = {}
    for value, test in re.findall(r"^([\d.]+)s (?:setup|call|teardown) +(\S+)$", output,
                                  flags=re.MULTILINE):
        seconds[test] = round(seconds.get(test, 0.0) + float(value), 2)
    return seconds


def check_one(mutation: Mutation, timeout: float) -> dict:
    copy = copy_tree()
    try:
        path = copy / "src" / mutation.path
        mutated, before, after = apply(mutation, path.read_text())
        path.write_text(mutated)
        done = run_tests(copy, list(mutation.tests), LOGS / f"{slug(mutation.name)}.log",
                         timeout)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    caught = done["code"] == "timeout" or (done["code"] == 1 and bool(done["failed"]))
    result = {"name": mutation.name, "module": mutation.module, "function": mutation.function,
              "pattern": mutation.what, "file": f"src/{mutation.path.as_posix()}",
              "before": before.rstrip("\n"), "after": after.rstrip("\n"),
              "tests": list(mutation.tests), "caught": caught,
              "failing_tests": done["failed"], "timed_out": done["code"] == "timeout",
              "seconds": done["seconds"]}
    if done["code"] not in (0, 1, "timeout"):  # pytest itself failed (usage, collection)
        result["error"] = done["output"][-2000:]
    if not caught:
        result["gap"] = GAPS.get(mutation.name, "no test catches it yet")
    return result


def baseline(mutations: list[Mutation], timeout: float) -> dict:
    """Every named test on the unchanged copy, each to the end: a test failing here cannot
    catch anything."""
    tests = list(dict.fromkeys(t for m in mutations for t in m.tests))
    copy = copy_tree()
    try:
        imported = check_import(copy)
        done = run_tests(copy, tests, LOGS / "baseline.log", timeout * 3,
                         options=("--maxfail=1000", "--durations=0"))
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return {**done, "imported": str(imported), "tests": seconds_per_test(done["output"])}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and stop")
    parser.add_argument("--only", help="comma-separated names: run these only (no result file)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S,
                        help="seconds per pytest run of a mutant")
    args = parser.parse_args()
    mutations = MUTATIONS
    if args.list:
        for m in mutations:
            print(f"{m.name}: {m.module}:{m.function}, {m.what} -> {m.mutate}\n    "
                  + "\n    ".join(m.tests))
        return
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in names if n not in {m.name for m in mutations}]
        if unknown:
            raise SystemExit(f"no mutation named {unknown[0]!r}: see --list")
        mutations = [m for m in mutations if m.name in names]

    started = time.perf_counter()
    clean = baseline(mutations, args.timeout)
    print(f"baseline: imagefit imported from {clean['imported']}; "
          f"{len({t for m in mutations for t in m.tests})} tests, exit {clean['code']}, "
          f"{clean['seconds']:.0f} s", flush=True)
    if clean["code"] != 0:
        raise SystemExit(f"the tests fail before any mutation: {clean['failed']}\n"
                         + clean["output"][-3000:])
    results = []
    for mutation in mutations:
        result = check_one(mutation, args.timeout)
        results.append(result)
        verdict = ("caught by " + ", ".join(result["failing_tests"]) if result["caught"]
                   and not result["timed_out"] else "caught: timed out" if result["caught"]
                   else "NOT CAUGHT")
        print(f"{mutation.name}: {verdict} ({result['seconds']:.0f} s)", flush=True)
    seconds = round(time.perf_counter() - started, 1)
    caught = sum(r["caught"] for r in results)
    print(f"caught {caught} of {len(results)} in {seconds:.0f} s")
    if args.only:
        print(json.dumps(results, indent=2))
        return
    from common import write_result

    write_result("mutation_check", {
        "command": "bench/mutation_check.py",
        "mutations": results, "caught": caught, "total": len(results),
        "baseline_seconds": clean["seconds"], "baseline_test_seconds": clean["tests"],
        "seconds": seconds,
    })


if __name__ == "__main__":
    main()
