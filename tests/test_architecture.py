"""The house's shape, held against the code: folders are layers, nothing imports upward, no module passes 600 lines.

``LAYERS`` is the map of ``docs/architecture.md``, bottom to top. A module may
import from its own layer and the ones below; an import from a higher layer
(at any depth: inside a function too, except under ``if TYPE_CHECKING:``,
which never runs) fails this test, naming the file and the import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "consortium"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

#: Bottom to top; each name is a top-level module or package of ``consortium``.
LAYERS: list[list[str]] = [
    ["errors", "crashpoints", "db", "yamlfile"],  # foundations: no consortium imports beyond this floor
    ["crypto", "wire", "runs"],  # primitives and durable files
    ["learning", "data", "privacy"],  # models and training, tables, DP mechanisms and accounting, the ledger
    ["secagg", "config"],  # secure aggregation over integer vectors; the run's configuration
    ["transcript"],  # the append-only log, Merkle proofs, heads, a site's own record
    ["governance"],  # agreement, policies, the site guard, roles, incidents
    ["protocol", "lifecycle"],  # I/O-free coordinator and site; the model registry and its rules
    ["transport"],  # envelopes to bytes and back, the in-process transport
    ["audit"],  # verify: the offline auditor, anchored in what the verifier holds
    ["run"],  # the drivers: coordinator run, simulation, recorder, round loop, recovery, halt/resume, lifecycle manager
    ["deploy", "redteam", "api"],  # HTTPS service and agents, the red team, the Python API
    ["cli", "__init__"],  # the command line and the package's face, imported by nothing
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 600


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _unit(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level unit of consortium it imports) for every import the module runs."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "consortium":  # from consortium import crashpoints
                out += [(node.lineno, alias.name) for alias in node.names]
            elif node.module.startswith("consortium."):
                out.append((node.lineno, node.module.split(".")[1]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("consortium.")]
    return out


def test_every_unit_has_a_layer():
    units = {_unit(p) if p.name != "__init__.py" or p.parent != SRC else "__init__" for p in _modules()}
    assert sorted(units - set(LEVEL)) == [], "give each new module or package a layer here and in docs/architecture.md"


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for path in _modules():
        me = "__init__" if path == SRC / "__init__.py" else _unit(path)
        for line, them in _imports(path):
            if them in LEVEL and LEVEL[them] > LEVEL[me]:
                upward.append(f"{path.relative_to(SRC.parent)}:{line} ({me}) imports consortium.{them} (a higher layer)")
    assert upward == []


def test_no_module_passes_600_lines():
    long = [f"{p.relative_to(SRC.parent)}: {n} lines" for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert long == []


def test_the_architecture_page_lists_the_same_layers():
    text = DOC.read_text()
    table = [line for line in text.splitlines() if re.match(r"^\| \d+ \|", line)]
    documented = {int(row.split("|")[1]): set(re.findall(r"`([a-z_]+)`", row.split("|")[2])) for row in table}
    assert documented == {i: set(names) for i, names in enumerate(LAYERS)}


@pytest.mark.parametrize("name", ["lower", "higher"])
def test_the_check_sees_an_import_inside_a_function(tmp_path, name):
    """The checker itself: a function-level import is an import (the CLI and the runs import lazily)."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from consortium.cli import main\n" if name == "higher" else "import os\n")
    found = _imports(path)
    assert found == ([(2, "cli")] if name == "higher" else [])


#: What the coordinator state machine hands over; a driver takes it only through its session.
HAND_OVER = {"drain_log", "drain_archives"}


def _hand_over_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in HAND_OVER]


def test_only_the_session_takes_the_coordinators_log():
    """One place hands the coordinator's log and evidence to the transcript (``consortium.run.session``):
    a driver that drained them itself would have to remember the order that keeps a crash consistent."""
    elsewhere = [f"{p.relative_to(SRC.parent)}:{line}" for p in _modules() if p != SRC / "run" / "session.py"
                 for line in _hand_over_calls(p)]
    assert elsewhere == []
    assert _hand_over_calls(SRC / "run" / "session.py"), "the session is where the log is taken"
