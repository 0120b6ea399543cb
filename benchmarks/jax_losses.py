"""Benchmark crossent.jax against optax and a hand-written jax.nn.logsumexp loss, all under jax.jit.

    python benchmarks/jax_losses.py            # 4096x32768 and 8x21x256x256 float32, linear loss at 2048x512x32768
    python benchmarks/jax_losses.py --quick    # small sizes, to check that it runs end to end

The public functions, as a user calls them: forward and value_and_grad, each with the logits passed in
as an argument (XLA may not overwrite an argument, so a loss whose gradient takes the logits' buffer
gets a copy of them first) and computed inside the program (``x * s``, dead after the loss, as a
matmul's output would be; value_and_grad is then d/ds, the logits' gradient a temporary, as before a
matmul's backward). All timed in turns in one process (crossent.bench.rounds_in_turns): crossent.jax
with its default backend (the FFI kernel on the CPU where built) and with "jnp" forced, optax, a
hand-written loss, crossent's NumPy kernel (argument rows), and the fresh-buffer floor: the first touch
of a new gradient-sized buffer (anonymous mmap, one write per page, by as many threads as crossent's),
which is what an XLA program pays for each large buffer it mallocs unless the allocator reuses freed
memory (docs/jax-ffi.md). The
linear loss's compiled temporary memory (memory_analysis, a deterministic figure) and time against the
naive ``cross_entropy(hidden @ kernel)``. Writes JSON with the machine's metadata (and the MALLOC_*
environment, which changes the figures) to benchmarks/results/jax-<time>.json, or to --out.
"""

from __future__ import annotations

import argparse
import mmap
import os
import pathlib
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import crossent
import crossent.jax as cj
from crossent.bench import write_report
from crossent.bench.suite import rounds_in_turns

_REFERENCE = "crossent.jax (auto)"


def _handwritten(x: Any, y: Any, axis: int) -> Any:
    lse = jax.nn.logsumexp(x, axis=axis)
    picked = jnp.squeeze(jnp.take_along_axis(x, jnp.expand_dims(y, axis), axis=axis), axis)
    return jnp.mean(lse - picked)


def _losses(axis: int) -> dict[str, Any]:
    def with_backend(name: str) -> Any:
        def loss(x: Any, y: Any) -> Any:
            return cj.cross_entropy(x, y, axis=axis)

        return name, loss

    losses = {
        "optax": lambda x, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x, y, axis=axis)),
        "jax.nn.logsumexp": lambda x, y: _handwritten(x, y, axis),
    }
    return {_REFERENCE: with_backend("auto"), "crossent.jax (jnp)": with_backend("jnp"), **losses}


def _jitted(fn: Any, mode: str, logits: str, args: tuple[Any, ...]) -> Any:
    """fn compiled for ``args`` (``(x, y)``, or ``(s, x, y)`` with the logits ``x * s`` made inside).
    ``(backend, fn)``: traced under that backend."""
    backend, fn = fn if isinstance(fn, tuple) else (None, fn)
    if logits == "inside":
        loss = fn
        fn = lambda s, x, y: loss(x * s, y)  # noqa: E731
    f = jax.jit(fn if mode == "forward" else jax.value_and_grad(fn))
    with cj.use_backend(backend or cj.current_backend()):  # read when traced: trace now, under it
        return f.lower(*args).compile()


