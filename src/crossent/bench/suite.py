"""The kernel benchmark suite: cases, implementations, timing, and the ratios reported from them.

Every implementation of a case is timed in the same process, on the same arrays, in turns: round k gives
each implementation a turn, in an order rotated by k, of one untimed call and then one timed call (or
``calls_per_round``, for cases of microseconds), and each keeps its best round (and its median one, which
shows how much the host's noise spread the rounds). This machine's speed
drifts over minutes (other tenants share its host); in turns, a drift reaches every implementation
alike instead of whichever happened to run during it, so the ratios of one run hold up, and the
untimed call keeps one implementation's aftermath (threads still spinning, memory to compact) out of
the next one's time.

"forward" returns the mean loss; "forward+backward" also materialises the gradient with respect to the
logits. The floors are what the memory system allows: a read-only pass over the logits (``np.max``) for
forward, and ``np.copyto`` of the logits into a preallocated array (one read and one write of the same
bytes) for forward+backward.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import crossent


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]  # logits, classes on axis 1
    dtype: str = "float32"
    modes: tuple[str, ...] = ("forward", "forward+backward")
    peers: tuple[str, ...] = ("crossent", "torch", "jax", "numpy", "floor")
    repeats: int = 5  # rounds
    group: str = "main"  # "sweep" cases are drawn as time against vocabulary size
    calls_per_round: int = 1  # timed back to back, their mean is the round's time (latency cases)


def _sweep(rows: int, vocabularies: list[int], repeats: int) -> list[Case]:
    return [
        Case(f"sweep {rows}x{v}", (rows, v), modes=("forward+backward",), peers=("crossent", "torch", "jax", "floor"),
             repeats=repeats, group="sweep")
        for v in vocabularies
    ]  # fmt: skip


def _latency(rounds: int) -> Case:
    """The notebooks' size, 256x10 forward: the time of one call from Python, rounds of 20 calls."""
    return Case("256x10 f32 (latency)", (256, 10), modes=("forward",), peers=("crossent", "torch", "jax", "numpy"),
                repeats=rounds, calls_per_round=20)  # fmt: skip


_MAIN_PEERS = ("crossent", "crossent-out", "torch", "jax", "numpy", "floor")


def _threads(rows: int, classes: int, rounds: int) -> Case:
    """One thread against all, both with out=, in a case of their own: two calls of a tenth of a second
    can afford more rounds than the peers' cases, and a ratio of two noisy times needs them."""
    return Case(f"{rows}x{classes} f32 (threads)", (rows, classes), peers=("crossent-out", "crossent-1thread"),
                repeats=rounds, group="threads")  # fmt: skip


CASES: list[Case] = [
    Case("4096x32768 f32", (4096, 32768), peers=_MAIN_PEERS),
    _threads(4096, 32768, rounds=20),
    Case(
        "4096x131072 bf16",
        (4096, 131072),
        dtype="bfloat16",
        peers=("crossent", "crossent-out", "torch", "floor"),
        repeats=3,
    ),
    Case(
        "8x21x256x256 f32 (segmentation)",
        (8, 21, 256, 256),
        peers=("crossent", "crossent-out", "torch", "jax", "floor"),
    ),
    _latency(rounds=20),
    *_sweep(4096, [1024, 4096, 16384, 65536, 262144], repeats=3),
]

# Under a minute on a 2-core machine: the same kinds of case, smaller.
QUICK_CASES: list[Case] = [
    Case("1024x32768 f32", (1024, 32768), peers=_MAIN_PEERS, repeats=3),
    _threads(1024, 32768, rounds=5),
    Case("2x21x256x256 f32 (segmentation)", (2, 21, 256, 256), repeats=3),
    _latency(rounds=10),
    *_sweep(1024, [1024, 8192, 65536], repeats=2),
]


