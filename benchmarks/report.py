"""Regenerate the README's and the docs' benchmark tables and chart from the stored JSON results.

Every figure that the README or a design note quotes from a benchmark sits between a pair of markers,

    <!-- report:NAME -->  ...  <!-- /report:NAME -->

and is written here from one result file in ``benchmarks/results/``, headed by the machine that the
result itself names (CPU, instruction set in use, threads, library versions, date): a result measured
on another machine than today's says so. Nothing between the markers is typed by hand.

    python benchmarks/report.py            # rewrite every block and chart from the results there are
    python benchmarks/report.py --check    # exit 1 if a block is not what its result gives (CI runs this)

Adding a result (a JAX or GPU suite, say) is one ``Section`` in ``SECTIONS`` (its file, its marker, a
function from the JSON to markdown) and the two markers in the page that shows it. A section whose
result file is absent renders as a line saying which command produces it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from crossent.bench.linear import bound_up, plot_linear

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


# ---- the machine a result was measured on -------------------------------------------------------


def describe_machine(meta: dict[str, Any]) -> str:
    """One line from a result's own ``machine`` metadata (crossent.bench.machine_metadata)."""
    config = meta.get("crossent_config") or {}
    cpu = meta.get("cpu") or meta.get("machine") or "unknown CPU"
    parts = [f"{cpu}, {meta.get('cpu_count', '?')} logical CPUs ({meta.get('machine', '?')})"]
    if meta.get("gpu"):
        parts.append(str(meta["gpu"]))
    if config:
        kernel = f"crossent {meta.get('crossent', '?')}: "
        if config.get("native"):
            kernel += f"the {config.get('isa', '?')} build of the native kernel on {config.get('threads', '?')} threads"
        else:
            kernel += "the Array-API reference (no native kernel)"
        parts.append(kernel)
    libraries = [f"Python {meta['python']}"] if meta.get("python") else []
    for name, label in (("numpy", "NumPy"), ("torch", "torch"), ("jax", "JAX"), ("triton", "Triton"), ("cuda", "CUDA")):
        if meta.get(name):
            version = f"{label} {meta[name]}"
            if name == "torch" and meta.get("torch_threads"):
                version += f" ({meta['torch_threads']} threads)"
            libraries.append(version)
    parts.append(", ".join(libraries))
    if meta.get("time"):
        parts.append(f"measured {str(meta['time'])[:10]}")
    return "; ".join(parts)


def machine_line(result_name: str, meta: dict[str, Any]) -> str:
    return f"Machine ({_result_link(result_name)}): {describe_machine(meta)}."


def _result_link(result_name: str) -> str:
    return f"`benchmarks/results/{result_name}`"


# ---- number formats ------------------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        ms = seconds * 1e3
        return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(ratio: float | None) -> str:
    return "" if ratio is None else f" ({ratio:.1f}×)" if ratio >= 2 else f" ({ratio:.2f}×)"


# ---- renderers: JSON result -> markdown ----------------------------------------------------------


_KERNEL_PEERS = (("torch", "torch `F.cross_entropy`"), ("jax", "`jax.jit` (optax-style)"), ("numpy", "NumPy"))


def render_kernel(name: str, result: dict[str, Any]) -> str:
    """The kernel suite (benchmarks/kernel.py): each case and mode, crossent against its peers."""
    by_key: dict[tuple[str, str], dict[str, float | None]] = {}
    for r in result["results"]:
        if r.get("group", "main") != "main":
            continue
        by_key.setdefault((r["case"], r["mode"]), {})[r["impl"]] = r["seconds"]
    header = "| case | crossent | " + " | ".join(label for _, label in _KERNEL_PEERS) + " | memory floor |"
    lines = [machine_line(name, result["machine"]), "", header, "|" + "---|" * (len(_KERNEL_PEERS) + 3)]
    for (case, mode), times in by_key.items():
        ours = times.get("crossent")
        if ours is None:
            continue
        cells = [f"{case}, {mode}", fmt_time(ours)]
        for peer, _ in _KERNEL_PEERS:
            theirs = times.get(peer)
            cells.append(fmt_time(theirs) + (fmt_ratio(theirs / ours) if theirs else ""))
        cells.append(fmt_time(times.get("floor")))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Best round of each implementation, timed in turns in one process on the same arrays; "
        "(×) is the peer's time over crossent's. forward+backward materialises the gradient with respect "
        "to the logits. The memory floor is one read of the logits (forward) or one copy of them "
        "(forward+backward) by NumPy.",
    ]
    return "\n".join(lines)


