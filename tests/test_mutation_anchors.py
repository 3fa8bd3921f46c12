"""The anchors of bench/mutation_check.py still hold: each mutation's function exists, its
pattern matches exactly one node there, the mutant differs from the source and parses, and
the tests it names exist. A refactor that moves an option's effect fails here, naming the
mutation to update, long before the mutation check is run again. No test is run."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_mutation_check():
    spec = importlib.util.spec_from_file_location("mutation_check",
                                                  ROOT / "bench" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


mutation_check = load_mutation_check()
MUTATIONS = mutation_check.MUTATIONS


def test_there_are_at_least_30_mutations_with_distinct_names():
    names = [m.name for m in MUTATIONS]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert set(mutation_check.GAPS) <= set(names)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_the_anchor_matches_one_node_and_the_mutant_differs(mutation):
    source = (ROOT / "src" / mutation.path).read_text()
    nodes = mutation_check.anchor(mutation, source)
    assert len(nodes) == 1, (f"{mutation.module}:{mutation.function}: {mutation.what} "
                             f"matches {len(nodes)} nodes: update the mutation")
    mutated, before, after = mutation_check.apply(mutation, source)
    assert mutated != source and before != after
    ast.parse(mutated)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_the_tests_named_exist(mutation):
    assert mutation.tests
    for test in mutation.tests:
        file, name = test.split("::")
        tree = ast.parse((ROOT / file).read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert name.split("[")[0] in defined, f"{test}, named by {mutation.name}, is gone"
