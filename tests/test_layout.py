"""The package's layout as CONTRIBUTING.md describes it: every module in the module map, imports one way, no cycle.

Imports are read statically (every ``import`` statement, including those inside functions), so an import made lazily
to dodge a cycle counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "peft_prefix_plus"

#: The floor of each part of the package: a module may import modules of its own folder and of lower floors only.
FLOORS = {
    "errors": 0,
    "tuner": 1,
    "files": 2,
    "hub": 3,
    "training": 3,
    "integration": 4,
    "cli": 5,
    "deferred_registration": 6,
    "__init__": 7,
}


def package_modules() -> dict[str, Path]:
    """Dotted name below the package (``tuner.model``, ``__init__``) -> file."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(parts)] = path
    return modules


def part(module: str) -> str:
    """The part of the package (a key of FLOORS) that ``module`` belongs to."""
    return module.split(".")[0]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source (a package import means its ``__init__``)."""
    package = module.rsplit(".", 1)[0] if "." in module else ""
    if path.name == "__init__.py":
        package = module.removesuffix("__init__").rstrip(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.startswith("peft_prefix_plus"):
                target = node.module.removeprefix("peft_prefix_plus").lstrip(".")
            else:
                continue
            names = [f"{target}.{alias.name}".lstrip(".") for alias in node.names] + [target]
        elif isinstance(node, ast.Import):
            names = [
                a.name.removeprefix("peft_prefix_plus").lstrip(".")
                for a in node.names
                if a.name.startswith("peft_prefix_plus")
            ]
        for name in names:
            if name in modules:
                found.add(name)
            elif f"{name}.__init__" in modules or name == "":
                found.add(f"{name}.__init__".lstrip("."))
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def test_every_module_belongs_to_a_part_with_a_floor():
    assert {part(module) for module in package_modules()} <= set(FLOORS)


def test_imports_run_one_way():
    graph = import_graph()
    upward = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if part(target) != part(module) and FLOORS[part(target)] >= FLOORS[part(module)]
    ]
    assert not upward, "imports against the layering of CONTRIBUTING.md:\n" + "\n".join(upward)
    assert not graph["errors"], "errors.py must import nothing of the package"
    importers = sorted(module for module, targets in graph.items() if "integration" in targets)
    assert importers == ["deferred_registration"]


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layout_check_sees_a_lazy_upward_import(tmp_path, monkeypatch):
    """The scan would catch what the layering forbids: a function-level import of the file tools in the tuner."""
    source = "def f():\n    from ..files.read import read_config_dict\n"
    path = tmp_path / "model.py"
    path.write_text(source)
    assert imports_of("tuner.model", path, package_modules()) == {"files.read"}


def module_map() -> set[str]:
    """The modules CONTRIBUTING.md's module map lists, as paths relative to the package."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    section = text[text.index("## Module map") : text.index("How data flows:")]
    listed = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            first_cell = row.split("|")[1]
            listed |= set(re.findall(r"`([\w/]+\.py)`", first_cell))
    return listed


def test_contributing_module_map_matches_the_tree():
    on_disk = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")}
    listed = module_map()
    assert not listed - on_disk, f"listed in CONTRIBUTING.md but missing: {sorted(listed - on_disk)}"
    assert not on_disk - listed, f"modules missing from CONTRIBUTING.md's module map: {sorted(on_disk - listed)}"


@pytest.mark.parametrize("name", ["PrefixPlusLayer", "PrefixSiteEncoder", "read_prefix_plus_adapter", "KEY_PREFIX"])
def test_internals_are_not_exported_but_stay_importable(name):
    import peft_prefix_plus
    from peft_prefix_plus import files, tuner

    assert name not in peft_prefix_plus.__all__
    assert hasattr(tuner, name) or hasattr(files, name) or hasattr(tuner.layer, name)


def test_every_public_name_resolves():
    import peft_prefix_plus

    for name in peft_prefix_plus.__all__:
        assert getattr(peft_prefix_plus, name) is not None, name
