"""The ``crossent`` command line: ``explain``, ``bench`` and ``info``, each a ``cmd_<name>``.

Bad input (a malformed file, shapes that do not match, an out-of-range class, an unknown option) is
one line on standard error that says what is wrong, and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import io
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the usage and then the error; one line is what a script can read.
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------------
# Reading the user's arrays: a file (.npy, .json, .csv) or inline JSON.


def load_array(text: str, what: str) -> np.ndarray:
    """An array from inline JSON (``[[1, 2], [3, 4]]``) or from a .npy, .json or .csv file."""
    stripped = text.strip()
    if stripped.startswith(("[", "-")) or stripped[:1].isdigit():
        try:
            return np.asarray(json.loads(stripped))
        except (json.JSONDecodeError, ValueError) as err:
            raise UsageError(f"{what}: {text!r} is not valid JSON ({err})") from err
    path = pathlib.Path(text)
    if not path.is_file():
        raise UsageError(f"{what}: no such file {text!r} (expected a .npy, .json or .csv file, or inline JSON)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".json":
            return np.asarray(json.loads(path.read_text()))
        if suffix == ".csv":
            rows = [r for r in csv.reader(io.StringIO(path.read_text())) if r and any(c.strip() for c in r)]
            values = [[float(c) for c in r] for r in rows]
            array = np.asarray(values)
            return array[:, 0] if array.ndim == 2 and array.shape[1] == 1 else array
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise UsageError(f"{what}: cannot read {text!r}: {err}") from err
    raise UsageError(f"{what}: {text!r} has an unknown format {suffix!r} (expected .npy, .json or .csv)")


def _as_float_logits(array: np.ndarray) -> np.ndarray:
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number)):
        raise UsageError(f"--logits: expected numbers, got an array of {array.dtype}")
    if array.ndim == 0:
        raise UsageError("--logits: expected at least one dimension (the classes), got a single number")
    return array.astype(np.float64)


def _as_target(array: np.ndarray, probabilities: bool) -> np.ndarray:
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise UsageError(f"--target: expected numbers, got an array of {array.dtype}")
    if probabilities:
        return array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise UsageError("--target: class indices must be whole numbers (use --probabilities for soft targets)")
    return array.astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# crossent explain


def _seed_examples() -> list[tuple[str, np.ndarray, np.ndarray]]:
    from .trace import SEED_001_LOGITS, SEED_001_TARGET

    rng = np.random.default_rng(0)
    return [
        (
            "seed 001: 5 records, 3 classes",
            np.asarray(SEED_001_LOGITS, dtype=np.float32).astype(np.float64),
            np.asarray(SEED_001_TARGET),
        ),
        (
            "seed 000: segmentation, 6 images x 3 classes x 5 x 5 pixels",
            rng.standard_normal((6, 3, 5, 5)),
            rng.integers(0, 3, size=(6, 5, 5)),
        ),
    ]


def cmd_explain(args: argparse.Namespace) -> int:
    from . import render, trace

    options = trace.Options(
        weight=None if args.weight is None else [float(v) for v in np.ravel(load_array(args.weight, "--weight"))],
        ignore_index=args.ignore_index,
        reduction=args.reduction,
        label_smoothing=args.label_smoothing,
        axis=args.axis,
        z_loss=args.z_loss,
        softcap=args.softcap,
    )
    if args.logits is None:
        if args.target is not None:
            raise UsageError("--target needs --logits")
        examples = _seed_examples()
    else:
        if args.target is None:
            raise UsageError("--logits needs --target (class indices, or probabilities with --probabilities)")
        logits = _as_float_logits(load_array(args.logits, "--logits"))
        target = _as_target(load_array(args.target, "--target"), args.probabilities)
        examples = [("your input", logits, target)]
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'crossent[cli]'")
    traces = []
    for title, logits, target in examples:
        try:
            traces.append(trace.build_trace(logits, target, options, title=title, max_rows=args.max_rows))
        except (ValueError, TypeError, IndexError) as err:
            raise UsageError(str(err)) from err
    if args.json:
        print(render.trace_json(traces))
    else:
        for t in traces:
            render.print_trace(t, plain=args.plain)
            print()
    if args.plot:
        render.write_plot(traces[0], args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0 if all(c.holds for t in traces for c in t.checks) else 1


# ---------------------------------------------------------------------------------------------------
# crossent info


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu_info(versions: dict[str, str | None]) -> str:
    """The GPUs torch sees and what crossent.torch runs on them (imports torch, only here)."""
    triton = versions.get("triton")
    if triton is None:
        kernels = "torch ops (triton is not installed)"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        kernels = f"Triton {triton} under its interpreter (TRITON_INTERPRET=1: CPU tensors too, slowly)"
    else:
        kernels = f"Triton {triton} kernels"
    if versions.get("torch") is None:
        return f"unknown (torch is not installed); crossent.torch would run {kernels}"
    import torch

    if not torch.cuda.is_available():
        return f"none visible to torch; on CUDA/ROCm crossent.torch runs {kernels}"
    runtime = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"{names} ({runtime}); crossent.torch runs {kernels}"


def cmd_info(args: argparse.Namespace) -> int:
    import crossent

    info: dict[str, Any] = {"crossent": crossent.__version__, **crossent.config()}
    info["frameworks"] = {
        name: _version(dist)
        for name, dist in [
            ("numpy", "numpy"),
            ("torch", "torch"),
            ("jax", "jax"),
            ("triton", "triton"),
            ("cupy", "cupy"),
            ("array_api_strict", "array-api-strict"),
            ("array_api_compat", "array-api-compat"),
            ("rich", "rich"),
            ("matplotlib", "matplotlib"),
        ]
    }
    info["gpu"] = _gpu_info(info["frameworks"])
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) + 2 for k in [*info, *info["frameworks"]])
    for key, value in info.items():
        if key != "frameworks":
            print(f"{key:<{width}}{value}")
    print("frameworks:")
    for name, version in info["frameworks"].items():
        print(f"  {name:<{width - 2}}{version or 'not installed'}")
    return 0


# ---------------------------------------------------------------------------------------------------
# crossent bench


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses

    from ..bench import CASES, QUICK_CASES, format_table, plot_sweep, ratio_rows, run_suite, write_report
    from ..bench.linear import LINEAR_CASES, QUICK_LINEAR_CASES, format_linear_table, run_linear_suite

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'crossent[cli]'")
    cases = QUICK_CASES if args.quick else CASES
    progress, finish = _progress_reporter()
    linear_rows: list[dict[str, Any]] = []
    try:
        results = run_suite(cases, progress=progress)
        if importlib.util.find_spec("torch") is not None:
            linear_rows = run_linear_suite(QUICK_LINEAR_CASES if args.quick else LINEAR_CASES, progress=progress)
    finally:
        finish()
    rows = ratio_rows(results)
    print(format_table(rows))
    if linear_rows:
        print()
        print(format_linear_table(linear_rows))
    payload = {"results": [dataclasses.asdict(r) for r in results], "ratios": rows, "linear": linear_rows}
    write_report(payload, args.out, "crossent-bench")
    if args.plot:
        plot_sweep(results, args.plot, linear_rows or None)
        print(f"wrote {args.plot}")
    return 0


def _progress_reporter() -> tuple[Any, Any]:
    """A progress bar (rich when installed, else one line per step on stderr)."""
    if importlib.util.find_spec("rich") is not None and sys.stderr.isatty():
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("benchmarking", total=1)

        def update(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        return update, bar.stop

    def report(label: str, done: int, total: int) -> None:
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)

    return report, lambda: None


# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="crossent", description="Cross-entropy, explained, checked and benchmarked.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    explain = sub.add_parser("explain", help="the loss computed step by step, with its identities checked")
    explain.add_argument("--logits", help="logits: a .npy, .json or .csv file, or inline JSON")
    explain.add_argument("--target", help="class indices (or probabilities, with --probabilities), same formats")
    explain.add_argument("--probabilities", action="store_true", help="the target holds class probabilities")
    explain.add_argument("--weight", help="a weight per class (inline JSON or a file)")
    explain.add_argument("--ignore-index", type=int, default=-100)
    explain.add_argument("--reduction", choices=["mean", "sum", "none"], default="mean")
    explain.add_argument("--label-smoothing", type=float, default=0.0)
    explain.add_argument("--axis", type=int, default=None, help="the class axis (default: torch's rule)")
    explain.add_argument("--z-loss", type=float, default=0.0)
    explain.add_argument("--softcap", type=float, default=None)
    explain.add_argument("--max-rows", type=int, default=12, help="rows shown before summarising (default 12)")
    explain.add_argument("--plot", metavar="FILE.png", help="draw each row's probabilities, target marked")
    explain.add_argument("--json", action="store_true", help="print a machine-readable result")
    explain.add_argument("--plain", action="store_true", help="plain text even when rich is installed")
    explain.set_defaults(run=cmd_explain)

    bench = sub.add_parser("bench", help="benchmark crossent against torch, JAX, NumPy and the memory floor")
    bench.add_argument("--quick", action="store_true", help="smaller cases, under a minute")
    bench.add_argument("--out", metavar="FILE.json", help="where to write the results")
    bench.add_argument("--plot", metavar="FILE.png", help="draw time against vocabulary size")
    bench.set_defaults(run=cmd_bench)

    info = sub.add_parser("info", help="version, kernel, SIMD level, threads, frameworks")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max_rows", 1) is not None and getattr(args, "max_rows", 1) < 1:
        parser.error(f"--max-rows must be at least 1, got {args.max_rows}")
    try:
        return int(args.run(args))
    except UsageError as err:
        print(f"crossent {args.command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
