"""What varies with the task kind lives on the task classes (docs/DESIGN.md, "Task kinds"):
no module outside ``imagefit.tasks`` compares a kind's name, and a kind defined here, in a
test module, trains, evaluates and reports without a line changed anywhere else."""

from __future__ import annotations

import ast
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

import imagefit
from imagefit.config import SourceOptions
from imagefit.tasks import KINDS, Classification

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "imagefit"
KIND_NAMES = {"classification", "multilabel", "regression"}
INPUT_NAMES = {"text"}
TASK_MODULES = ("tasks/", "data/inputs.py")

# Comparisons of the input type ("text") left outside data/inputs.py, each with its reason.
# The counts may only go down: a file over its count fails, and so does one under it (lower
# the count, so that it cannot creep back up).
INPUT_ALLOWED = {
    "config.py": 1,  # --task text's choice (config is read before torch is imported)
    "evaluation/label_issues.py": 1,  # an out-of-fold table with a text column is a text CV
    "run_records.py": 1,  # which record checks a model.json: floor 0, below data/inputs.py
}


def _names_in(node: ast.AST, names: set[str]) -> list[str]:
    """The names of ``names`` that ``node`` compares against, looks up or keys a dict by."""
    def constants(parts):
        found = []
        for part in parts:
            if isinstance(part, ast.Constant) and part.value in names:
                found.append(part.value)
            elif isinstance(part, (ast.Tuple, ast.List, ast.Set)):
                found += constants(part.elts)
        return found
    if isinstance(node, ast.Compare):
        return constants([node.left, *node.comparators])
    if isinstance(node, ast.Subscript):
        return constants([node.slice])
    if isinstance(node, ast.Dict):
        return constants([k for k in node.keys if k is not None])
    if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("get", ".pop")):
        return constants(node.args[:1])
    return []


def uses(names: set[str], forms: tuple[type, ...] = (ast.AST,)) -> dict[str, list[str]]:
    """Per module (path under the package), the code of each comparison, look-up or table
    keyed by one of ``names`` (only the nodes of ``forms``: ``ast.Compare`` for the
    comparisons alone)."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if module.startswith(TASK_MODULES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, forms) and _names_in(node, names):
                found.setdefault(module, []).append(ast.unparse(node)[:80])
    return found


def test_no_module_outside_the_tasks_compares_a_kind_name():
    """Asking ``task.single_label``, ``task.main_metric`` or ``task.label_matrix`` instead:
    a kind added by subclassing answers them all (a fold method or option value that happens
    to share a kind's name is not a kind: data/folds.py's --fold-method multilabel)."""
    assert uses(KIND_NAMES) == {
        "config.py": ["Literal['auto', 'kfold', 'stratified', 'multilabel', 'group']",
                      "Literal['classification', 'multilabel', 'regression', 'text']"],
        "data/folds.py": ["method == 'multilabel'"]}


def test_the_task_options_choices_are_the_kinds():
    """config.py is the one exception: it is read before torch is imported (the command
    line's preflight), so its --task choices cannot be taken from the kinds' classes, and
    this test keeps them the same (with ``text``, an input type)."""
    built_in = [name for name, cls in KINDS.items() if cls.__module__ == "imagefit.tasks.kinds"]
    assert list(typing.get_args(typing.get_args(SourceOptions.model_fields["task"].annotation)
                                [0])) == [*built_in, "text"]


def test_input_type_comparisons_only_shrink():
    """Comparisons and type choices only: "text" is also the name of a column (predict's,
    an out-of-fold table's), which is not an input type."""
    found = uses(INPUT_NAMES, (ast.Compare, ast.Subscript))
    found = {module: [line for line in lines if not line.endswith("['text']")]
             for module, lines in found.items()}
    counts = {module: len(lines) for module, lines in found.items() if lines}
    assert counts == INPUT_ALLOWED, (
        "a module over its count: ask the input's object instead; one under it: lower "
        f"INPUT_ALLOWED to {counts}: {found}")


def test_the_scan_sees_each_form_of_comparison(tmp_path):
    code = ("a = kind == 'regression'\nb = kind in ('classification', 'x')\n"
            "c = TABLE['multilabel']\nd = {'regression': 1}\ne = info.get('text')\n"
            "f = kind == 'resnet'\n")
    nodes = ast.walk(ast.parse(code))
    assert sorted(n for node in nodes for n in _names_in(node, KIND_NAMES | INPUT_NAMES)) == \
        ["classification", "multilabel", "regression", "regression", "text"]


class Ordinal(Classification, kind="ordinal"):
    """Ordered classes: cross-entropy plus the expected distance between the class predicted
    and the true one, so that 'low' taken for 'high' costs more than for 'mid'."""

    loss_calls = 0

    def loss(self, outputs, targets, *, weighted=False):
        Ordinal.loss_calls += 1
        base = super().loss(outputs, targets, weighted=weighted)
        if targets.ndim == 2:  # mixed targets have no single rank
            return base
        ranks = torch.arange(self.n_out, device=outputs.device, dtype=outputs.dtype)
        expected = (outputs.softmax(dim=1) * ranks).sum(dim=1)
        return base + (expected - targets.to(outputs.dtype)).abs().mean()


@pytest.fixture(scope="module", autouse=True)
def _forget_the_kind():
    """The kind defined here is this module's: the tests after it do not know it."""
    yield
    KINDS.pop("ordinal", None)


def test_a_kind_defined_in_a_test_module_trains_evaluates_and_reports(tmp_path):
    assert KINDS["ordinal"] is Ordinal
    rng = np.random.default_rng(0)
    ranks = np.arange(150) % 3
    images = (rng.integers(0, 40, (150, 16, 16)) + 90 * ranks[:, None, None]).astype(np.uint8)
    table = imagefit.from_arrays(images, ranks, names=["low", "mid", "high"], task="ordinal")
    assert isinstance(table.task, Ordinal)
    result = imagefit.fit(table, epochs=4, runs_dir=str(tmp_path), progress=False,
                          precision="fp32")
    assert Ordinal.loss_calls > 0
    assert result.metrics["valid_accuracy"] >= 0.9  # the classes' own metrics, inherited
    model = json.loads((result.run_dir / "model.json").read_text())
    assert model["task"]["kind"] == "ordinal"
    metrics = imagefit.evaluate(result.run_dir, table, progress=False)
    assert metrics["accuracy"] >= 0.9 and "loss" in metrics
    report = (result.run_dir / "report.html").read_text()
    assert "Confusion matrix" in report and "high" in report


def test_a_model_json_naming_an_unknown_input_is_one_line():
    from imagefit.data.inputs import ImageInput, TextInput, input_class
    from imagefit.errors import ImagefitError

    assert input_class({}) is ImageInput and input_class({"input": "text"}) is TextInput
    with pytest.raises(ImagefitError, match="model.json names the input 'audio', which is "
                                            "none of image, text: restore it from a copy"):
        input_class({"input": "audio"})
