"""The native kernel inside XLA (crossent.jax._ffi) against the same kernel called from NumPy and against
jnp/optax losses under jit, in one process, in alternating rounds.

    python benchmarks/jax_ffi.py [--rows 4096] [--classes 32768] [--rounds 7] [--repeats 3] [--threads N] [--out FILE]

float32 logits and int32 class indices, mean reduction. "forward" is the loss alone; "forward+grad" the
loss and d(loss)/d(logits) for a unit upstream gradient (jnp and optax: jax.value_and_grad under jit).
Every variant runs once per round, in turn, so that a noisy machine slows them alike; the figure is the
median over rounds of each round's best of ``repeats`` calls. Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import crossent
from crossent import _native
from crossent._validate import LossOptions, LossShape
from crossent.bench import write_report
from crossent.jax import _ffi


def _jnp_loss(x: Any, t: Any) -> Any:
    lse = jax.nn.logsumexp(x, axis=-1)
    picked = jnp.take_along_axis(x, t[:, None], axis=-1)[:, 0]
    return jnp.mean(lse - picked)


def variants(rows: int, classes: int) -> dict[str, Callable[[], Any]]:
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((rows, classes), dtype=np.float32)
    t_np = rng.integers(0, classes, rows).astype(np.int32)
    x, t = jnp.asarray(x_np), jnp.asarray(t_np)
    opts = LossOptions()
    shape = LossShape(1, classes, (rows,), False)
    kw = {"outer": rows, "classes": classes, "inner": 1, "probability": False, "opts": opts}

    @jax.jit
    def ffi_forward(x: Any, t: Any) -> Any:
        return _ffi.cross_entropy_fwd(x[:, :, None], t[:, None], None, None, **kw, want_grad=False)[0]

    @jax.jit
    def ffi_grad(x: Any, t: Any) -> Any:
        loss, grad = _ffi.cross_entropy_fwd(x[:, :, None], t[:, None], None, None, **kw, want_grad=True)
        return loss, grad.reshape(x.shape)

    jnp_forward = jax.jit(_jnp_loss)
    jnp_grad = jax.jit(jax.value_and_grad(_jnp_loss))
    out: dict[str, Callable[[], Any]] = {
        "ffi forward": lambda: jax.block_until_ready(ffi_forward(x, t)),
        "numpy kernel forward": lambda: crossent.cross_entropy(x_np, t_np),
        "jnp forward": lambda: jax.block_until_ready(jnp_forward(x, t)),
        "ffi forward+grad": lambda: jax.block_until_ready(ffi_grad(x, t)),
        "numpy kernel forward+grad": lambda: _native.KERNEL.cross_entropy_and_grad(x_np, t_np, None, shape, opts, None),
        "jnp forward+grad": lambda: jax.block_until_ready(jnp_grad(x, t)),
    }
    try:
        import optax
    except ImportError:
        return out

    def optax_loss(x: Any, t: Any) -> Any:
        return optax.softmax_cross_entropy_with_integer_labels(x, t).mean()

    optax_forward, optax_grad = jax.jit(optax_loss), jax.jit(jax.value_and_grad(optax_loss))
    out["optax forward"] = lambda: jax.block_until_ready(optax_forward(x, t))
    out["optax forward+grad"] = lambda: jax.block_until_ready(optax_grad(x, t))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="crossent's threads (default: its own)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        crossent.set_num_threads(args.threads)
    if not _ffi.available():
        raise SystemExit(f"crossent's XLA FFI handlers are not available: {crossent.config()['xla_ffi']}")
    fns = variants(args.rows, args.classes)
    for fn in fns.values():
        fn()  # compile and warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            times[name].append(best)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{args.rows} x {args.classes} float32, {crossent.get_num_threads()} threads, median of {args.rounds} rounds")
    for name, m in medians.items():
        print(f"  {name:28s} {m * 1e3:9.2f} ms")
    ratios = {}
    for kind in ("forward", "forward+grad"):
        ffi = medians[f"ffi {kind}"]
        for peer in ("numpy kernel", "jnp", "optax"):
            if f"{peer} {kind}" in medians:
                ratios[f"{peer} / ffi, {kind}"] = medians[f"{peer} {kind}"] / ffi
    for name, r in ratios.items():
        print(f"  {name:36s} {r:6.2f}x")
    payload = {
        "benchmark": "jax_ffi",
        "rows": args.rows,
        "classes": args.classes,
        "threads": crossent.get_num_threads(),
        "seconds": times,
        "median_seconds": medians,
        "ratios": ratios,
    }
    write_report(payload, args.out, "jax_ffi", directory=__import__("pathlib").Path("benchmarks/results"))
    return payload


if __name__ == "__main__":
    main()
