"""Benchmark the fused linear + cross-entropy and the drop-in loss under torch.compile.

The fused loss against the naive loss and torch's chunked one; the drop-in loss compiled against eager torch.

    python benchmarks/linear.py            # N=2048 D=512 V=32768 f32, N=1024 D=256 V=262144 f32,
                                           # N=4096 D=1024 V=131072 bf16
    python benchmarks/linear.py --quick

Each variant runs in a process of its own (crossent.bench.linear): its first step, then steady-state
steps after it (best and median), and its memory: the raw extra peak and the overhead beyond the
gradients every variant must return (input and weight gradients in the parameters' dtype), which
counts what is kept between steps (crossent's buffer cache: `crossent_cache_mib`). A case's variants
run in turns, --rounds times (each while its rounds took less than the time limit), and each keeps its
best round: a slow spell of a shared machine then falls on all of them, not on one. A variant whose
first step is still running after --time-limit seconds is stopped and reported with its peak memory so
far: on a CPU without bfloat16 matrix instructions the naive bfloat16 loss takes over an hour a step
(--gemm-rates measures why).

Prints tables and writes JSON with machine metadata to benchmarks/results/linear-<time>.json (or --out).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from crossent.bench import best_in_turns, write_report
from crossent.bench.linear import (
    DEFAULT_TIME_LIMIT_S,
    LINEAR_CASES,
    QUICK_LINEAR_CASES,
    VARIANTS,
    LinearCase,
    format_linear_table,
    plot_linear,
    run_linear_suite,
)


def compile_vs_eager(n: int, v: int, repeats: int) -> dict:
    """crossent.torch.cross_entropy under torch.compile against eager F.cross_entropy, forward+backward."""
    import torch
    import torch.nn.functional as F

    import crossent.torch as ct

    x = torch.randn(n, v).requires_grad_(True)
    y = torch.randint(0, v, (n,))
    compiled = torch.compile(lambda a, b: ct.cross_entropy(a, b), fullgraph=True)

    def step(fn) -> None:
        x.grad = None
        fn(x, y).backward()

    best = best_in_turns({"eager": lambda: step(F.cross_entropy), "compiled": lambda: step(compiled)}, repeats)
    eager_torch, crossent_compiled = best["eager"], best["compiled"]
    return {"shape": [n, v], "eager_torch_s": eager_torch, "crossent_compiled_s": crossent_compiled,
            "speedup": eager_torch / crossent_compiled}  # fmt: skip


def gemm_rates(case: LinearCase, rows: int) -> dict:
    """torch's three matmuls of one forward+backward of the linear loss (logits, input gradient, weight
    gradient) on ``rows`` of the case's rows, in the case's dtype and in float32: GFLOP/s of each. Where
    a half-precision rate is a small fraction of float32's, the naive and torch-chunked variants of that
    case cannot finish in a benchmark's time on this machine."""
    import time

    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, case.d, generator=g)
    W = torch.randn(case.v, case.d, generator=g)
    G = torch.randn(rows, case.v, generator=g)
    flop = 2 * rows * case.d * case.v
    rates: dict = {"rows": rows, "dtype": case.dtype}
    for dtype_name in (case.dtype, "float32"):
        dtype = getattr(torch, dtype_name)
        xd, Wd, Gd = x.to(dtype), W.to(dtype), G.to(dtype)
        for name, left, right in (("logits x @ W.T", xd, Wd.T), ("dlogits @ W", Gd, Wd), ("dlogits.T @ x", Gd.T, xd)):
            if dtype == torch.float32:
                torch.matmul(left, right)  # warm-up (one call of a half-precision one takes seconds here)
            start = time.perf_counter()
            torch.matmul(left, right)
            rates[f"{dtype_name} {name} GFLOP/s"] = flop / (time.perf_counter() - start) / 1e9
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--plot", type=pathlib.Path, help="PNG of time and memory overhead per variant")
    parser.add_argument("--only", help="run only the cases whose name contains this text (e.g. f32)")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument(
        "--gemm-rates",
        type=int,
        metavar="ROWS",
        help="also time torch's matmuls of the half-precision cases on this many rows",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULT_TIME_LIMIT_S,
        metavar="SECONDS",
        help="stop a variant still running after this long and report its peak so far (0: no limit; "
        f"default {DEFAULT_TIME_LIMIT_S:.0f})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="run a case's variants in turns this many times, each variant while its rounds took less than "
        "the time limit; its best round counts (default 3)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    args = parser.parse_args(argv)

    def progress(label: str, done: int, total: int) -> None:
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)

    cases = all_cases = QUICK_LINEAR_CASES if args.quick else LINEAR_CASES
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    variants = VARIANTS
    if args.variants:
        variants = tuple(v.strip() for v in args.variants.split(","))
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            parser.error(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not args.time_limit >= 0:  # NaN fails too
        parser.error(f"--time-limit must be 0 (no limit) or a positive number of seconds, got {args.time_limit}")
    if not cases:
        parser.error(f"--only {args.only!r} matches no case; the cases are {[c.name for c in all_cases]}")
    rows = run_linear_suite(
        cases, progress=progress, variants=variants, time_limit=args.time_limit or None, rounds=args.rounds
    )
    print(format_linear_table(rows))
    report: dict = {"linear": rows}
    if args.gemm_rates:
        report["gemm_rates"] = [gemm_rates(c, args.gemm_rates) for c in cases if c.dtype != "float32"]
        for rates in report["gemm_rates"]:
            print(", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in rates.items()))
    if not args.no_compile:
        compiled = compile_vs_eager(1024, 8192, 2) if args.quick else compile_vs_eager(4096, 32768, 3)
        print(
            f"drop-in under torch.compile, {compiled['shape'][0]}x{compiled['shape'][1]} f32 forward+backward: "
            f"eager torch {compiled['eager_torch_s'] * 1e3:.1f} ms, crossent compiled "
            f"{compiled['crossent_compiled_s'] * 1e3:.1f} ms ({compiled['speedup']:.2f}x)"
        )
        report["compile"] = compiled
    write_report(report, args.out, "linear", pathlib.Path(__file__).parent / "results")
    if args.plot:
        plot_linear(rows, str(args.plot))
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
