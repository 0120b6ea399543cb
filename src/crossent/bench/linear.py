"""The fused linear + cross-entropy benchmark: time and extra peak memory of forward+backward.

Variants, each in a process of its own so that its peak resident memory is its own:
  naive          logits = x @ W.T, then F.cross_entropy (the N x V logits are materialised)
  torch-chunked  torch's F.linear_cross_entropy with LinearCrossEntropyOptions() (its chunked path)
  crossent       crossent.torch.linear_cross_entropy
  crossent-64    the same in 64-row chunks (by default 24 MiB of logits: 192 rows at V=32768): less
                 memory, more time
  naive+ct       logits = x @ W.T, then crossent.torch.cross_entropy
  naive+ct-inpl  the same with inplace_backward=True (the gradient overwrites the logits)
  token-stats    crossent.torch.linear_token_stats, backward through log_prob + 0.01 * entropy (the
                 per-token statistics of policy-gradient training, same memory bounds)
Each child times its first step (a fresh process: first-touch and first-call costs) and then
``steady_steps`` more (a training loop's steady state: best and median). "Extra peak" is the highest
peak RSS (VmHWM) of any step minus the RSS once the inputs exist; "overhead" is that minus the
gradients every variant must return (input and weight gradients in the parameters' dtype), and since
what a variant keeps between steps (crossent's buffer cache, allocator caches) stays resident, the
later steps' peaks count it; "kept" is the RSS between steps, gradients dropped, above the inputs'.
A variant whose first step is still running at the time limit (150 s by default) is stopped and
reported with its peak so far (a lower bound): on a CPU without bfloat16 matrix instructions torch's
bfloat16 matmuls take hours at the bfloat16 case's size. Past the limit no further steady step starts
(at least one runs). With several rounds, a case's variants run in turns, round after round.
Run a child directly: python -m crossent.bench.linear --child VARIANT N D V DTYPE STEADY_STEPS [LIMIT_S]
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LinearCase:
    name: str
    n: int
    d: int
    v: int
    dtype: str
    steady_steps: int  # steps timed after the first (the warm-up)


LINEAR_CASES = [
    LinearCase("N=2048 D=512 V=32768 f32", 2048, 512, 32768, "float32", 5),
    # A vocabulary past the split threshold: crossent chunks it too.
    LinearCase("N=1024 D=256 V=262144 f32", 1024, 256, 262144, "float32", 3),
    LinearCase("N=4096 D=1024 V=131072 bf16", 4096, 1024, 131072, "bfloat16", 2),
]
QUICK_LINEAR_CASES = [
    LinearCase("N=1024 D=256 V=16384 f32", 1024, 256, 16384, "float32", 3),
    LinearCase("N=128 D=128 V=4096 bf16", 128, 128, 4096, "bfloat16", 2),
]
VARIANTS = ("naive", "torch-chunked", "crossent", "crossent-64", "naive+ct", "naive+ct-inpl", "token-stats")


def _child(
    variant: str, n: int, d: int, v: int, dtype_name: str, steady_steps: int, time_limit: float | None = None
) -> dict[str, Any]:
    import os
    import statistics
    import threading

    import torch
    import torch.nn.functional as F

    def status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
        return 0

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
    W = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g)
    y[::10] = -100  # some ignored tokens, as in a padded batch

    if variant == "naive":

        def loss_fn() -> Any:
            return F.cross_entropy(x @ W.T, y)
    elif variant == "torch-chunked":
        options = torch.nn.LinearCrossEntropyOptions()

        def loss_fn() -> Any:
            return F.linear_cross_entropy(x, W, y, ignore_index=-100, options=options)
    elif variant in ("crossent", "crossent-64"):
        import crossent.torch as ct

        chunk_size = 64 if variant == "crossent-64" else None

        def loss_fn() -> Any:
            return ct.linear_cross_entropy(x, W, y, chunk_size=chunk_size)
    elif variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")
    elif variant == "token-stats":
        import crossent.torch as ct

        def loss_fn() -> Any:
            stats = ct.linear_token_stats(x, W, y)
            return stats.log_prob.sum() + 0.01 * stats.entropy.sum()
    else:
        import crossent.torch as ct

        inplace = variant == "naive+ct-inpl"

        def loss_fn() -> Any:
            return ct.cross_entropy(x @ W.T, y, inplace_backward=inplace)

    def step() -> float:
        x.grad = W.grad = None
        loss = loss_fn()
        loss.backward()
        return float(loss.detach())

    def reset_peak() -> None:
        # The peak of this process alone: ru_maxrss would not do, since Linux carries it over from the
        # parent across exec. Writing 5 to clear_refs resets VmHWM, the high-water mark, to the current RSS.
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def cache_mib() -> float:
        import crossent

        return crossent._memory.buffer_cache_bytes()[0] / 2**20

    # The gradients every variant must return, in the parameters' dtype: what a step adds beyond them
    # is its overhead.
    returned_mib = (x.numel() + W.numel()) * x.element_size() / 2**20
    reset_peak()
    base = status_kib("VmRSS:")
    first: float | None = None
    steady: list[float] = []
    peaks = [0]  # VmHWM after each step (reset before each)
    timer = None
    if time_limit is not None:

        def stop() -> None:
            # A variant that cannot finish here (half-precision matmuls on a CPU without matrix
            # instructions for them): what it measured by now; its peak so far bounds its peak below.
            so_far = (max(*peaks, status_kib("VmHWM:")) - base) / 1024
            print(json.dumps({
                "variant": variant, "stopped_after_s": time_limit, "seconds_first": None, "seconds": None,
                "extra_peak_so_far_mib": so_far,
                "overhead_so_far_mib": so_far - returned_mib, "returned_grads_mib": returned_mib,
                "torch_threads": torch.get_num_threads(),
            }), flush=True)  # fmt: skip
            os._exit(0)

        timer = threading.Timer(time_limit, stop)
        timer.daemon = True
        timer.start()
    began = start = time.perf_counter()
    loss = step()  # the first step, in a fresh process: first-touch and first-call costs included
    first = time.perf_counter() - start
    if timer is not None:
        timer.cancel()
    first_peak = status_kib("VmHWM:")
    peaks.append(first_peak)
    steady_peak = 0
    for _ in range(steady_steps):
        if steady and time_limit is not None and time.perf_counter() - began > time_limit:
            break  # past the limit: the steady steps so far (at least one) stand
        x.grad = W.grad = None  # what is kept between steps (crossent's buffer cache) stays resident
        reset_peak()
        start = time.perf_counter()
        step()
        steady.append(time.perf_counter() - start)
        steady_peak = max(steady_peak, status_kib("VmHWM:"))
        peaks.append(steady_peak)
    x.grad = W.grad = None
    between = status_kib("VmRSS:")
    extra_peak = (max(first_peak, steady_peak) - base) / 1024
    return {
        "variant": variant,
        "seconds_first": first,
        "seconds_best": min(steady) if steady else None,
        "seconds_median": statistics.median(steady) if steady else None,
        "steady_steps": len(steady),
        # The steady-state best where there is one (a training loop's steps), else the first step.
        "seconds": min(steady) if steady else first,
        "extra_peak_mib": extra_peak,
        "first_step_extra_peak_mib": (first_peak - base) / 1024,
        "returned_grads_mib": returned_mib,
        "overhead_mib": extra_peak - returned_mib,
        "kept_between_steps_mib": (between - base) / 1024,
        "crossent_cache_mib": cache_mib() if variant.startswith(("crossent", "naive+ct", "token-stats")) else 0.0,
        "loss": loss,
        "torch_threads": torch.get_num_threads(),
    }


# Seconds a variant's first step may run before it is stopped and reported as such, with its peak
# memory so far; past them no further steady step starts (at least one runs). A bfloat16 case on a CPU
# without bfloat16 matrix instructions would otherwise take hours in torch's reference matmul loop
# (measured on the 2-core AVX2 machine, N=4096 D=1024 V=131072: the naive loss's input gradient alone
# at 0.24 GFLOP/s, about 76 minutes).
DEFAULT_TIME_LIMIT_S = 150.0


def _run_child(case: LinearCase, variant: str, time_limit: float | None) -> dict[str, Any]:
    args = [variant, str(case.n), str(case.d), str(case.v), case.dtype, str(case.steady_steps)]
    if time_limit is not None:
        args.append(str(time_limit))
    out = subprocess.run(
        [sys.executable, "-m", "crossent.bench.linear", "--child", *args], capture_output=True, text=True
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"case": case.name, "variant": variant, "seconds": None, "note": f"failed: {last}"}
    return {"case": case.name, **json.loads(out.stdout.strip().splitlines()[-1])}


# Per round, what is taken across rounds: the times of the round with the best steady step, the first
# step's best (each round is a fresh process), and each memory figure's largest.
_MEMORY_FIELDS = ("extra_peak_mib", "first_step_extra_peak_mib", "overhead_mib", "kept_between_steps_mib",
                  "crossent_cache_mib")  # fmt: skip


def _combine_rounds(done: list[dict[str, Any]]) -> dict[str, Any]:
    if len(done) == 1 or any(r.get("seconds") is None for r in done):
        return done[0]
    row = dict(min(done, key=lambda r: r["seconds"]))
    row["seconds_first"] = min(r["seconds_first"] for r in done)
    for field in _MEMORY_FIELDS:
        row[field] = max(r[field] for r in done)
    row["rounds"] = len(done)
    row["seconds_rounds"] = [r["seconds"] for r in done]
    return row


def run_linear_suite(
    cases: list[LinearCase],
    progress: Any = None,
    variants: tuple[str, ...] = VARIANTS,
    time_limit: float | None = DEFAULT_TIME_LIMIT_S,
    rounds: int = 1,
) -> list[dict[str, Any]]:
    """Each (case, variant) in a child process of its own; ``time_limit`` seconds per child (None: no limit).

    With ``rounds`` > 1 a case's variants run in turns, round after round, so that a slow spell of a
    shared machine falls on all of them alike rather than on one; a variant takes another round only
    while its rounds so far took less than ``time_limit`` in all (one round for a variant stopped at
    the limit). A variant's row is then its best round's time, its best first step, the largest of
    each memory figure, and ``seconds_rounds``, every round's steady step.
    """
    rows: list[dict[str, Any]] = []
    total = len(cases) * len(variants) * rounds
    started = 0
    for case in cases:
        done: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        spent = dict.fromkeys(variants, 0.0)
        for round_ in range(rounds):
            for variant in variants:
                if round_ > 0:
                    earlier = done[variant]
                    if earlier[-1].get("seconds") is None or (time_limit is not None and spent[variant] >= time_limit):
                        continue
                if progress is not None:
                    progress(f"linear {case.name} {variant} (round {round_ + 1})", started, total)
                began = time.perf_counter()
                done[variant].append(_run_child(case, variant, time_limit))
                spent[variant] += time.perf_counter() - began
                started += 1
                if progress is not None:  # each result as it comes: a run stopped early keeps what it measured
                    progress(f"linear {case.name} {variant}: {_summary(done[variant][-1])}", started, total)
        rows += [_combine_rounds(done[v]) for v in variants]
    if progress is not None:
        progress("done", total, total)
    return rows


def bound_up(value: float, digits: int) -> str:
    """``value`` rounded up to ``digits`` decimals: an upper bound printed must stay one (0.1811 -> 0.19)."""
    return f"{math.ceil(value * 10**digits) / 10**digits:.{digits}f}"


def stopped_note(row: dict[str, Any]) -> str:
    """What a variant stopped at the time limit measured: its peak so far."""
    return (f"stopped after {row['stopped_after_s']:.0f} s in its first step; extra peak so far "
            f"{row['extra_peak_so_far_mib']:.0f} MiB")  # fmt: skip


def _summary(row: dict[str, Any]) -> str:
    if row.get("stopped_after_s") is not None:
        return stopped_note(row)
    if row.get("seconds") is None:
        return row.get("note", "failed")
    return (f"first {row['seconds_first']:.3f} s, steady {row['seconds']:.3f} s, "
            f"+{row['extra_peak_mib']:.0f} MiB extra peak, {row['overhead_mib']:.0f} MiB overhead")  # fmt: skip


def format_linear_table(rows: list[dict[str, Any]]) -> str:
    """Times (first step; best and median of the steady steps) and memory (raw extra peak; overhead
    beyond the returned gradients, counting what is kept between steps), each against naive's."""
    head = (f"{'case':<30} {'variant':<14} {'first':>8} {'best':>8} {'median':>8} {'best/naive':>10} "
            f"{'extra peak':>11} {'overhead':>10} {'ovh/naive':>9} {'kept':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]
    naive = {r["case"]: r for r in rows if r["variant"] == "naive"}
    for r in rows:
        if r.get("seconds") is None:
            note = stopped_note(r) if r.get("stopped_after_s") is not None else r.get("note", "-")
            lines.append(f"{r['case']:<30} {r['variant']:<14} {note}")
            continue
        t_ratio = m_ratio = "-"
        base = naive.get(r["case"])
        if base is not None and base.get("seconds"):
            t_ratio = f"{r['seconds'] / base['seconds']:.2f}"
            m_ratio = f"{r['overhead_mib'] / base['overhead_mib']:.3f}" if base["overhead_mib"] > 0 else "-"
        elif base is not None and base.get("stopped_after_s") is not None:  # bounds: naive took longer
            t_ratio = f"<{bound_up(r['seconds_first'] / base['stopped_after_s'], 3)} (1st)"
            if base["overhead_so_far_mib"] > 0:
                m_ratio = f"<{bound_up(r['overhead_mib'] / base['overhead_so_far_mib'], 3)}"

        def sec(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}s"

        lines.append(
            f"{r['case']:<30} {r['variant']:<14} {sec(r['seconds_first']):>8} {sec(r['seconds_best']):>8} "
            f"{sec(r['seconds_median']):>8} {t_ratio:>10} {r['extra_peak_mib']:>8.0f}MiB {r['overhead_mib']:>7.0f}MiB "
            f"{m_ratio:>9} {r['kept_between_steps_mib']:>5.0f}MiB"
        )
    return "\n".join(lines)


def _draw_bars(ax: Any, rows: list[dict[str, Any]], value: str, stopped_value: str) -> None:
    """Grouped bars of ``value`` per variant and case, log scale; a variant stopped at the time limit
    is drawn hatched at ``stopped_value`` (a lower bound) and marked "≥"."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        color = f"C{i}"
        for k, case in enumerate(cases):
            r = next((r for r in rows if r["case"] == case and r["variant"] == variant), None)
            if r is None:
                continue
            stopped = r.get("stopped_after_s") is not None
            height = r.get(stopped_value if stopped else value)
            if not height or height <= 0:
                continue
            x = k + i * width
            ax.bar(x, height, width, color=color, hatch="//" if stopped else None, alpha=0.5 if stopped else 1.0,
                   label=variant)  # fmt: skip
            if stopped:
                ax.annotate("≥", (x, height), ha="center", va="bottom", fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    unique: dict[str, Any] = {}
    for label, handle in zip(labels, handles, strict=True):
        unique.setdefault(label, handle)  # one entry per variant, its first (unhatched where it ran) bar
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    names = [case.replace(" V=", "\nV=", 1) for case in cases]
    ax.set_xticks([k + width * (len(variants) - 1) / 2 for k in range(len(cases))], names, fontsize=7)
    ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)


def _title(rows: list[dict[str, Any]], what: str) -> str:
    stopped = any(r.get("stopped_after_s") is not None for r in rows)
    note = "\n(hatched, ≥: stopped at the time limit, a lower bound)" if stopped else ""
    return f"linear + cross-entropy: {what}{note}"


def draw_linear_memory(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Overhead beyond the returned gradients per variant and case, on ``ax``."""
    _draw_bars(ax, rows, "overhead_mib", "overhead_so_far_mib")
    ax.set_ylabel("MiB beyond the returned gradients")
    ax.set_title(_title(rows, "memory overhead of a step"), fontsize=10)


def draw_linear_time(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Best steady step per variant and case (a stopped variant: the time limit), on ``ax``."""
    _draw_bars(ax, rows, "seconds", "stopped_after_s")
    ax.set_ylabel("seconds per step (forward+backward)")
    ax.set_title(_title(rows, "time of a step"), fontsize=10)


def plot_linear(rows: list[dict[str, Any]], path: str, caption: str | None = None) -> None:
    """Time and memory overhead side by side, to a PNG; ``caption`` (the machine) under them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    draw_linear_time(left, rows)
    draw_linear_memory(right, rows)
    if caption:
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05 if caption else 0, 1, 1))
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the same rows give the same file
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) not in (8, 9) or sys.argv[1] != "--child":
        raise SystemExit("usage: python -m crossent.bench.linear --child VARIANT N D V DTYPE STEADY_STEPS [LIMIT_S]")
    variant, n, d, v, dtype_name, steady_steps = sys.argv[2:8]
    limit = float(sys.argv[8]) if len(sys.argv) == 9 else None
    if limit is not None and not limit > 0:
        raise SystemExit(f"LIMIT_S must be a positive number of seconds, got {sys.argv[8]}")
    print(json.dumps(_child(variant, int(n), int(d), int(v), dtype_name, int(steady_steps), limit)))
