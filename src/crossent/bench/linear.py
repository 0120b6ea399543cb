"""The fused linear + cross-entropy benchmark: time and extra peak memory of forward+backward.

Variants, each in a process of its own so that its peak resident memory is its own:
  naive          logits = x @ W.T, then F.cross_entropy (the N x V logits are materialised)
  torch-chunked  torch's F.linear_cross_entropy with LinearCrossEntropyOptions() (its chunked path)
  crossent       crossent.torch.linear_cross_entropy
  crossent-64    the same in 64-row chunks (by default 24 MiB of logits: 192 rows at V=32768): less
                 memory, more time
  naive+ct       logits = x @ W.T, then crossent.torch.cross_entropy
  naive+ct-inpl  the same with inplace_backward=True (the gradient overwrites the logits)
Each child times its first step (a fresh process: first-touch and first-call costs) and then
``steady_steps`` more (a training loop's steady state: best and median). "Extra peak" is the highest
peak RSS (VmHWM) of any step minus the RSS once the inputs exist; "overhead" is that minus the
gradients every variant must return (input and weight gradients in the parameters' dtype), and since
what a variant keeps between steps (crossent's buffer cache, allocator caches) stays resident, the
later steps' peaks count it; "kept" is the RSS between steps, gradients dropped, above the inputs'.
Run a child directly: python -m crossent.bench.linear --child VARIANT N D V DTYPE STEADY_STEPS
"""

from __future__ import annotations

import json
import subprocess
import sys
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
VARIANTS = ("naive", "torch-chunked", "crossent", "crossent-64", "naive+ct", "naive+ct-inpl")


def _child(variant: str, n: int, d: int, v: int, dtype_name: str, steady_steps: int) -> dict[str, Any]:
    import statistics
    import time

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
    start = time.perf_counter()
    loss = step()  # the first step, in a fresh process: first-touch and first-call costs included
    first = time.perf_counter() - start
    first_peak = status_kib("VmHWM:")
    steady: list[float] = []
    steady_peak = 0
    for _ in range(steady_steps):
        x.grad = W.grad = None  # what is kept between steps (crossent's buffer cache) stays resident
        reset_peak()
        start = time.perf_counter()
        step()
        steady.append(time.perf_counter() - start)
        steady_peak = max(steady_peak, status_kib("VmHWM:"))
    x.grad = W.grad = None
    between = status_kib("VmRSS:")
    extra_peak = (max(first_peak, steady_peak) - base) / 1024
    return {
        "variant": variant,
        "seconds_first": first,
        "seconds_best": min(steady) if steady else None,
        "seconds_median": statistics.median(steady) if steady else None,
        "steady_steps": steady_steps,
        # The steady-state best where there is one (a training loop's steps), else the first step.
        "seconds": min(steady) if steady else first,
        "extra_peak_mib": extra_peak,
        "first_step_extra_peak_mib": (first_peak - base) / 1024,
        "returned_grads_mib": returned_mib,
        "overhead_mib": extra_peak - returned_mib,
        "kept_between_steps_mib": (between - base) / 1024,
        "crossent_cache_mib": cache_mib() if variant.startswith(("crossent", "naive+ct")) else 0.0,
        "loss": loss,
        "torch_threads": torch.get_num_threads(),
    }


def run_linear_suite(
    cases: list[LinearCase], progress: Any = None, variants: tuple[str, ...] = VARIANTS
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    jobs = [(case, variant) for case in cases for variant in variants]  # in the order given
    for index, (case, variant) in enumerate(jobs):
        if progress is not None:
            progress(f"linear {case.name} {variant}", index, len(jobs))
        args = [variant, str(case.n), str(case.d), str(case.v), case.dtype, str(case.steady_steps)]
        out = subprocess.run(
            [sys.executable, "-m", "crossent.bench.linear", "--child", *args], capture_output=True, text=True
        )
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"case": case.name, "variant": variant, "seconds": None, "note": f"failed: {last}"})
            continue
        rows.append({"case": case.name, **json.loads(out.stdout.strip().splitlines()[-1])})
        if progress is not None:  # each result as it comes: a long run stopped early keeps what it measured
            row = rows[-1]
            result = (
                f"first {row['seconds_first']:.3f} s, steady {row['seconds']:.3f} s, "
                f"+{row['extra_peak_mib']:.0f} MiB extra peak, {row['overhead_mib']:.0f} MiB overhead"
            )
            progress(f"linear {case.name} {variant}: {result}", index + 1, len(jobs))
    if progress is not None:
        progress("done", len(jobs), len(jobs))
    return rows


def format_linear_table(rows: list[dict[str, Any]]) -> str:
    """Times (first step; best and median of the steady steps) and memory (raw extra peak; overhead
    beyond the returned gradients, counting what is kept between steps), each against naive's."""
    head = (f"{'case':<30} {'variant':<14} {'first':>8} {'best':>8} {'median':>8} {'best/naive':>10} "
            f"{'extra peak':>11} {'overhead':>10} {'ovh/naive':>9} {'kept':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]
    naive = {r["case"]: r for r in rows if r["variant"] == "naive" and r.get("seconds")}
    for r in rows:
        if r.get("seconds") is None:
            lines.append(f"{r['case']:<30} {r['variant']:<14} {r.get('note', '-')}")
            continue
        base = naive.get(r["case"])
        t_ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "-"
        m_ratio = f"{r['overhead_mib'] / base['overhead_mib']:.3f}" if base and base["overhead_mib"] > 0 else "-"

        def sec(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}s"

        lines.append(
            f"{r['case']:<30} {r['variant']:<14} {sec(r['seconds_first']):>8} {sec(r['seconds_best']):>8} "
            f"{sec(r['seconds_median']):>8} {t_ratio:>10} {r['extra_peak_mib']:>8.0f}MiB {r['overhead_mib']:>7.0f}MiB "
            f"{m_ratio:>9} {r['kept_between_steps_mib']:>5.0f}MiB"
        )
    return "\n".join(lines)


def draw_linear_memory(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Extra peak memory per variant and case, as grouped bars, on ``ax``."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        values = [next((r.get("extra_peak_mib") or 0 for r in rows if r["case"] == c and r["variant"] == variant), 0)
                  for c in cases]  # fmt: skip
        ax.bar([k + i * width for k in range(len(cases))], values, width, label=variant)
    ax.set_xticks([k + width * (len(VARIANTS) - 1) / 2 for k in range(len(cases))], cases, fontsize=8)
    ax.set_ylabel("extra peak memory (MiB), forward+backward")
    ax.set_title("linear + cross-entropy: memory beyond the inputs", fontsize=10)
    ax.legend(fontsize=8)


def plot_linear_memory(rows: list[dict[str, Any]], path: str) -> None:
    """The memory chart alone, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    draw_linear_memory(ax, rows)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "--child":
    variant, n, d, v, dtype_name, steady_steps = sys.argv[2:]
    print(json.dumps(_child(variant, int(n), int(d), int(v), dtype_name, int(steady_steps))))
