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


def _linear_result(naive: dict) -> dict:
    crossent = {"variant": "crossent", "seconds_first": 30.0, "seconds_best": 24.0, "seconds_median": 25.0,
                "seconds": 24.0, "extra_peak_mib": 359.0, "overhead_mib": 95.0,
                "kept_between_steps_mib": 359.0}  # fmt: skip
    rows = [{"case": "bf16 case", **naive}, {"case": "bf16 case", **crossent}]
    return {"machine": RESULT["machine"], "linear": rows}


def test_linear_tables_against_a_stopped_naive_loss_give_bounds():
    # A variant stopped at the time limit in its first step took longer and more memory than it had
    # then: the ratios against it are upper bounds (crossent's first step, 30 s, against > 300 s; 95 MiB
    # against >= 1900 MiB).
    from crossent.bench.linear import format_linear_table

    stopped = {"variant": "naive", "stopped_after_s": 300.0, "seconds_first": None, "seconds": None,
               "extra_peak_so_far_mib": 2000.0, "overhead_so_far_mib": 1900.0}  # fmt: skip
    result = _linear_result(stopped)
    table = report.render_linear("linear-run.json", result)
    assert "| stopped after 300 s | – | ≥ 2000 MiB (so far) | ≥ 1900 MiB (so far) |" in table
    assert "30.00 s (< 0.10× naive's) | 24.00 s |" in table and "95 MiB (≤ 5.0% of naive's)" in table
    summary = report.render_linear_summary("linear-run.json", result)
    assert "bf16 case: first step under 0.10× naive's (stopped after 300 s), at most 5.0% of its overhead" in summary
    text = format_linear_table(result["linear"])
    assert "stopped after 300 s in its first step; extra peak so far 2000 MiB" in text
    assert "<0.100 (1st)" in text and "<0.050" in text


def test_linear_tables_against_a_finished_naive_loss_give_ratios():
    finished = {"variant": "naive", "seconds_first": 40.0, "seconds_best": 30.0, "seconds_median": 31.0,
                "seconds": 30.0, "extra_peak_mib": 2000.0, "overhead_mib": 1900.0,
                "kept_between_steps_mib": 0.0}  # fmt: skip
    result = _linear_result(finished)
    assert "24.00 s (0.80× naive)" in report.render_linear("linear-run.json", result)
    assert "bf16 case: 0.80× its time, 5.0% of its overhead" in report.render_linear_summary("linear-run.json", result)


def test_upper_bounds_are_rounded_up():
    # 27.163 s against a 150 s limit is 0.1811: printed to two decimals, a bound must read 0.19.
    from crossent.bench.linear import bound_up

    assert bound_up(27.163 / 150, 2) == "0.19" and bound_up(79.83, 1) == "79.9" and bound_up(0.5, 2) == "0.50"
    stopped = {"variant": "naive", "stopped_after_s": 150.0, "seconds_first": None, "seconds": None,
               "extra_peak_so_far_mib": 0.0, "overhead_so_far_mib": 0.0}  # fmt: skip
    summary = report.render_linear_summary("linear-run.json", _linear_result(stopped))
    assert "first step under 0.20× naive's (stopped after 150 s)" in summary and "%" not in summary


def test_rounds_keep_the_best_time_and_the_largest_memory():
    from crossent.bench.linear import _combine_rounds

    rounds = [
        {"seconds": 2.0, "seconds_first": 2.5, "extra_peak_mib": 100.0, "first_step_extra_peak_mib": 90.0,
         "overhead_mib": 40.0, "kept_between_steps_mib": 10.0, "crossent_cache_mib": 5.0},
        {"seconds": 1.5, "seconds_first": 2.8, "extra_peak_mib": 90.0, "first_step_extra_peak_mib": 95.0,
         "overhead_mib": 30.0, "kept_between_steps_mib": 12.0, "crossent_cache_mib": 5.0},
    ]  # fmt: skip
    row = _combine_rounds(rounds)
    assert row["seconds"] == 1.5 and row["seconds_first"] == 2.5 and row["seconds_rounds"] == [2.0, 1.5]
    assert row["extra_peak_mib"] == 100.0 and row["overhead_mib"] == 40.0 and row["kept_between_steps_mib"] == 12.0
    assert row["rounds"] == 2
