"""Turning an explain trace into text (plain, or rich when installed), JSON, or a PNG plot."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from typing import Any

from .trace import Trace

# Rows and classes shown before a large input is summarised.
MAX_CLASSES_SHOWN = 8


def _num(v: float | None, width: int = 9) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.4f}"


def _logits_cell(values: list[float]) -> str:
    shown = ", ".join(f"{v:.4f}" for v in values[:MAX_CLASSES_SHOWN])
    more = len(values) - MAX_CLASSES_SHOWN
    return f"[{shown}{f', ... +{more}' if more > 0 else ''}]"


def _target_cell(row: Any) -> str:
    if isinstance(row.target, list):
        return "p=" + _logits_cell(row.target)
    return f"{row.target} (ignored)" if row.ignored else str(row.target)


def _table_rows(trace: Trace) -> tuple[list[str], list[list[str]]]:
    o = trace.options
    smoothing = o.label_smoothing > 0 and not trace.probability_target
    logits = "capped logits x" if o.softcap is not None else "logits x"
    header = ["row", logits, "target", "max m", "logsumexp", "-x[class]", "w[class]"]
    header += ["smoothing"] * smoothing + ["z-loss"] * (o.z_loss > 0) + ["loss"]
    body = []
    for row in trace.rows:
        cells = [
            ",".join(map(str, row.index)) or "0",
            _logits_cell(row.logits if row.capped_logits is None else row.capped_logits),
            _target_cell(row),
            f"{row.max:.4f}",
            f"{row.logsumexp:.4f}",
            "-" if row.minus_target_logit is None else f"{row.minus_target_logit:+.4f}",
            f"{row.weight:g}",
        ]
        if smoothing:
            cells.append("-" if row.smoothing is None else f"{row.smoothing:.4f}")
        if o.z_loss > 0:
            cells.append("-" if row.z_term is None else f"{row.z_term:.4f}")
        body.append([*cells, f"{row.loss:.4f}"])
    return header, body


def _summary_lines(trace: Trace) -> list[str]:
    o = trace.options
    lines = []
    if trace.omitted_rows:
        lines.append(f"... {trace.omitted_rows} more rows not shown (of {trace.omitted_rows + len(trace.rows)})")
    lines.append(f"sum of per-element losses = {trace.total:.6f}")
    if o.reduction == "mean":
        kind = "number of rows" if trace.probability_target else "sum of w[class] over non-ignored targets"
        lines.append(f"mean = sum / {kind} = {trace.total:.6f} / {trace.denominator:g}")
    if isinstance(trace.loss, list):
        lines.append(f"loss (reduction='none'): {len(trace.loss)} values, shown per row above")
    else:
        lines.append(f"loss ({o.reduction}) = {trace.loss:.4f}")
    return lines


def _check_lines(trace: Trace) -> list[str]:
    lines = ["identities:"]
    for check in trace.checks:
        mark = "ok " if check.holds else "FAIL"
        lines.append(f"  [{mark}] {check.name}   (largest difference {check.difference:.2e})")
    if trace.frameworks:
        lines.append("cross-checks:")
    for entry in trace.frameworks:
        if "difference" in entry:
            lines.append(
                f"  {entry['framework']} {entry['version']}: largest difference from crossent {entry['difference']:.2e}"
            )
        else:
            lines.append(f"  {entry['framework']} {entry['version']}: {entry['note']}")
    return lines


def _heading(trace: Trace) -> list[str]:
    o = trace.options
    opts = [f"reduction={o.reduction!r}"]
    if o.weight is not None:
        opts.append(f"weight={o.weight}")
    if o.ignore_index != -100:
        opts.append(f"ignore_index={o.ignore_index}")
    if o.label_smoothing:
        opts.append(f"label_smoothing={o.label_smoothing}")
    for name in ("z_loss", "softcap", "axis"):
        value = getattr(o, name)
        if value not in (None, 0.0):
            opts.append(f"{name}={value}")
    kind = "class probabilities" if trace.probability_target else "class indices"
    return [
        f"== {trace.title} ==",
        f"logits of shape {trace.shape}, classes on axis {trace.class_axis}, targets are {kind}; {', '.join(opts)}",
        *_formula(trace),
    ]


def _formula(trace: Trace) -> list[str]:
    """The per-row formula, with a term for each option that adds one (torch's label smoothing, with
    weights; crossent's z-loss and soft cap)."""
    o = trace.options
    lines = []
    if o.softcap is not None:
        lines.append(f"capped logits: x = {o.softcap:g} * tanh(logits / {o.softcap:g})  (softcap)")
    if trace.probability_target:
        eps = f", t' = (1 - {o.label_smoothing:g}) t + {o.label_smoothing:g} / C" if o.label_smoothing else ""
        loss = f"sum_c w[c] * t'[c] * (logsumexp(x) - x[c]){eps or ', t = the target probabilities'}"
    elif o.label_smoothing:
        eps = f"{o.label_smoothing:g}"
        loss = f"(1 - {eps}) * w[class] * (-x[class] + logsumexp(x)) + smoothing,"
        lines.append(f"per row: loss = {loss}  smoothing = {eps} / C * sum_c w[c] * (logsumexp(x) - x[c])")
        loss = ""
    else:
        loss = "w[class] * (-x[class] + logsumexp(x))"
    if loss:
        lines.append(f"per row: loss = {loss}")
    if o.z_loss:
        lines.append(f"  + z-loss = {o.z_loss:g} * logsumexp(x)^2 on every row that counts")
    lines.append("logsumexp(x) = m + log(sum_j exp(x_j - m)),  m = max_j x_j")
    return lines


def render_plain(trace: Trace) -> str:
    header, body = _table_rows(trace)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = _heading(trace)
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines + _summary_lines(trace) + _check_lines(trace))


