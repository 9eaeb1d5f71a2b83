"""The layered core: the import contract, no import cycle, small modules, no self-lookup."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grimp

PACKAGE = Path(__file__).parents[1] / "memaudit"


def test_the_import_layer_contract_holds() -> None:
    """``lint-imports`` (the layers in pyproject.toml) passes: no module imports upwards."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint)], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_no_import_cycle_counting_imports_inside_functions() -> None:
    graph = grimp.build_graph("memaudit", include_external_packages=False)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.find_modules_directly_imported_by(module):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph.modules):
        if module not in state:
            visit(module, [module])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_modules_are_small_and_never_look_memaudit_up_by_name() -> None:
    for file in PACKAGE.rglob("*.py"):
        text = file.read_text()
        assert len(text.splitlines()) <= 500, f"{file} has {len(text.splitlines())} lines"
        assert not re.search(r"import_module\(\s*[\"']memaudit", text), file
