"""Benchmark the fused kernel against torch, JAX, the notebooks' NumPy formula and the memory floor.

    python benchmarks/kernel.py            # the full suite (several minutes on 2 cores)
    python benchmarks/kernel.py --quick    # under a minute

Prints a table of times and ratios and writes JSON (results and machine metadata) to
benchmarks/results/kernel-<time>.json, or to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

from crossent.bench import CASES, QUICK_CASES, machine_metadata, ratio_rows, run_suite


def format_table(rows: list[dict]) -> str:
    peers = ["torch", "jax", "numpy", "floor"]
    header = f"{'case':<34} {'mode':<17} {'crossent':>10}" + "".join(f" {p:>16}" for p in peers)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for peer in peers:
            seconds, ratio = row.get(f"{peer}_s"), row.get(f"{peer}_ratio")
            if seconds is None:
                cells.append(f" {'-':>16}")
            else:
                mark = "x floor" if peer == "floor" else "x"
                cells.append(
                    f" {seconds * 1e3:>7.2f}ms {ratio:>5.2f}{mark[0]}" if ratio else f" {seconds * 1e3:>9.2f}ms"
                )
        ours = row["crossent_s"]
        lines.append(f"{row['case']:<34} {row['mode']:<17} {ours * 1e3:>8.3f}ms" + "".join(cells))
    lines.append("ratios: peer time / crossent time (>1: crossent faster); floor: crossent time / floor time")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller cases, under a minute")
    parser.add_argument("--out", type=pathlib.Path, help="JSON file to write")
    args = parser.parse_args(argv)

    def progress(label: str, done: int, total: int) -> None:
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)

    results = run_suite(QUICK_CASES if args.quick else CASES, progress=progress)
    rows = ratio_rows(results)
    print(format_table(rows))
    out = args.out or pathlib.Path(__file__).parent / "results" / f"kernel-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_metadata(), "results": [dataclasses.asdict(r) for r in results], "ratios": rows}
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