def render_rich(trace: Trace) -> Any:
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    header, body = _table_rows(trace)
    table = Table(*header, title=None, show_lines=False)
    for r in body:
        table.add_row(*map(escape, r))  # a cell such as "[inf, 1.0]" would otherwise read as rich markup
    parts: list[Any] = [Text(line) for line in _heading(trace)]
    parts.append(table)
    parts += [Text(line) for line in _summary_lines(trace)]
    for line in _check_lines(trace):
        style = "red" if "[FAIL]" in line else ("green" if "[ok" in line else "")
        parts.append(Text(line, style=style))
    return Group(*parts)


def print_trace(trace: Trace, *, plain: bool = False) -> None:
    if not plain and importlib.util.find_spec("rich") is not None:
        from rich.console import Console

        Console().print(render_rich(trace))
    else:
        print(render_plain(trace))


def _strict_json(value: Any) -> Any:
    """``value`` with every non-finite float as the string "inf", "-inf" or "nan": JSON has no such
    numbers (Python's json would write the non-standard tokens Infinity and NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value


def trace_json(traces: list[Trace]) -> str:
    """The traces as standard JSON; non-finite numbers as the strings "inf", "-inf", "nan"."""

    def as_dict(trace: Trace) -> dict[str, Any]:
        d = dataclasses.asdict(trace)
        d["checks"] = [{**dataclasses.asdict(c), "holds": c.holds} for c in trace.checks]
        return d

    return json.dumps(_strict_json({"traces": [as_dict(t) for t in traces]}), indent=2, allow_nan=False)


# The plot: one panel per shown row (at most PLOT_ROWS), probabilities as bars, the target in red.
PLOT_ROWS = 8
PLOT_WIDTH_IN, PLOT_ROW_HEIGHT_IN, PLOT_DPI = 8.0, 1.6, 100


def plot_size(trace: Trace) -> tuple[int, int]:
    """The PNG's size in pixels for this trace."""
    n = max(1, min(PLOT_ROWS, len(trace.rows)))
    return int(PLOT_WIDTH_IN * PLOT_DPI), round(PLOT_ROW_HEIGHT_IN * n * PLOT_DPI)


def write_plot(trace: Trace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = trace.rows[:PLOT_ROWS]
    n = max(1, len(rows))
    fig, axes = plt.subplots(n, 1, figsize=(PLOT_WIDTH_IN, PLOT_ROW_HEIGHT_IN * n), dpi=PLOT_DPI, squeeze=False)
    for ax, row in zip(axes[:, 0], rows, strict=False):  # one axis even when there is no row
        probs = row.probabilities
        colors = ["#4c72b0"] * len(probs)
        if isinstance(row.target, int) and not row.ignored:
            colors[row.target] = "#c44e52"
        ax.bar(range(len(probs)), probs, color=colors)
        ax.set_ylim(0, 1)
        label = "ignored" if row.ignored else f"target {row.target}" if isinstance(row.target, int) else "soft target"
        ax.set_title(f"row {','.join(map(str, row.index)) or 0}: {label}, loss {row.loss:.4f}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{trace.title}: softmax probabilities (target class in red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)  # no bbox_inches="tight": the size stays what plot_size says
    plt.close(fig)