@dataclass
class Result:
    case: str
    shape: tuple[int, ...]
    dtype: str
    mode: str
    impl: str
    seconds: float | None  # the best round
    note: str = ""
    group: str = "main"
    median_seconds: float | None = None  # how far the rounds spread: the host's noise


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``fn``, after one untimed warm-up call."""
    fn()  # warm-up: JIT compilation, allocator, page faults of one-time buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _numpy_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


# Bytes a peer holds at once during its call, in multiples of the logits (input, log-softmax or softmax,
# gradients), and those it keeps between calls (a reused gradient, the block crossent's buffer cache keeps
# from its last fresh gradient, a copy of the input, torch's .grad):
# the peers of a case are alive together, and one that would not fit in the memory left is reported as
# skipped rather than pushed into swap.
_FOOTPRINT = {"crossent": 2, "crossent-out": 2, "crossent-1thread": 2, "numpy": 4, "torch": 5, "jax": 5, "floor": 2}
_KEPT = {"crossent": 1, "crossent-out": 1, "crossent-1thread": 1, "numpy": 0, "torch": 1, "jax": 1, "floor": 1}


def _make_inputs(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape, dtype=np.float32)
    x = x.astype(_numpy_dtype(case.dtype))
    batch = case.shape[:1] + case.shape[2:]
    y = rng.integers(0, case.shape[1], size=batch)
    return x, y


def _crossent(x: np.ndarray, y: np.ndarray, mode: str) -> Callable[[], Any]:
    if mode == "forward":
        return lambda: crossent.cross_entropy(x, y)
    return lambda: crossent.cross_entropy_and_grad(x, y)


def _crossent_reusing_gradient(x: np.ndarray, y: np.ndarray, mode: str) -> Callable[[], Any]:
    """crossent with ``out=``: the gradient buffer of a training loop, allocated once (as the floor's is)."""
    if mode == "forward":
        return lambda: crossent.cross_entropy(x, y)
    buffer = np.empty_like(x)
    return lambda: crossent.cross_entropy_and_grad(x, y, out=buffer)


def _crossent_one_thread(x: np.ndarray, y: np.ndarray, mode: str) -> Callable[[], Any]:
    """crossent on one thread, for the thread-scaling ratio (the result is bitwise the same)."""
    inner = _crossent_reusing_gradient(x, y, mode)

    def run() -> Any:
        previous = crossent.get_num_threads()
        crossent.set_num_threads(1)
        try:
            return inner()
        finally:
            crossent.set_num_threads(previous)

    return run


def _numpy_notebook(x: np.ndarray, y: np.ndarray, mode: str) -> Callable[[], Any]:
    """The seed notebooks' formula, vectorised and stabilised by the row maximum."""
    rows = np.arange(x.shape[0])

    def forward() -> Any:
        m = x.max(axis=1, keepdims=True)
        lse = m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))
        return np.mean(lse[:, 0] - x[rows, y])

    def forward_backward() -> Any:
        m = x.max(axis=1, keepdims=True)
        e = np.exp(x - m)
        s = e.sum(axis=1, keepdims=True)
        loss = np.mean(m[:, 0] + np.log(s[:, 0]) - x[rows, y])
        grad = e / s
        grad[rows, y] -= 1.0
        grad /= x.shape[0]
        return loss, grad

    if x.ndim != 2:
        raise ValueError("the notebook formula is benchmarked on (N, C) inputs only")
    return forward if mode == "forward" else forward_backward


def _torch(x: np.ndarray, y: np.ndarray, mode: str) -> Callable[[], Any]:
    torch = importlib.import_module("torch")
    F = torch.nn.functional
    if x.dtype.name == "bfloat16":
        xt = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)  # the same bits, no conversion
    else:
        xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    if mode == "forward":

        def forward() -> Any:
            with torch.no_grad():
                return F.cross_entropy(xt, yt)

        return forward
    leaf = xt.detach().requires_grad_(True)

    def forward_backward() -> Any:
        leaf.grad = None
        loss = F.cross_entropy(leaf, yt)
        loss.backward()
        return loss, leaf.grad

    return forward_backward


def _jax(x: np.ndarray, y: np.ndarray, mode: str) -> Callable[[], Any]:
    jax = importlib.import_module("jax")
    jnp = importlib.import_module("jax.numpy")

    def loss(logits: Any, labels: Any) -> Any:
        # optax.softmax_cross_entropy_with_integer_labels, written out: logsumexp minus the label logit.
        moved = jnp.moveaxis(logits, 1, -1)
        label_logits = jnp.take_along_axis(moved, labels[..., None], axis=-1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(moved, axis=-1) - label_logits)

    xj, yj = jnp.asarray(x), jnp.asarray(y)
    fn = jax.jit(loss) if mode == "forward" else jax.jit(jax.value_and_grad(loss))
    return lambda: jax.block_until_ready(fn(xj, yj))


def _floor(x: np.ndarray, y: np.ndarray, mode: str) -> Callable[[], Any]:
    if mode == "forward":
        # One read of the logits, no write. Half types are read as their uint16 bits: NumPy has no
        # vectorised max for ml_dtypes' bfloat16, and the floor is about bytes, not arithmetic.
        bits = x.view(np.uint16) if x.dtype.itemsize == 2 else x
        return lambda: np.max(bits)
    dst = np.empty_like(x)
    return lambda: np.copyto(dst, x)  # one read and one write of the same bytes, into a warm buffer


