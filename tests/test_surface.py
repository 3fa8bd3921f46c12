"""The public surface is one list (imagefit/surface.py): the package, imagefit.api and the
command line derive theirs from it, and every name resolves where it is listed."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys

import pytest

import imagefit
import imagefit.api as api
from imagefit import cli, surface


def test_the_package_and_the_api_list_the_same_functions():
    assert api.__all__ == list(surface.API)
    assert set(surface.API) | set(surface.ELSEWHERE) <= set(imagefit.__all__)
    assert sorted(dir(imagefit)) == sorted(imagefit.__all__)
    extra = set(imagefit.__all__) - set(surface.API) - set(surface.ELSEWHERE)
    assert extra == {"FitInterrupted", "ImagefitError", "ImagefitWarning", "__version__"}


@pytest.mark.parametrize("name", surface.API)
def test_every_api_name_resolves_on_the_package_to_the_api_s_own(name):
    assert getattr(imagefit, name) is getattr(api, name)
    assert callable(getattr(api, name))
    assert importlib.util.find_spec(f"imagefit.{name}") is None, (
        f"imagefit.{name} is a module of the package, which imagefit.{name} would give once "
        "imported: name the function otherwise")


@pytest.mark.parametrize("name, module", surface.ELSEWHERE.items())
def test_every_other_public_name_resolves_from_its_module(name, module):
    assert getattr(imagefit, name) is getattr(importlib.import_module(f"imagefit.{module}"),
                                              name)


def test_the_functions_the_issue_found_missing_resolve_at_the_top():
    for name in ("tune", "serve", "export", "summary", "check", "label_issues", "list_models"):
        assert inspect.isfunction(getattr(imagefit, name)), name


def test_each_command_of_the_command_line_is_listed_with_public_functions():
    parser = cli.build_parser()
    (commands,) = [action for action in parser._actions
                   if action.dest == "command"]  # the subparsers
    assert set(commands.choices) == set(surface.COMMANDS) == set(cli.COMMANDS)
    for command, functions in surface.COMMANDS.items():
        assert functions and set(functions) <= set(surface.API), command


def test_import_star_gives_every_public_name_without_loading_torch_first():
    code = ("import sys, imagefit; assert 'torch' not in sys.modules; "
            "from imagefit import *; print(len(dir()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_listings_answer_through_the_api(tmp_path):
    assert api.list_runs(tmp_path).empty
    assert api.list_caches(tmp_path / "none") == []
    assert api.clear_caches(tmp_path / "none") == []
    assert "small_cnn" in [row["model"] for row in api.list_models("small_cnn", costs=False)]
