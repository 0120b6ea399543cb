"""The ``crossent`` command line: ``explain``, ``bench`` and ``info``, each a ``cmd_<name>``.

Bad input (a malformed file, shapes that do not match, an out-of-range class, an unknown option) is
one line on standard error that says what is wrong, and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

USAGE_ERROR = 2
BROKEN_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Values such as '-1,2', '-inf' or '-1e30;3' are arrays, not options (argparse itself only lets
        # plain negative numbers through); no option of crossent's starts with one dash and a digit.
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf\b|nan\b)", re.IGNORECASE)

    def error(self, message: str) -> NoReturn:
        # argparse prints the usage and then the error; one line is what a script can read.
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------------
# Reading the user's arrays: a file (.npy, .json, .csv), inline JSON, inline CSV, or a bare number.

ARRAY_FORMATS = (
    "a .npy, .json or .csv file, inline JSON ('[[1, 2], [3, 4]]'), comma-separated numbers with rows "
    "separated by ';' ('1,2;3,4'), or a single number"
)
_FILE_SUFFIXES = (".npy", ".json", ".csv", ".txt")


def _number(cell: str, what: str, source: str) -> int | float:
    """One CSV cell: an int when it is written as one (class indices), else a float (inf and nan too)."""
    cell = cell.strip()
    try:
        return int(cell)
    except ValueError:
        pass
    try:
        return float(cell)
    except ValueError:
        raise UsageError(f"{what}: {cell!r} in {source!r} is not a number (expected {ARRAY_FORMATS})") from None


def _parse_csv(text: str, what: str, source: str, *, inline: bool) -> np.ndarray:
    """Comma-separated numbers, rows separated by newlines or ';'; one column is read as a vector, and
    so is one inline line (``0,2``); one inline number is a 0-d array."""
    lines = [line for line in re.split(r"[;\n]", text) if line.strip()]
    rows = [[_number(c, what, source) for c in next(csv.reader([line]))] for line in lines]
    if not rows:
        raise UsageError(f"{what}: {source!r} holds no numbers (expected {ARRAY_FORMATS})")
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise UsageError(f"{what}: the rows of {source!r} have different lengths {lengths}")
    array = np.asarray(rows)
    if inline and len(rows) == 1 and ";" not in text:
        return array[0, 0] if array.shape[1] == 1 and "," not in text else array[0]  # '3' or '0,2'
    return array[:, 0] if array.shape[1] == 1 else array


def _parse_json(text: str, what: str, source: str) -> np.ndarray:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{what}: {source!r} is not valid JSON ({err})") from err
    try:
        return np.asarray(value)
    except ValueError as err:  # ragged nesting
        raise UsageError(f"{what}: {source!r} is not a rectangular array ({err})") from err


def load_array(text: str, what: str) -> np.ndarray:
    """An array from a .npy, .json or .csv file, inline JSON, inline CSV or a bare number.

    A name that is an existing file is read as that file; text starting with '[' is JSON; anything
    else is comma-separated numbers (``0,2``, ``1,2;3,4``, ``3``). Errors name the bad value.
    """
    stripped = text.strip()
    path = pathlib.Path(stripped) if stripped else None
    if path is not None and path.is_file():
        return _load_file(path, text, what)
    if stripped.startswith("["):
        return _parse_json(stripped, what, text)
    if stripped.lower().endswith(_FILE_SUFFIXES) or "/" in stripped or "\\" in stripped:
        raise UsageError(f"{what}: no such file {text!r} (expected {ARRAY_FORMATS})")
    if not stripped:
        raise UsageError(f"{what}: empty value (expected {ARRAY_FORMATS})")
    return _parse_csv(stripped, what, text, inline=True)


def _load_file(path: pathlib.Path, text: str, what: str) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".json":
            return _parse_json(path.read_text(), what, text)
        if suffix in (".csv", ".txt"):
            return _parse_csv(path.read_text(), what, text, inline=False)
    except UsageError as err:
        detail = str(err).removeprefix(f"{what}: ")
        raise UsageError(f"{what}: cannot read {text!r}: {detail}") from err
    except (OSError, ValueError) as err:
        raise UsageError(f"{what}: cannot read {text!r}: {err}") from err
    raise UsageError(f"{what}: {text!r} has an unknown format {suffix!r} (expected .npy, .json or .csv)")


def _numeric(array: np.ndarray, what: str) -> None:
    """Refuse anything but real numbers, naming the first value that is not one."""
    if array.dtype != object and np.issubdtype(array.dtype, np.number) and not np.iscomplexobj(array):
        return

    def is_number(v: Any) -> bool:
        if isinstance(v, (bool, np.bool_)) or np.iscomplexobj(v):
            return False
        try:
            float(v)
        except (TypeError, ValueError):
            return False
        return True

    bad = next((v for v in np.ravel(array) if not is_number(v)), None)
    shown = "" if bad is None else f": {bad.item() if isinstance(bad, np.generic) else bad!r} is not a real number"
    raise UsageError(f"{what}: expected real numbers{shown}")


def _as_weight(array: np.ndarray) -> list[float]:
    _numeric(array, "--weight")
    if array.ndim != 1:
        raise UsageError(f"--weight: expected one weight per class (a 1-D array), got shape {array.shape}")
    return [float(v) for v in array]


def _as_float_logits(array: np.ndarray) -> np.ndarray:
    _numeric(array, "--logits")
    if array.ndim == 0:
        raise UsageError("--logits: expected at least one dimension (the classes), got a single number")
    return array.astype(np.float64)


def _as_target(array: np.ndarray, probabilities: bool) -> np.ndarray:
    _numeric(array, "--target")
    if probabilities:
        return array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            bad = next(v for v in np.ravel(array) if not (np.isfinite(v) and v == np.round(v)))
            raise UsageError(
                f"--target: class indices must be whole numbers, got {float(bad)!r} "
                "(use --probabilities for soft targets)"
            )
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
        weight=None if args.weight is None else _as_weight(load_array(args.weight, "--weight")),
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
    rows = [(key, str(value)) for key, value in info.items() if key != "frameworks"]
    frameworks = [(name, version or "not installed") for name, version in info["frameworks"].items()]
    if not args.plain and importlib.util.find_spec("rich") is not None:
        _print_info_rich(rows, frameworks)
    else:
        print(render_info_plain(rows, frameworks))
    return 0


def render_info_plain(rows: list[tuple[str, str]], frameworks: list[tuple[str, str]]) -> str:
    """Two columns, the names padded to the longest name plus two spaces, so no name runs into its value."""
    indent = "  "
    width = max(len(k) for k in [*(k for k, _ in rows), *(indent + k for k, _ in frameworks)]) + 2
    lines = [f"{key:<{width}}{value}" for key, value in rows]
    lines.append("frameworks:")
    lines += [f"{indent + name:<{width}}{version}" for name, version in frameworks]
    return "\n".join(lines)


def _print_info_rich(rows: list[tuple[str, str]], frameworks: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table.grid(padding=(0, 2))  # two spaces between the columns, however long a name is
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(escape(key), escape(value))
    table.add_row("frameworks:", "")
    for name, version in frameworks:
        table.add_row("  " + escape(name), escape(version), style="dim" if version == "not installed" else None)
    Console().print(table)


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
    explain.add_argument("--logits", help="logits: " + ARRAY_FORMATS)
    explain.add_argument("--target", help="class indices (or probabilities, with --probabilities), same formats")
    explain.add_argument("--probabilities", action="store_true", help="the target holds class probabilities")
    explain.add_argument("--weight", help="a weight per class, same formats")
    explain.add_argument("--ignore-index", type=int, default=-100)
    explain.add_argument("--reduction", choices=["mean", "sum", "none"], default="mean")
    explain.add_argument("--label-smoothing", type=float, default=0.0)
    explain.add_argument("--axis", type=int, default=None, help="the class axis (default: torch's rule)")
    explain.add_argument("--z-loss", type=float, default=0.0)
    explain.add_argument("--softcap", type=float, default=None)
    explain.add_argument("--max-rows", type=int, default=12, help="rows shown before summarising (default 12)")
    explain.add_argument("--plot", metavar="FILE.png", help="draw each row's probabilities, target marked")
    explain.add_argument(
        "--json", action="store_true", help="print a machine-readable result (standard JSON; inf and nan as strings)"
    )
    explain.add_argument("--plain", action="store_true", help="plain text even when rich is installed")
    explain.set_defaults(run=cmd_explain)

    bench = sub.add_parser("bench", help="benchmark crossent against torch, JAX, NumPy and the memory floor")
    bench.add_argument("--quick", action="store_true", help="smaller cases, under a minute")
    bench.add_argument("--out", metavar="FILE.json", help="where to write the results")
    bench.add_argument("--plot", metavar="FILE.png", help="draw time against vocabulary size")
    bench.set_defaults(run=cmd_bench)

    info = sub.add_parser("info", help="version, kernel, SIMD level, threads, frameworks")
    info.add_argument("--json", action="store_true", help="print a machine-readable result")
    info.add_argument("--plain", action="store_true", help="plain text even when rich is installed")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max_rows", 1) is not None and getattr(args, "max_rows", 1) < 1:
        parser.error(f"--max-rows must be at least 1, got {args.max_rows}")
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at the interpreter's exit
        return code
    except UsageError as err:
        print(f"crossent {args.command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:
        # The reader went away (``crossent explain --json | head -1``): stop quietly, as a Unix tool does.
        # Standard output goes to devnull so that Python's final flush does not fail again (the recipe in
        # Python's documentation of signal, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE
