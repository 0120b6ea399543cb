"""The README's and the docs' Python examples run as tests, and the README's benchmark tables are what
their stored results give.

Every ```python block of README.md and docs/**/*.md runs, in order, in one namespace per file (a page's
later examples build on its earlier ones); a block whose first line starts with ``>>>`` is checked as a
doctest instead. A block is skipped, and reported as skipped, when it imports a module that is not
installed, when it needs a CUDA device and there is none, or when the line before it is an HTML comment
``<!-- example: not run (why) -->``.
"""

from __future__ import annotations

import doctest
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)]

_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)
_NOT_RUN = re.compile(r"<!--\s*example:\s*not run\s*(?P<why>.*?)\s*-->")
_IMPORT = re.compile(r"^\s*(?:import|from)\s+([\w.]+)", re.M)


def _examples() -> list[tuple[pathlib.Path, int, str, str]]:
    """(page, line of the block's first code line, code, the line before the block) per Python block."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code")) + 1
            found.append((page, line, match.group("code"), match.group("before")))
    return found


EXAMPLES = _examples()
_namespaces: dict[pathlib.Path, dict[str, object]] = {}


def _missing_module(code: str) -> str | None:
    for name in _IMPORT.findall(code):
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ModuleNotFoundError:  # a parent package is missing
            return name
    return None


def _needs_cuda(code: str) -> bool:
    if "cuda" not in code:
        return False
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


@pytest.mark.parametrize(
    ("page", "line", "code", "before"),
    EXAMPLES,
    ids=[f"{page.relative_to(ROOT)}:{line}" for page, line, _, _ in EXAMPLES],
)
def test_example(page, line, code, before):
    not_run = _NOT_RUN.search(before)
    if not_run:
        pytest.skip(f"marked not run {not_run.group('why')}")
    missing = _missing_module(code)
    if missing:
        pytest.skip(f"needs {missing}, which is not installed")
    if _needs_cuda(code):
        pytest.skip("needs a CUDA device")
    namespace = _namespaces.setdefault(page, {"__name__": f"example:{page.name}"})
    if code.lstrip().startswith(">>>"):
        test = doctest.DocTestParser().get_doctest(code, namespace, f"{page.name}:{line}", str(page), line)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test)
        assert runner.failures == 0, f"{page.name}:{line}: doctest failed"
    else:
        exec(compile(code, f"{page}:{line}", "exec"), namespace)


def test_every_page_with_examples_found():
    # The pattern above must keep finding the README's examples (a silent zero would pass everything).
    assert sum(1 for page, *_ in EXAMPLES if page.name == "README.md") >= 4


def test_readme_benchmark_tables_come_from_their_results():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
