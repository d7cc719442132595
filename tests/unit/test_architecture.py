"""The package's layers, read from its source: the science core imports no database, reader, pipeline or command
line code (nor peewee, click, astropy's FITS, matplotlib), no module imports a layer above its own, and the import
graph, counting the imports inside functions, has no cycle."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "astra_thepayne"

#: layer of each top-level module or subpackage: a module may import its own subpackage and the layers below
LAYERS = {"errors": 0, "files": 0, "config": 0, "threads": 0, "spawning": 0, "_moved": 0, "core": 1, "io": 2,
          "training": 2, "accel": 2, "db": 3, "pipeline": 4, "cli": 5, "__main__": 6}
#: what the core may import besides itself and the shared base modules (the standard library aside); astropy only
#: for its physical constants
CORE_THIRD_PARTY = {"numpy", "scipy", "astropy.constants"}
THIRD_PARTY = {"numpy", "scipy", "peewee", "playhouse", "click", "astropy", "matplotlib", "tqdm", "psycopg2", "torch",
               "fitsio", "astra", "tomli", "tomllib"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """``(imported module, is third party, line)`` for every import in the file, at any depth."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or target == "astra_thepayne":
                # `from . import x`: x may be a module of that package or a name in its __init__
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                        PACKAGE.parent / Path(*candidate.split("."))).is_dir()
                    yield (candidate if is_module else target), node.lineno
            else:
                yield target, node.lineno


def _graph():
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[_module_name(path)] = [(target, line) for target, line in _imports(path)]
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_core_imports_only_numpy_scipy_and_itself():
    offences = []
    for module, imports in _graph().items():
        if _top(module) != "core":
            continue
        for target, line in imports:
            root = target.split(".")[0]
            if root == "astra_thepayne":
                if _top(target) not in ("core", "errors", "files", "threads", "spawning"):
                    offences.append(f"{module}:{line} imports {target}")
            elif root in THIRD_PARTY and root not in CORE_THIRD_PARTY and target not in CORE_THIRD_PARTY:
                offences.append(f"{module}:{line} imports {target}")
    assert not offences, "\n".join(offences)


def test_no_module_imports_a_layer_above_its_own():
    offences = []
    for module, imports in _graph().items():
        layer = LAYERS.get(_top(module))
        if layer is None:  # the package itself: a facade whose lazy re-exports reach every layer
            assert module == "astra_thepayne", f"{module} has no layer in LAYERS"
            continue
        for target, line in imports:
            if not target.startswith("astra_thepayne.") or _top(target) == _top(module):
                continue
            target_layer = LAYERS[_top(target)]
            if target_layer > layer or (target_layer == layer and layer != 0):  # the base modules share layer 0
                offences.append(f"{module}:{line} (layer {layer}) imports {target} (layer {target_layer})")
    assert not offences, "\n".join(offences)


def test_the_import_graph_has_no_cycle():
    graph = {module: {t for t, _ in imports if t.startswith("astra_thepayne.") and t != module}
             for module, imports in _graph().items()}
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_importing_the_core_loads_no_database_reader_or_plotting_library():
    modules = [_module_name(p) for p in sorted((PACKAGE / "core").glob("*.py"))]
    code = ("import sys; " + "; ".join(f"import {m}" for m in modules)
            + "; loaded = sorted(set(sys.modules) & {'peewee', 'click', 'astropy.io.fits', 'matplotlib', 'tqdm', "
              "'psycopg2', 'astra_thepayne.io', 'astra_thepayne.db', 'astra_thepayne.pipeline'}); "
              "print(','.join(loaded))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_what_thepayne_fit_imports_loads_no_database_or_plotting_library():
    # `thepayne fit` works without a database: its start-up should not pay for peewee and the models
    code = ("import sys; import astra_thepayne.cli, astra_thepayne.cli.fit, astra_thepayne.io, "
            "astra_thepayne.pipeline.fitter; loaded = sorted(set(sys.modules) & {'peewee', 'psycopg2', 'matplotlib', "
            "'astra_thepayne.db'}); print(','.join(loaded))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_a_module_at_its_earlier_place_is_the_same_module():
    import importlib

    import astra_thepayne.core.fitting
    from astra_thepayne._moved import MOVED

    assert importlib.import_module("astra_thepayne.fitting") is astra_thepayne.core.fitting
    assert sys.modules["astra_thepayne.fitting"] is astra_thepayne.core.fitting
    assert astra_thepayne.core.fitting.__spec__.name == "astra_thepayne.core.fitting"
    for old, new in MOVED.items():
        assert not (PACKAGE / f"{old}.py").exists(), f"{old}.py is back beside its alias to {new}"
        assert (PACKAGE / Path(*new.split("."))).with_suffix(".py").exists()


def test_every_subpackage_is_installed_by_a_non_editable_install():
    """pyproject lists the packages a wheel holds; a subpackage missing there imports in a checkout (and in CI's
    editable install) but not after ``pip install .`` (astra_thepayne.accel was missing once)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(init) for init in PACKAGE.rglob("__init__.py")}
    assert found - listed == set()
