"""Provenance: migrations stay frozen."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = sorted((ROOT / "migrations").glob("m[0-9][0-9][0-9][0-9]_*.py"))
#: what a frozen migration may import: the standard library and peewee (playhouse is peewee's)
ALLOWED_IMPORTS = set(sys.stdlib_module_names) | {"peewee", "playhouse"}


def _imports(tree):
    """(module, line) of every import in a module, at any depth, and of import_module / __import__ calls."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield ("." * node.level + (node.module or ""), node.lineno)
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            if name in ("import_module", "__import__") and node.args:
                argument = node.args[0]
                yield (argument.value if isinstance(argument, ast.Constant) else "<computed>", node.lineno)


@pytest.mark.parametrize("path", MIGRATIONS, ids=lambda p: p.stem)
def test_migrations_import_nothing_live(path):
    """A migration is frozen: importing the package (labels, models, database helpers) would let it change with
    the package, so it may use only the standard library and peewee."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = [f"line {line}: {module}" for module, line in _imports(tree)
           if module.startswith(".") or module.split(".")[0] not in ALLOWED_IMPORTS]
    assert not bad, f"{path.name} imports {', '.join(bad)}"


def test_the_import_check_sees_imports_anywhere():
    tree = ast.parse("def upgrade(database, migrator):\n    from astra_thepayne.labels import LABEL_NAMES\n"
                     "    import importlib\n    importlib.import_module('astra_thepayne.db')\n"
                     "from . import sibling\n")
    assert sorted(_imports(tree)) == [(".", 5), ("astra_thepayne.db", 4), ("astra_thepayne.labels", 2),
                                      ("importlib", 3)]


def test_version_option_prints_the_version_results_are_stamped_with():
    from click.testing import CliRunner

    from astra_thepayne import __version__
    from astra_thepayne.cli import cli

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output == f"thepayne, version {__version__}\n"