_PEERS: dict[str, Callable[[np.ndarray, np.ndarray, str], Callable[[], Any]]] = {
    "crossent": _crossent,
    "crossent-out": _crossent_reusing_gradient,
    "crossent-1thread": _crossent_one_thread,
    "torch": _torch,
    "jax": _jax,
    "numpy": _numpy_notebook,
    "floor": _floor,
}
_MODULES = {"torch": "torch", "jax": "jax"}


def rounds_in_turns(
    calls: dict[str, Callable[[], Any]], rounds: int, calls_per_round: int = 1
) -> dict[str, list[float]]:
    """Each callable's time per call in every round, the callables timed in turns (see the module's
    docstring). Every turn starts with an untimed call: it absorbs what the previous callable left behind
    (another library's threads still spinning after its call, memory it freed in pieces that the next
    large allocation would have to compact), so that each timed call runs as it would among calls of its
    own."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(rounds):
        for j in range(len(names)):
            name = names[(j + k) % len(names)]
            fn = calls[name]
            fn()  # untimed: also the warm-up of the first round (JIT compilation, one-time buffers)
            start = time.perf_counter()
            for _ in range(calls_per_round):
                fn()
            times[name].append((time.perf_counter() - start) / calls_per_round)
    return times


def best_in_turns(calls: dict[str, Callable[[], Any]], rounds: int, calls_per_round: int = 1) -> dict[str, float]:
    """Each callable's shortest round of rounds_in_turns."""
    return {name: min(t) for name, t in rounds_in_turns(calls, rounds, calls_per_round).items()}


def _skip_reason(impl: str, x: np.ndarray, kept: int) -> str:
    """Why ``impl`` cannot run on ``x`` here, beside peers that keep ``kept`` logits-sized buffers, or ""
    when it can."""
    module = _MODULES.get(impl)
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{module} not installed"
    if impl == "numpy" and x.ndim != 2:
        return "notebook formula: (N, C) only"
    if (_FOOTPRINT[impl] + kept) * x.nbytes > 0.8 * _available_memory():
        return "skipped: would not fit in memory"
    return ""


def run_suite(
    cases: list[Case],
    *,
    peers: tuple[str, ...] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[Result]:
    """Time every (case, mode, peer), the peers of one (case, mode) in turns; a peer that is not
    installed or would not fit is skipped, with a note."""
    groups = [(case, mode) for case in cases for mode in case.modes]
    results: list[Result] = []
    inputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for index, (case, mode) in enumerate(groups):
        if progress is not None:
            progress(f"{case.name} {mode}", index, len(groups))
        if case.name not in inputs:
            inputs.clear()  # one case's arrays at a time
            inputs[case.name] = _make_inputs(case)
        x, y = inputs[case.name]
        group: list[Result] = []
        calls: dict[str, Callable[[], Any]] = {}
        kept = 0
        for impl in case.peers:
            if peers is not None and impl not in peers:
                continue
            note = _skip_reason(impl, x, kept)
            group.append(Result(case.name, case.shape, case.dtype, mode, impl, None, note=note, group=case.group))
            if not note:
                calls[impl] = _PEERS[impl](x, y, mode)
                kept += _KEPT[impl]
        times = rounds_in_turns(calls, case.repeats, case.calls_per_round)
        del calls  # the peers' buffers (reused gradients, device copies) go before the next case's arrays
        for r in group:
            if r.impl in times:
                r.seconds = min(times[r.impl])
                r.median_seconds = float(np.median(times[r.impl]))
        results.extend(group)
    if progress is not None:
        progress("done", len(groups), len(groups))
    return results


def ratio_rows(results: list[Result]) -> list[dict[str, Any]]:
    """Per (case, mode): crossent's time and each peer's time divided by it (> 1: crossent is faster)."""
    rows: list[dict[str, Any]] = []
    for case, mode in dict.fromkeys((r.case, r.mode) for r in results):  # first-seen order
        timed = {r.impl: r.seconds for r in results if r.case == case and r.mode == mode}
        medians = {r.impl: r.median_seconds for r in results if r.case == case and r.mode == mode}
        ours = timed.get("crossent")
        row: dict[str, Any] = {"case": case, "mode": mode, "crossent_s": ours}
        for impl, seconds in timed.items():
            if impl == "crossent":
                continue
            row[f"{impl}_s"] = seconds
            if impl == "crossent-1thread":
                # The thread speed-up: one thread against all, both writing into a reused buffer; of the
                # best rounds, and of the median ones.
                baseline = timed.get("crossent-out")
                if baseline and seconds:
                    row[f"{impl}_ratio"] = seconds / baseline
                median, median_baseline = medians.get(impl), medians.get("crossent-out")
                if median and median_baseline:
                    row[f"{impl}_median_ratio"] = median / median_baseline
            elif ours and seconds:
                # For the floor the ratio reads the other way: crossent's time in multiples of the floor.
                row[f"{impl}_ratio"] = ours / seconds if impl == "floor" else seconds / ours
        reused, floor = timed.get("crossent-out"), timed.get("floor")
        if reused and floor:
            row["crossent-out_floor_ratio"] = reused / floor  # crossent with out= in multiples of the floor
        rows.append(row)
    return rows


def write_report(payload: dict[str, Any], out: str | pathlib.Path | None, stem: str,
                 directory: pathlib.Path = pathlib.Path(".")) -> pathlib.Path:  # fmt: skip
    """Write a benchmark report as JSON, this machine's metadata first, to ``out`` or else to
    ``directory/<stem>-<time>.json``; say where, and return the path."""
    path = pathlib.Path(out) if out else directory / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_metadata(), **payload}, indent=2, default=str))
    print(f"wrote {path}")
    return path


