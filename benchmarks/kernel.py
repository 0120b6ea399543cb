"""Benchmark the fused kernel against torch, JAX, the notebooks' NumPy formula and the memory floor.

    python benchmarks/kernel.py            # the full suite (several minutes on 2 cores)
    python benchmarks/kernel.py --quick    # under a minute

Prints a table of times and ratios and writes JSON (results and machine metadata) to
benchmarks/results/kernel-<time>.json, or to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from crossent.bench import CASES, QUICK_CASES, format_table, plot_sweep, ratio_rows, run_suite, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller cases, under a minute")
    parser.add_argument("--out", type=pathlib.Path, help="JSON file to write")
    parser.add_argument("--plot", type=pathlib.Path, help="PNG of time against vocabulary size")
    args = parser.parse_args(argv)

    def progress(label: str, done: int, total: int) -> None:
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)

    results = run_suite(QUICK_CASES if args.quick else CASES, progress=progress)
    rows = ratio_rows(results)
    print(format_table(rows))
    payload = {"results": [dataclasses.asdict(r) for r in results], "ratios": rows}
    write_report(payload, args.out, "kernel", pathlib.Path(__file__).parent / "results")
    if args.plot:
        plot_sweep(results, str(args.plot))
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
