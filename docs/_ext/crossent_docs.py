"""Sphinx helpers of crossent's documentation site.

- The API pages: one page per module of ``API_MODULES`` (conf.py), written into ``api/generated/`` when
  the build starts, so that documenting a new module is one line in conf.py. A module's page lists the
  names in its ``__all__`` or, without one, the public functions and classes it defines.
- ``crossent-output``: a directive that runs ``python -m crossent <arguments>`` at build time and shows
  what it printed, so that a page quoting the command line shows its real, current output.
"""

from __future__ import annotations

import importlib
import pathlib
import shlex
import subprocess
import sys
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective


def write_api_pages(app: Sphinx) -> None:
    target = pathlib.Path(app.srcdir) / "api" / "generated"
    target.mkdir(parents=True, exist_ok=True)
    wanted = {f"{name}.rst" for name in app.config.API_MODULES}
    for stale in target.glob("*.rst"):
        if stale.name not in wanted:
            stale.unlink()
    for name in app.config.API_MODULES:
        text = f"``{name}``\n{'=' * (len(name) + 4)}\n\n.. automodule:: {name}\n"
        # A module with __all__ re-exports its public names from private modules: document those. One
        # without documents what it defines itself, not what it imports.
        if hasattr(importlib.import_module(name), "__all__"):
            text += "   :imported-members:\n"
        page = target / f"{name}.rst"
        if not page.exists() or page.read_text() != text:  # unchanged pages keep Sphinx's cache valid
            page.write_text(text)


class CrossentOutput(SphinxDirective):
    """``.. crossent-output:: explain --plain``: the command's standard output as a literal block."""

    required_arguments = 1
    final_argument_whitespace = True

    def run(self) -> list[Any]:
        argv = [sys.executable, "-m", "crossent", *shlex.split(self.arguments[0])]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise self.error(f"{shlex.join(argv[1:])} exited with {done.returncode}:\n{done.stderr}")
        block = nodes.literal_block(done.stdout, done.stdout)
        block["language"] = "text"
        return [block]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("API_MODULES", [], "env")
    app.connect("builder-inited", write_api_pages)
    app.add_directive("crossent-output", CrossentOutput)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