def machine_metadata() -> dict[str, Any]:
    meta: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "crossent": crossent.__version__,
        "crossent_config": crossent.config(),
        "numpy": np.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    meta["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for name in ("torch", "jax"):
        if importlib.util.find_spec(name) is not None:
            meta[name] = importlib.import_module(name).__version__
    if "torch" in meta:
        meta["torch_threads"] = importlib.import_module("torch").get_num_threads()
    return meta


_TABLE_PEERS = ("torch", "jax", "numpy", "floor", "crossent-out", "crossent-1thread")


def format_table(rows: list[dict[str, Any]]) -> str:
    """Times and ratios as aligned text: 'peer time (ratio)' per column."""
    header = f"{'case':<34} {'mode':<17} {'crossent':>10}" + "".join(f" {p:>17}" for p in _TABLE_PEERS)
    header += f" {'out= vs floor':>14}"
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for peer in _TABLE_PEERS:
            seconds, ratio = row.get(f"{peer}_s"), row.get(f"{peer}_ratio")
            if seconds is None:
                cells.append(f" {'-':>17}")
            else:
                cells.append(f" {seconds * 1e3:>8.2f}ms {ratio:>5.2f}x" if ratio else f" {seconds * 1e3:>10.2f}ms")
        ours = row["crossent_s"]
        out_floor = row.get("crossent-out_floor_ratio")
        cells.append(f" {out_floor:>13.2f}x" if out_floor else f" {'-':>14}")
        ours_cell = f"{ours * 1e3:>8.3f}ms" if ours else f"{'-':>10}"
        lines.append(f"{row['case']:<34} {row['mode']:<17} {ours_cell}" + "".join(cells))
    lines.append(
        "peer columns: their time and their time / crossent's (> 1: crossent is faster); crossent-1thread: one "
        "thread's time / all threads' (both with out=, best rounds); floor: crossent's time / the floor's; "
        "out= vs floor: crossent reusing its gradient buffer / the floor"
    )
    return "\n".join(lines)


def draw_sweep(ax: Any, results: list[Result]) -> None:
    """Time against vocabulary size per implementation (the 'sweep' cases), log-log, on ``ax``."""
    sweep = [r for r in results if r.group == "sweep" and r.seconds is not None]
    for impl in sorted({r.impl for r in sweep}):
        points = sorted((r.shape[1], float(r.seconds or 0.0)) for r in sweep if r.impl == impl)
        label = "memory floor (np.copyto)" if impl == "floor" else impl
        style = "--" if impl == "floor" else "-o"
        ax.plot([p[0] for p in points], [p[1] * 1e3 for p in points], style, label=label)
    if sweep:
        ax.set_title(f"cross-entropy forward+backward, {sweep[0].shape[0]} rows, float32", fontsize=10)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("time (ms), best round")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_sweep(results: list[Result], path: str, linear_rows: list[dict[str, Any]] | None = None) -> None:
    """The sweep chart to a PNG; with ``linear_rows``, the linear loss's peak memory beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if linear_rows else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), dpi=100, squeeze=False)
    draw_sweep(axes[0, 0], results)
    if linear_rows:
        from .linear import draw_linear_memory

        draw_linear_memory(axes[0, 1], linear_rows)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
