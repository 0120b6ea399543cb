"""Benchmarks of crossent against its peers, measured in one run on one machine.

The cases (one home for the benchmark shapes) and the peers live here so that both the script
``benchmarks/kernel.py`` and ``crossent bench`` run the same thing. Nothing here is imported by
``import crossent``; torch and JAX are imported only when their peers run.
"""

from .suite import (
    CASES,
    QUICK_CASES,
    best_in_turns,
    best_of,
    format_table,
    machine_metadata,
    plot_sweep,
    ratio_rows,
    run_suite,
    write_report,
)

__all__ = [
    "CASES",
    "QUICK_CASES",
    "best_in_turns",
    "best_of",
    "format_table",
    "machine_metadata",
    "plot_sweep",
    "ratio_rows",
    "run_suite",
    "write_report",
]
