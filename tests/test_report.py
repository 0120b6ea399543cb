"""benchmarks/report.py: the tables it writes agree with the ratios the benchmark suite computed at run
time, and the machine line is the result's own."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
assert _spec is not None and _spec.loader is not None
report = importlib.util.module_from_spec(_spec)
sys.modules["report"] = report  # dataclasses look their module up there
_spec.loader.exec_module(report)

RESULT = json.loads((ROOT / "benchmarks" / "results" / "reference-run.json").read_text())


def test_kernel_table_ratios_match_the_suites_own():
    table = report.render_kernel("reference-run.json", RESULT)
    compared = 0
    for row in RESULT["ratios"]:
        if f"| {row['case']}, {row['mode']} |" not in table or row.get("torch_ratio") is None:
            continue
        line = next(t for t in table.splitlines() if t.startswith(f"| {row['case']}, {row['mode']} |"))
        shown = [float(x) for x in re.findall(r"\(([\d.]+)×\)", line)]
        assert abs(shown[0] - row["torch_ratio"]) <= 0.05 * row["torch_ratio"], (line, row["torch_ratio"])
        compared += 1
    assert compared >= 5


def test_machine_line_names_the_results_own_machine():
    meta = {
        **RESULT["machine"],
        "cpu": "Some Other CPU",
        "crossent_config": {"native": True, "isa": "avx512", "threads": 96},
    }
    line = report.describe_machine(meta)
    assert "Some Other CPU" in line and "avx512" in line and "96 threads" in line
    assert "AMD EPYC" not in line


def test_a_missing_result_says_how_to_produce_it():
    section = report.Section("x", "README.md", "no-such-run.json", report.render_kernel, "python make-it.py")
    assert report.block(section) == "No result yet: `python make-it.py` writes `benchmarks/results/no-such-run.json`."
