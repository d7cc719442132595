"""Sphinx configuration: the Markdown pages of docs/ and README.md (MyST), and the API reference, rendered by
autodoc from the numpydoc docstrings (napoleon).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``pip install -e ".[docs]"``);
tests/integration/test_docs_build.py runs the same build in the test suite.
"""
import os

# The pages describe the plugin as it is without Astra: `astra_thepayne.ThePayne` and `the_payne` must not bind
# to an Astra installation that happens to be in the environment that builds the docs.
os.environ.setdefault("THEPAYNE_NO_ASTRA", "1")

import astra_thepayne  # noqa: E402  (the package as installed, e.g. pip install -e ".[docs]")

project = "astra_thepayne"
author = "The astra_thepayne developers"
copyright = "the astra_thepayne developers"
release = version = astra_thepayne.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
templates_path = []

# -- Markdown (MyST) ----------------------------------------------------------------------------------------------
# `[text](other.md#4-fit)` and `[text](#measured-performance)`: the anchors GitHub makes for headings
myst_heading_anchors = 3

# -- API reference ------------------------------------------------------------------------------------------------
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"  # signatures stay short; types go with the parameters they belong to
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"astra_thepayne {release}"
html_static_path = []
