"""The package's floors (docs/DESIGN.md, "Layers"): every import of every module goes down
or across its floor, never round in a cycle and never to another module's private names;
the command line imports only the modules the design names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "imagefit"
DESIGN = ROOT / "docs" / "DESIGN.md"


def floors() -> dict[str, int]:
    """Top-level module or package name -> floor, from the table in docs/DESIGN.md."""
    text = DESIGN.read_text()
    table = text.split("<!-- layers -->")[1].split("<!-- /layers -->")[0]
    result = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].isdigit():
            continue
        for name in re.findall(r"`([\w.]+)`", cells[1]):
            result[name] = int(cells[0])
    return result


def cli_imports() -> set[str]:
    text = DESIGN.read_text().split("<!-- cli-imports -->")[1].split("<!-- /cli-imports -->")[0]
    return set(re.findall(r"`([\w.]+)`", text))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def leaves() -> dict[str, set[str]]:
    """Floor-0 module (or train.schedules) -> the package modules it may import, from the
    list in docs/DESIGN.md; a floor-0 module not listed may import none."""
    text = DESIGN.read_text().split("<!-- leaves -->")[1].split("<!-- /leaves -->")[0]
    result = {}
    for line in text.splitlines():
        if line.startswith("- "):
            names = re.findall(r"`([\w.]+)`", line)
            result[names[0]] = set(names[1:])
    return result


def imports_of(path: Path, typing_too: bool = False) -> list[tuple[str, list[str], int]]:
    """(imported module inside the package, names taken from it, line) for every import,
    relative ones resolved; imports under ``if TYPE_CHECKING`` are left out unless
    ``typing_too``."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".") if path.name == "__init__.py" else \
        module_name(path).split(".")[:-1]
    typing_only = {id(node) for guard in ast.walk(tree) if isinstance(guard, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(guard.test)
                   for node in ast.walk(guard)} if not typing_too else set()
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "imagefit":
                target = node.module.removeprefix("imagefit").lstrip(".")
            else:
                continue
            names = [alias.name for alias in node.names]
            submodules = [name for name in names
                          if (PACKAGE / target.replace(".", "/") / f"{name}.py").is_file()
                          or (PACKAGE / target.replace(".", "/") / name).is_dir()]
            if submodules:  # from . import runs: the module runs itself
                found += [(f"{target}.{name}".strip("."), [], node.lineno) for name in submodules]
                names = [name for name in names if name not in submodules]
            if names:
                found.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "imagefit":
                    found.append((alias.name.removeprefix("imagefit").lstrip("."), [],
                                  node.lineno))
    return found


def floor_of(module: str, table: dict[str, int]) -> int | None:
    """The floor of a module: its own entry, else its top-level package's."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in table:
            return table[".".join(parts[:end])]
    return None


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_has_a_floor():
    table = floors()
    missing = [module_name(p) for p in MODULES
               if module_name(p) and floor_of(module_name(p), table) is None]
    assert not missing, f"modules not in docs/DESIGN.md's layers table: {missing}"


def test_every_name_in_the_floors_table_is_a_module():
    """The table names only what exists: a module moved or removed leaves no stale row (it
    had named `explain` and `guided`, which live in workflows/ and evaluation/)."""
    stale = [name for name in floors()
             if not (PACKAGE / f"{name.replace('.', '/')}.py").is_file()
             and not (PACKAGE / name.replace(".", "/")).is_dir()]
    assert not stale, f"docs/DESIGN.md's layers table names no module of the package: {stale}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_or_across_and_take_no_private_names(path):
    table = floors()
    name = module_name(path)
    if not name:  # the package's __init__: public names loaded on first use
        return
    own = floor_of(name, table)
    problems = []
    for target, names, line in imports_of(path):
        floor = floor_of(target, table) if target else None
        if floor is not None and floor > own:
            problems.append(f"line {line}: {name} (floor {own}) imports {target} "
                            f"(floor {floor})")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and target != name:
            problems.append(f"line {line}: {name} imports private {private} from {target}")
    assert not problems, "\n".join(problems)


def import_graph(typing_too: bool = True) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (the package __init__ files left out);
    imports for type checking only count too (a cycle through them is still a cycle)."""
    graph: dict[str, set[str]] = {}
    modules = {module_name(p) for p in MODULES}
    for path in MODULES:
        if path.name == "__init__.py":
            continue
        targets = set()
        for target, _, _ in imports_of(path, typing_too):
            while target and target not in modules:  # a name inside a module
                target = target.rpartition(".")[0]
            if target and target != module_name(path) and \
                    not (PACKAGE / target.replace(".", "/")).is_dir():
                targets.add(target)
        graph[module_name(path)] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of a directed graph, each as the path round it (depth-first search)."""
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_leaves_import_only_what_the_design_lists():
    """Floor 0 may import across its own floor, so the floors alone would let any leaf take
    any other (and a cycle of two leaves, or a leaf growing into a hub, pass); the schedules
    in train/ import nothing of the package."""
    table, listed = floors(), leaves()
    found = {}
    for path in MODULES:
        name = module_name(path)
        top = name.split(".")[0]
        if not name or (floor_of(name, table) != 0 and name not in listed):
            continue
        key = name if name in listed else top
        imported = [target for target, _, _ in imports_of(path, typing_too=True) if target]
        if key == top:  # a floor-0 module or package: what it takes from the others
            targets = {t.split(".")[0] for t in imported if t.split(".")[0] != top}
        else:  # a leaf inside a package: anything at all
            targets = set(imported)
        found.setdefault(key, set()).update(targets)
    found = {name: targets for name, targets in found.items() if targets or name in listed}
    assert found == listed, (f"docs/DESIGN.md's leaves list {listed}, the modules import "
                             f"{found}")


def test_the_command_line_imports_only_the_modules_the_design_names():
    allowed = cli_imports()
    used = {target for target, _, _ in imports_of(PACKAGE / "cli.py")}
    assert used <= allowed, f"cli.py imports {sorted(used - allowed)}, which docs/DESIGN.md " \
                            "does not name: call them through api"


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The checks above can fail: an upward import, a private name and a cycle are found."""
    table = floors()
    assert floor_of("train.learner", table) < floor_of("report.html", table)
    assert floor_of("data.sources", table) == table["data"]
    fake = PACKAGE / "train" / "learner.py"
    source = "from ..report.html import write_report\nfrom ..data.sources import _visible\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source
                        if self == fake else Path.read_bytes(self).decode())
    found = imports_of(fake)
    assert ("report.html", ["write_report"], 1) in found
    assert ("data.sources", ["_visible"], 2) in found
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .fit import X\n"
    record = PACKAGE / "workflows" / "record.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: typing_only
                        if self == record else Path.read_bytes(self).decode())
    assert imports_of(record) == []
    assert imports_of(record, typing_too=True) == [("workflows.fit", ["X"], 3)]