def first_touch(nbytes: int, pool: ThreadPoolExecutor, threads: int) -> None:
    """Map ``nbytes`` of fresh anonymous memory and write one byte per page, in ``threads`` parts at
    once (as the kernel's threads write a gradient): the page faults a new buffer of that size costs,
    which no kernel writing into it can avoid."""
    with mmap.mmap(-1, nbytes) as m:
        pages = np.frombuffer(m, np.uint8)
        part = -(-nbytes // threads)
        parts = [pages[i * part : (i + 1) * part : mmap.PAGESIZE] for i in range(threads)]
        list(pool.map(np.ndarray.fill, parts, [1] * threads))
        del pages, parts  # the views must go before the map closes


def bench_loss(shape: tuple[int, ...], axis: int, rounds: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    xn = rng.standard_normal(shape, dtype=np.float32)
    batch = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    yn = rng.integers(0, shape[axis], batch).astype(np.int32)
    x, y = jnp.asarray(xn), jnp.asarray(yn)
    s = jnp.float32(1.0)
    pool = ThreadPoolExecutor(crossent.get_num_threads())
    rows = []
    for mode in ["forward", "value_and_grad"]:
        for logits in ["argument", "inside"]:
            calls: dict[str, Any] = {}
            for name, fn in _losses(axis).items():
                args = (s, x, y) if logits == "inside" else (x, y)
                f = _jitted(fn, mode, logits, args)
                calls[name] = lambda f=f, args=args: jax.block_until_ready(f(*args))
            if logits == "argument" and mode == "forward":
                calls["numpy kernel"] = lambda: crossent.cross_entropy(xn, yn, axis=axis)
            elif logits == "argument":
                calls["numpy kernel"] = lambda: crossent.cross_entropy_and_grad(xn, yn, axis=axis)
                threads = crossent.get_num_threads()
                calls["fresh-buffer floor"] = lambda threads=threads: first_touch(xn.nbytes, pool, threads)
            times = rounds_in_turns(calls, rounds)
            best = {name: min(t) for name, t in times.items()}
            for name, t in times.items():
                rows.append({
                    "shape": list(shape), "axis": axis, "dtype": "float32", "mode": mode, "logits": logits,
                    "impl": name, "best_ms": 1e3 * min(t), "median_ms": 1e3 * statistics.median(t),
                    "rounds": len(t), "vs_crossent": min(t) / best[_REFERENCE],
                })  # fmt: skip
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's figures per shape: optax's value_and_grad over crossent's, crossent's over the NumPy
    kernel's (logits as an argument), and the fresh-buffer floor beside their difference."""
    out: dict[str, Any] = {}
    for shape in {tuple(r["shape"]) for r in rows}:
        ms = {(r["mode"], r["logits"], r["impl"]): r["best_ms"] for r in rows if tuple(r["shape"]) == shape}
        ref = ms[("value_and_grad", "argument", _REFERENCE)]
        out["x".join(map(str, shape))] = {
            "optax_over_crossent_value_and_grad": ms[("value_and_grad", "argument", "optax")] / ref,
            "optax_over_crossent_value_and_grad_inside": ms[("value_and_grad", "inside", "optax")]
            / ms[("value_and_grad", "inside", _REFERENCE)],
            "crossent_minus_numpy_kernel_ms": ref - ms[("value_and_grad", "argument", "numpy kernel")],
            "fresh_buffer_floor_ms": ms[("value_and_grad", "argument", "fresh-buffer floor")],
        }
    return out


def bench_linear(n: int, d: int, v: int, rounds: int, chunk: int | None) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d))
    k = jnp.asarray(rng.standard_normal((d, v), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, v, n).astype(np.int32))
    steps = {
        "naive": jax.jit(jax.value_and_grad(lambda h, k, y: cj.cross_entropy(h @ k, y), argnums=(0, 1))),
        "linear": jax.jit(
            jax.value_and_grad(lambda h, k, y: cj.linear_cross_entropy(h, k, y, chunk_size=chunk), argnums=(0, 1))
        ),
        "linear (vocab chunks)": jax.jit(
            jax.value_and_grad(
                lambda h, k, y: cj.linear_cross_entropy(h, k, y, chunk_size=64, vocab_chunk_size=8192), argnums=(0, 1)
            )
        ),
    }
    memory = {}
    for name, step in steps.items():
        m = step.lower(h, k, y).compile().memory_analysis()
        memory[name] = {"temp_bytes": int(m.temp_size_in_bytes), "output_bytes": int(m.output_size_in_bytes)}
    times = rounds_in_turns(
        {name: (lambda s=s: jax.block_until_ready(s(h, k, y))) for name, s in steps.items()}, rounds
    )
    gradient_bytes = d * v * 4  # the float32 kernel-gradient accumulator, the size of a returned gradient
    return {
        "n": n, "d": d, "v": v, "chunk_size": chunk, "memory": memory,
        "temp_ratio": memory["linear"]["temp_bytes"] / memory["naive"]["temp_bytes"],
        "temp_beyond_gradient_ratio": (memory["linear"]["temp_bytes"] - gradient_bytes) / memory["naive"]["temp_bytes"],
        "vocab_temp_ratio": memory["linear (vocab chunks)"]["temp_bytes"] / memory["naive"]["temp_bytes"],
        "best_ms": {name: 1e3 * min(t) for name, t in times.items()},
        "time_ratio": min(times["linear"]) / min(times["naive"]),
        "vocab_time_ratio": min(times["linear (vocab chunks)"]) / min(times["naive"]),
        "median_time_ratio": statistics.median(times["linear"]) / statistics.median(times["naive"]),
        # Issue #17's target: time <= 1.2x naive, temporaries beyond the gradient <= 10% of naive's.
        "target": {"time_ratio": 1.2, "temp_beyond_gradient_ratio": 0.1},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script end to end")
    parser.add_argument("--rounds", type=int, help="timed rounds per implementation")
    parser.add_argument("--out", type=pathlib.Path, help="JSON file to write")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    if args.quick:
        cases, linear = [((256, 1024), -1), ((2, 5, 16, 16), 1)], (256, 64, 2048)
    else:
        cases, linear = [((4096, 32768), -1), ((8, 21, 256, 256), 1)], (2048, 512, 32768)
    rows = []
    for shape, axis in cases:
        print(f"loss {shape} axis={axis}", file=sys.stderr, flush=True)
        rows += bench_loss(shape, axis, rounds)
    for row in rows:
        print(f"{row['mode']:15} {row['logits']:9} {row['shape']!s:22} {row['impl']:20} {row['best_ms']:9.2f} ms "
              f"x{row['vs_crossent']:.2f}")  # fmt: skip
    figures = summary(rows)
    for size, fig in figures.items():
        print(f"{size}: optax / crossent value_and_grad x{fig['optax_over_crossent_value_and_grad']:.2f} "
              f"(logits inside x{fig['optax_over_crossent_value_and_grad_inside']:.2f}); crossent - NumPy kernel "
              f"{fig['crossent_minus_numpy_kernel_ms']:.1f} ms, fresh-buffer floor "
              f"{fig['fresh_buffer_floor_ms']:.1f} ms")  # fmt: skip
    print(f"linear {linear}", file=sys.stderr, flush=True)
    lin = bench_linear(*linear, rounds=max(2, rounds // 3), chunk=None)
    print(f"linear loss temp memory {lin['memory']['linear']['temp_bytes'] / 2**20:.1f} MiB vs naive "
          f"{lin['memory']['naive']['temp_bytes'] / 2**20:.1f} MiB ({lin['temp_ratio']:.3f}; beyond the kernel "
          f"gradient {lin['temp_beyond_gradient_ratio']:.3f}), time x{lin['time_ratio']:.2f} (median "
          f"x{lin['median_time_ratio']:.2f}); vocabulary chunks: "
          f"temp {lin['vocab_temp_ratio']:.3f} of naive, time x{lin['vocab_time_ratio']:.2f}")  # fmt: skip
    payload = {
        "jax": jax.__version__, "optax": optax.__version__, "backend": cj.current_backend(),
        "ffi_available": cj.ffi_available(), "page_size": mmap.PAGESIZE,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"},
        "summary": figures, "losses": rows, "linear": lin,
    }  # fmt: skip
    write_report(payload, args.out, "jax", pathlib.Path(__file__).parent / "results")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
