"""Provenance: the version and CHANGELOG.md move with the schema, migrations stay frozen, the licence is shipped."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from astra_thepayne import __version__
from astra_thepayne.db.migrate import available_migrations

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = sorted((ROOT / "migrations").glob("m[0-9][0-9][0-9][0-9]_*.py"))
#: what a frozen migration may import: the standard library and peewee (playhouse is peewee's)
ALLOWED_IMPORTS = set(sys.stdlib_module_names) | {"peewee", "playhouse"}


def _changelog_sections() -> dict[str, str]:
    """``{version: text}`` of CHANGELOG.md's ``## [version]`` sections, in file order."""
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    parts = re.split(r"^## \[([^\]]+)\][^\n]*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_changelog_has_a_dated_section_for_this_version_on_top():
    sections = _changelog_sections()
    released = [v for v in sections if v.lower() != "unreleased"]
    assert released, "CHANGELOG.md has no release section"
    assert released[0] == __version__, (
        f"the newest section of CHANGELOG.md is {released[0]}, the package is {__version__}: a release bumps "
        "astra_thepayne.__version__ and gets its own section")
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, flags=re.M)


def test_every_migration_is_in_the_changelog_of_a_release():
    """A new migration changes the schema, so it needs a new version and a CHANGELOG entry that names it."""
    sections = _changelog_sections()
    released = "".join(text for version, text in sections.items() if version.lower() != "unreleased")
    names = available_migrations()
    assert names == [path.stem for path in MIGRATIONS]  # the installed package runs the repository's migrations
    missing = [name for name in names if name not in released]
    assert not missing, (f"CHANGELOG.md names no release with {', '.join(missing)}: bump astra_thepayne.__version__ "
                         "and say in its section what the migration changes for results")


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
    tree = ast.parse("def upgrade(database, migrator):\n    from astra_thepayne.core.labels import LABEL_NAMES\n"
                     "    import importlib\n    importlib.import_module('astra_thepayne.db')\n"
                     "from . import sibling\n")
    assert sorted(_imports(tree)) == [(".", 5), ("astra_thepayne.core.labels", 2), ("astra_thepayne.db", 4),
                                      ("importlib", 3)]


def test_licence_file_is_the_one_pyproject_names():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'license = { text = "BSD-3-Clause" }' in pyproject
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, the astra_thepayne developers" in licence
    assert "Neither the name of the copyright holder nor the names of its" in licence


def test_version_option_prints_the_version_results_are_stamped_with():
    from click.testing import CliRunner

    from astra_thepayne.cli import cli

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output == f"thepayne, version {__version__}\n"