def _steady_seconds(row: dict[str, Any]) -> float | None:
    """A linear-suite variant's best steady step (results before steady steps were timed: its one step)."""
    return row.get("seconds_best", row.get("seconds"))


def render_linear(name: str, result: dict[str, Any]) -> str:
    """The linear + cross-entropy suite (benchmarks/linear.py): time and extra peak memory per variant."""
    labels = {
        "naive": "`x @ W.T`, then `F.cross_entropy`",
        "torch-chunked": "torch `F.linear_cross_entropy` (chunked)",
        "crossent": "`crossent.torch.linear_cross_entropy`",
        "naive+ct": "`x @ W.T`, then `ct.cross_entropy`",
        "naive+ct-inpl": "`x @ W.T`, then `ct.cross_entropy(..., inplace_backward=True)`",
        "token-stats": "`crossent.torch.linear_token_stats` (log_prob, entropy)",
    }
    lines = [machine_line(name, result["machine"]), ""]
    for case in dict.fromkeys(r["case"] for r in result["linear"]):
        rows = [r for r in result["linear"] if r["case"] == case]
        naive = next((r for r in rows if r["variant"] == "naive"), None)
        lines += [
            f"**{case}**",
            "",
            "| variant | first step | steady step (best) | extra peak | overhead beyond the returned gradients |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            label = labels.get(r["variant"], r["variant"])
            if r.get("stopped_after_s") is not None:  # bounds: it would have taken longer, and more memory
                lines.append(
                    f"| {label} | stopped after {r['stopped_after_s']:.0f} s | – | ≥ "
                    f"{r['extra_peak_so_far_mib']:.0f} MiB (so far) | ≥ {r['overhead_so_far_mib']:.0f} MiB (so far) |"
                )
                continue
            if r.get("seconds") is None:  # the child failed: its note, no figures
                lines.append(f"| {label} | {r.get('note', 'failed')} | – | – | – |")
                continue
            steady, overhead = _steady_seconds(r), r.get("overhead_mib")
            first_cell, steady_cell = fmt_time(r.get("seconds_first")), fmt_time(steady)
            overhead_cell = "–" if overhead is None else f"{overhead:.0f} MiB"
            if naive and r is not naive and r.get("seconds_first") and naive.get("stopped_after_s") is not None:
                # Naive's first step took longer than the limit: first steps against it, a bound.
                first_cell += f" (< {bound_up(r['seconds_first'] / naive['stopped_after_s'], 2)}× naive's)"
                if overhead is not None and naive["overhead_so_far_mib"] > 0:
                    overhead_cell += f" (≤ {bound_up(100 * overhead / naive['overhead_so_far_mib'], 1)}% of naive's)"
            elif naive and r is not naive and steady and _steady_seconds(naive):
                steady_cell += f" ({steady / _steady_seconds(naive):.2f}× naive)"
                if overhead is not None and naive.get("overhead_mib"):
                    overhead_cell += f" ({100 * overhead / naive['overhead_mib']:.1f}% of naive's)"
            lines.append(
                f"| {label} | {first_cell} | {steady_cell} | {r.get('extra_peak_mib') or 0:.0f} MiB | {overhead_cell} |"
            )
        lines.append("")
    lines.append(
        "Each variant in a process of its own per round, the variants of a case in turns: its first step, "
        "then the best of the steady steps after it, from its best round (memory: the largest of its rounds). "
        "Extra peak: peak RSS during the steps minus RSS with the inputs in place. Overhead: the extra peak "
        "less the gradients every variant returns (input and weight gradients in the parameters' dtype), "
        "with what is kept between steps (crossent's buffer cache) counted. A variant still running at "
        "the time limit was stopped: its peak so far bounds its peak below."
    )
    compiled = result.get("compile")
    if compiled:  # benchmarks/linear.py without --no-compile
        n, v = compiled["shape"]
        lines += [
            "",
            f"The drop-in `ct.cross_entropy` under `torch.compile(fullgraph=True)`, {n}×{v} float32 "
            f"forward+backward, in turns with eager torch: {fmt_time(compiled['crossent_compiled_s'])} against "
            f"{fmt_time(compiled['eager_torch_s'])} ({compiled['speedup']:.1f}×).",
        ]
    for rates in result.get("gemm_rates", []):  # benchmarks/linear.py --gemm-rates
        half = rates["dtype"]
        products = [k.removeprefix(f"{half} ").removesuffix(" GFLOP/s") for k in rates if k.startswith(f"{half} ")]
        cells = [f"`{p}` {rates[f'{half} {p} GFLOP/s']:.2f} ({rates[f'float32 {p} GFLOP/s']:.0f})" for p in products]
        lines += [
            "",
            f"torch's three matmuls of the {half} case on {rates['rows']} of its rows, GFLOP/s in {half} "
            f"(in float32): {', '.join(cells)}.",
        ]
    return "\n".join(lines)


def render_linear_summary(name: str, result: dict[str, Any]) -> str:
    """One paragraph for the README: crossent's steady step and overhead against the naive loss's, per case."""
    meta = result["machine"]
    parts = []
    for case in dict.fromkeys(r["case"] for r in result["linear"]):
        rows = {r["variant"]: r for r in result["linear"] if r["case"] == case}
        ours, naive = rows.get("crossent"), rows.get("naive")
        if ours is None or naive is None or _steady_seconds(ours) is None:
            continue
        if naive.get("stopped_after_s") is not None:  # bounds: naive's first step outlasted the limit
            part = (f"{case}: first step under {bound_up(ours['seconds_first'] / naive['stopped_after_s'], 2)}× "
                    f"naive's (stopped after {naive['stopped_after_s']:.0f} s)")  # fmt: skip
            if naive["overhead_so_far_mib"] > 0:
                share = bound_up(100 * ours["overhead_mib"] / naive["overhead_so_far_mib"], 1)
                part += f", at most {share}% of its overhead"
            parts.append(part)
        elif _steady_seconds(naive):
            part = f"{case}: {_steady_seconds(ours) / _steady_seconds(naive):.2f}× its time"
            if naive.get("overhead_mib", 0) > 0:
                part += f", {100 * ours['overhead_mib'] / naive['overhead_mib']:.1f}% of its overhead"
            parts.append(part)
    if not parts:
        return f"No case of {_result_link(name)} has both crossent and the naive loss measured."
    return (
        "The fused linear loss against the naive `x @ W.T` then `F.cross_entropy`, steady steps, each in a "
        f"process of its own ({_result_link(name)}: {meta.get('cpu', '?')}, {meta.get('cpu_count', '?')} logical "
        f"CPUs, {meta.get('time', '?')[:10]}): " + "; ".join(parts) + ". Overhead: memory a step adds beyond "
        "the gradients it returns. Tables and chart: [the design note](docs/design/linear-loss.md)."
    )


def render_distributed(name: str, result: dict[str, Any]) -> str:
    """The vocabulary-parallel suite (benchmarks/distributed.py): one process against ranks over gloo."""
    rows, classes = result["shape"]
    n, d, v = result["linear_shape"]
    ranks = result["ranks"]
    return "\n".join(
        [
            machine_line(name, result["machine"]),
            "",
            f"| forward+backward | one process | {ranks} ranks ({result['threads_per_rank']} thread each) |",
            "|---|---|---|",
            f"| {rows}×{classes} float32 logits | {fmt_time(result['single_process_s'])} | "
            f"{fmt_time(result['vocab_parallel_s'])} |",
            f"| linear loss, {n}×{d} hidden rows, {v}×{d} layer | {fmt_time(result['single_process_linear_s'])} | "
            f"{fmt_time(result['vocab_parallel_linear_s'])} |",
            "",
            f"All-reduced per forward: {result['allreduce_payload_bytes_per_forward'] / 1024:.0f} KiB, against "
            f"{result['gathered_logits_bytes'] / 2**20:.0f} MiB to gather the logits.",
        ]
    )


_JAX_IMPLS = (
    ("crossent.jax (auto)", "crossent.jax"),
    ("crossent.jax (jnp)", "crossent.jax, jnp backend"),
    ("optax", "optax"),
    ("jax.nn.logsumexp", "`jax.nn.logsumexp` by hand"),
    ("numpy kernel", "crossent, NumPy kernel"),
    ("fresh-buffer floor", "fresh-buffer floor"),
)


def render_jax(name: str, result: dict[str, Any]) -> str:
    """crossent.jax under jit (benchmarks/jax_losses.py): each loss's best time per shape, mode and where
    the logits come from, the ratio to crossent.jax's; then the linear loss's memory and time."""
    env = result.get("malloc_env") or {}
    allocator = ", ".join(f"`{k}={v}`" for k, v in env.items()) or "glibc's default allocator settings"
    cases = dict.fromkeys((tuple(r["shape"]), r["mode"], r["logits"]) for r in result["losses"])
    best = {(tuple(r["shape"]), r["mode"], r["logits"], r["impl"]): r for r in result["losses"]}
    lines = [machine_line(name, result["machine"]) + f" Allocator: {allocator}.", ""]
    lines.append("| case | " + " | ".join(label for _, label in _JAX_IMPLS) + " |")
    lines.append("|" + "---|" * (len(_JAX_IMPLS) + 1))
    for shape, mode, logits in cases:
        cells = [f"{'x'.join(map(str, shape))} {mode}, logits {'as argument' if logits == 'argument' else logits}"]
        for impl, _ in _JAX_IMPLS:
            row = best.get((shape, mode, logits, impl))
            cells.append("–" if row is None else fmt_time(row["best_ms"] / 1e3) + fmt_ratio(row["vs_crossent"]))
        lines.append("| " + " | ".join(cells) + " |")
    lin = result["linear"]
    mib = {k: v["temp_bytes"] / 2**20 for k, v in lin["memory"].items()}
    lines += [
        "",
        "Best of the rounds, each implementation timed in turns in one process; (×) is the time over "
        "crossent.jax's. value_and_grad with the logits inside differentiates through `x * s`; the floor "
        "is the first touch of a new buffer of the logits' size (no loss computed).",
        "",
        f"Linear loss, N={lin['n']} D={lin['d']} V={lin['v']} float32, `value_and_grad` with respect to hidden "
        f"and kernel: compiled temporaries {mib['linear']:.1f} MiB against the naive `hidden @ kernel` loss's "
        f"{mib['naive']:.1f} MiB ({100 * lin['temp_beyond_gradient_ratio']:.1f}% of it beyond the D×V "
        f"gradient accumulator), time {lin['time_ratio']:.2f}× naive's (median {lin['median_time_ratio']:.2f}×); "
        f"with vocabulary chunks {mib['linear (vocab chunks)']:.1f} MiB, {lin['vocab_time_ratio']:.2f}× "
        "naive's time.",
    ]
    return "\n".join(lines)


# ---- charts --------------------------------------------------------------------------------------


def chart_linear(name: str, result: dict[str, Any], path: pathlib.Path) -> None:
    """The linear suite's time and memory overhead per variant and case, the machine under them."""
    plot_linear(result["linear"], str(path), caption=describe_machine(result["machine"]))


def chart_sweep(name: str, result: dict[str, Any], path: pathlib.Path) -> None:
    """Time against vocabulary size (the kernel suite's sweep cases), the machine under the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crossent.bench.suite import Result, draw_sweep

    results = [Result(**{**r, "shape": tuple(r["shape"])}) for r in result["results"]]
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=100)
    draw_sweep(ax, results)
    fig.text(0.5, 0.01, describe_machine(result["machine"]), ha="center", va="bottom", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the same result gives the same file
    plt.close(fig)


# ---- what goes where -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    marker: str  # <!-- report:marker --> ... <!-- /report:marker -->
    page: str  # relative to the repository root
    result: str  # relative to benchmarks/results/
    render: Callable[[str, dict[str, Any]], str]
    command: str  # what produces the result, for a section whose result is absent


@dataclass(frozen=True)
class Chart:
    path: str  # relative to the repository root
    result: str
    draw: Callable[[str, dict[str, Any], pathlib.Path], None]


KERNEL_COMMAND = "python benchmarks/kernel.py --out benchmarks/results/reference-run.json"
LINEAR_COMMAND = (
    "python benchmarks/linear.py --variants naive,crossent,torch-chunked,naive+ct-inpl,token-stats --gemm-rates 64 "
    "--out benchmarks/results/linear-reference-run.json"
)
JAX_COMMAND = "python benchmarks/jax_losses.py --out benchmarks/results/jax-reference-run.json"
JAX_MALLOC_COMMAND = (
    "MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_ARENA_MAX=1 "
    "python benchmarks/jax_losses.py --out benchmarks/results/jax-malloc-run.json"
)
SECTIONS = [
    Section("kernel", "README.md", "reference-run.json", render_kernel, KERNEL_COMMAND),
    Section("kernel", "docs/design/benchmarking.md", "reference-run.json", render_kernel, KERNEL_COMMAND),
    Section("linear", "docs/design/linear-loss.md", "linear-reference-run.json", render_linear, LINEAR_COMMAND),
    Section("linear-summary", "README.md", "linear-reference-run.json", render_linear_summary, LINEAR_COMMAND),
    Section("jax", "docs/jax-ffi.md", "jax-reference-run.json", render_jax, JAX_COMMAND),
    Section("jax-malloc", "docs/jax-ffi.md", "jax-malloc-run.json", render_jax, JAX_MALLOC_COMMAND),
    Section(
        "distributed",
        "docs/design/vocab-parallel.md",
        "distributed-reference-run.json",
        render_distributed,
        "python benchmarks/distributed.py --out benchmarks/results/distributed-reference-run.json",
    ),
]
CHARTS = [
    Chart("benchmarks/results/sweep.png", "reference-run.json", chart_sweep),
    Chart("benchmarks/results/linear.png", "linear-reference-run.json", chart_linear),
]


def load(result: str) -> dict[str, Any] | None:
    path = RESULTS / result
    return json.loads(path.read_text()) if path.exists() else None


def block(section: Section) -> str:
    result = load(section.result)
    if result is None:
        return f"No result yet: `{section.command}` writes {_result_link(section.result)}."
    return section.render(section.result, result)


def replace_blocks(text: str, page: str, rendered: dict[str, str]) -> str:
    for marker, body in rendered.items():
        pattern = re.compile(rf"(<!-- report:{re.escape(marker)} -->\n).*?(<!-- /report:{re.escape(marker)} -->)", re.S)
        found = pattern.search(text)
        if found is None:
            raise SystemExit(f"{page}: no '<!-- report:{marker} -->' ... '<!-- /report:{marker} -->' markers")
        text = text[: found.end(1)] + body + "\n" + text[found.start(2) :]
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a page's blocks differ from their results")
    parser.add_argument("--no-charts", action="store_true", help="rewrite the tables only")
    args = parser.parse_args(argv)

    stale = []
    for page in dict.fromkeys(s.page for s in SECTIONS):
        path = ROOT / page
        if not path.exists():
            continue  # a page another change has not added yet
        text = path.read_text()
        new = replace_blocks(text, page, {s.marker: block(s) for s in SECTIONS if s.page == page})
        if new != text:
            stale.append(page)
            if not args.check:
                path.write_text(new)
                print(f"wrote {page}")
    if args.check:
        for page in stale:
            print(f"{page}: benchmark blocks differ from their results; run python benchmarks/report.py")
        return 1 if stale else 0
    if not args.no_charts:
        for chart in CHARTS:
            result = load(chart.result)
            if result is not None:
                chart.draw(chart.result, result, ROOT / chart.path)
                print(f"wrote {chart.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