def long_modules() -> dict[str, int]:
    """Module path (under the package) -> its ceiling in lines, from docs/DESIGN.md."""
    text = DESIGN.read_text().split("<!-- long-modules -->")[1].split("<!-- /long-modules -->")[0]
    return {name: int(lines) for name, lines in re.findall(r"^- `([\w/.]+)` (\d+):", text,
                                                            flags=re.M)}


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80
LONG_FUNCTIONS = {"cli.py": {"build_parser"}}  # the parser table: declarations only


def test_modules_over_400_lines_are_listed_with_their_reason_and_do_not_grow():
    listed = long_modules()
    sizes = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
             for path in MODULES}
    unlisted = {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES and m not in listed}
    grown = {m: (sizes.get(m), ceiling) for m, ceiling in listed.items()
             if sizes.get(m, 0) > ceiling}
    struck = [m for m in listed if sizes.get(m, 0) <= MAX_MODULE_LINES]
    assert not unlisted, f"over {MAX_MODULE_LINES} lines, not in docs/DESIGN.md: {unlisted}"
    assert not grown, f"over their ceiling in docs/DESIGN.md (lines, ceiling): {grown}"
    assert not struck, f"no longer over {MAX_MODULE_LINES} lines: strike them from the list: " \
                       f"{struck}"


def test_no_function_over_80_lines_but_the_parser_table():
    long = []
    for path in MODULES:
        module = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and \
                    node.name not in LONG_FUNCTIONS.get(module, ()):
                long.append(f"{module}: {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"

