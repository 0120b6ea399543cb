"""Sphinx configuration of crossent's documentation site.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (warnings are errors).
The API pages are generated from ``API_MODULES`` at build time: documenting a new public module is one
line in that list.
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

project = "crossent"
author = "crossent developers"
copyright = "crossent developers"

# The public modules, each documented on a page of its own from its docstrings (autodoc + napoleon).
API_MODULES = [
    "crossent",
    "crossent.torch",
    "crossent.torch.distributed",
    "crossent.jax",
]

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
    "crossent_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "api/_generated_*"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True}
autodoc_inherit_docstrings = False  # nn.Module's own methods (extra_repr, ...) are not crossent's API

html_theme = "alabaster"
html_title = "crossent"
html_static_path: list[str] = []
