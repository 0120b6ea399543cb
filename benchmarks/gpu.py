"""Benchmark crossent's Triton kernel on a GPU: cross-entropy on logits and the fused linear loss.

    python benchmarks/gpu.py              # on a CUDA/ROCm GPU: the issue's shapes (several minutes)
    python benchmarks/gpu.py --tiny       # on CPU tensors under Triton's interpreter, tiny shapes:
                                          # proves the script runs end to end; its times mean nothing

Cross-entropy on logits (N x V; bfloat16 and float32; forward, and forward + backward) against
F.cross_entropy eager, under torch.compile, Liger's LigerCrossEntropyLoss and quack's kernel where
they import: time, GB/s and the share of the GPU's memory bandwidth. The bytes are what the operation
must move at least: the logits read once and the targets read (forward), plus the gradient written
once (forward + backward). Peak bandwidth comes from a table by GPU name, else from a measured
device-to-device copy.

Linear cross-entropy (N x D input, V x D weight, bfloat16) against torch's F.linear_cross_entropy,
Liger's fused linear loss and cut-cross-entropy: time, TFLOP/s with 6 N D V flops for forward +
backward (three N x D x V matmuls of 2 N D V flops each), and the peak memory above the inputs.

Writes JSON (machine metadata, the GPU's name, every row) to benchmarks/results/gpu-<time>.json or --out.
"""

from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import dataclasses
import importlib
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import crossent.torch as ct
from crossent.bench import write_report

# The shapes; --tiny replaces them with shapes the interpreter runs in seconds.
LOGITS_SHAPES = [(8192, 32768), (8192, 131072), (16384, 262144)]
TINY_LOGITS_SHAPES = [(8, 1000), (2, 40000)]  # a row kept in registers, a row read twice
LINEAR_SHAPE = (8192, 4096, 128256)  # N, D, V
TINY_LINEAR_SHAPE = (16, 32, 500)

# Peak memory bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(), from the vendors'
# data sheets; the first match wins, so the more specific names come first.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM
    ("H800", 3.35e12),
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB
    ("L40S", 0.864e12),
    ("RTX 4090", 1.008e12),
    ("MI300X", 5.3e12),
    ("MI250X", 3.2e12),
]
# Dense bf16 tensor-core peak (FLOP/s), for the linear loss's share.
PEAK_BF16_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("B200", 2250e12), ("A100", 312e12),
                   ("MI300X", 1307e12)]  # fmt: skip


@dataclasses.dataclass
class Row:
    bench: str  # "logits" or "linear"
    impl: str
    shape: str
    dtype: str
    mode: str  # "forward" or "forward+backward"
    seconds: float | None = None
    gb_per_s: float | None = None
    bandwidth_share: float | None = None
    tflop_per_s: float | None = None
    flops_share: float | None = None
    peak_memory_mib: float | None = None
    loss_rel_diff: float | None = None  # |crossent - torch| / |torch| of the loss (a sanity check, not a test)
    skipped: str | None = None


def _lookup(table: list[tuple[str, float]], name: str) -> float | None:
    return next((value for key, value in table if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measured_copy_bandwidth(device: torch.device) -> float | None:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), for GPUs missing from the table."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats=10)
    return 2 * src.numel() * 4 / seconds


# --- cross-entropy on logits --------------------------------------------------------------------------


def _liger_loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    module = importlib.import_module("liger_kernel.transformers")
    return module.LigerCrossEntropyLoss()


def _quack_loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    module = importlib.import_module("quack.cross_entropy")
    return lambda x, y: module.cross_entropy(x, y).mean()


def _crossent_triton(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with ct.use_backend("triton"):
        return ct.cross_entropy(x, y)


def logits_impls(device: torch.device) -> dict[str, Callable[[], Callable[[torch.Tensor, torch.Tensor], Any]]]:
    """Each peer as a factory (so that an import error becomes a skipped row)."""
    impls: dict[str, Callable[[], Callable[[torch.Tensor, torch.Tensor], Any]]] = {
        "crossent": lambda: _crossent_triton,
        "torch eager": lambda: F.cross_entropy,
        "torch.compile": lambda: torch.compile(F.cross_entropy, fullgraph=True),
    }
    if device.type == "cuda":  # GPU-only kernels
        impls["liger"] = _liger_loss
        impls["quack"] = _quack_loss
    return impls


def bench_logits(shapes, dtypes, device, repeats, peak_bw) -> list[Row]:
    rows = []
    for n, v in shapes:
        for dtype in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            x0 = torch.randn(n, v, generator=g, device=device, dtype=torch.float32).to(dtype)
            y = torch.randint(0, v, (n,), generator=g, device=device)
            item = x0.element_size()
            for impl, make in logits_impls(device).items():
                for mode in ("forward", "forward+backward"):
                    row = Row("logits", impl, f"{n}x{v}", str(dtype).split(".")[-1], mode)
                    rows.append(row)
                    try:
                        loss_fn = make()
                    except Exception as error:  # a peer that does not install or import here
                        row.skipped = f"{type(error).__name__}: {error}"[:200]
                        continue
                    x = x0.detach().clone().requires_grad_(mode != "forward")
                    if impl == "crossent" and mode == "forward":
                        with torch.no_grad():
                            expected = F.cross_entropy(x0.float(), y)
                            row.loss_rel_diff = float((loss_fn(x0, y).float() - expected).abs() / expected.abs())

                    def run(loss_fn=loss_fn, x=x, y=y, mode=mode):
                        if mode == "forward":
                            with torch.no_grad():
                                return loss_fn(x, y)
                        x.grad = None
                        loss = loss_fn(x, y)
                        loss.backward()
                        return loss

                    try:
                        row.seconds = median_seconds(run, device, repeats)
                    except Exception as error:
                        row.skipped = f"{type(error).__name__}: {error}"[:200]
                        continue
                    moved = n * v * item + n * y.element_size() + (n * v * item if mode != "forward" else 0)
                    row.gb_per_s = moved / row.seconds / 1e9
                    row.bandwidth_share = None if peak_bw is None else moved / row.seconds / peak_bw
                    print(_format(row), flush=True)
            del x0
    return rows


# --- linear cross-entropy -----------------------------------------------------------------------------


def _linear_impls(device: torch.device) -> dict[str, Callable[[], Callable[..., Any]]]:
    def crossent_linear():
        def loss(x, W, y):
            with ct.use_backend("triton"):
                return ct.linear_cross_entropy(x, W, y)

        return loss

    def torch_linear():
        if not hasattr(F, "linear_cross_entropy"):
            raise ImportError(f"torch {torch.__version__} has no F.linear_cross_entropy")
        return F.linear_cross_entropy

    def liger_linear():
        module = importlib.import_module("liger_kernel.transformers")
        fused = module.LigerFusedLinearCrossEntropyLoss()
        return lambda x, W, y: fused(W, x, y)

    def cce_linear():
        module = importlib.import_module("cut_cross_entropy")
        return lambda x, W, y: module.linear_cross_entropy(x, W, y)

    impls = {"crossent": crossent_linear, "torch": torch_linear}
    if device.type == "cuda":
        impls["liger"] = liger_linear
        impls["cut-cross-entropy"] = cce_linear
    return impls


def bench_linear(shape, device, repeats, peak_flops) -> list[Row]:
    n, d, v = shape
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(1)
    x0 = (torch.randn(n, d, generator=g, device=device) / d**0.5).to(dtype)
    W0 = torch.randn(v, d, generator=g, device=device).to(dtype)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    rows = []
    for impl, make in _linear_impls(device).items():
        row = Row("linear", impl, f"N={n} D={d} V={v}", "bfloat16", "forward+backward")
        rows.append(row)
        try:
            loss_fn = make()
        except Exception as error:
            row.skipped = f"{type(error).__name__}: {error}"[:200]
            continue
        x, W = x0.clone().requires_grad_(True), W0.clone().requires_grad_(True)

        def run(loss_fn=loss_fn, x=x, W=W):
            x.grad = W.grad = None
            loss = loss_fn(x, W, y)
            loss.backward()

        try:
            if device.type == "cuda":
                run()  # compile and allocate once, then measure the peak of one step above the inputs
                x.grad = W.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run()
                torch.cuda.synchronize()
                row.peak_memory_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
            row.seconds = median_seconds(run, device, repeats)
        except Exception as error:
            row.skipped = f"{type(error).__name__}: {error}"[:200]
            continue
        flops = 6 * n * d * v
        row.tflop_per_s = flops / row.seconds / 1e12
        row.flops_share = None if peak_flops is None else flops / row.seconds / peak_flops
        print(_format(row), flush=True)
    return rows


def _format(row: Row) -> str:
    head = f"{row.bench:<7} {row.impl:<18} {row.shape:<24} {row.dtype:<9} {row.mode:<17}"
    if row.skipped or row.seconds is None:
        return f"{head} skipped: {row.skipped}"
    text = f"{head} {row.seconds * 1e3:10.3f} ms"
    if row.gb_per_s is not None:
        text += f" {row.gb_per_s:9.1f} GB/s"
    if row.bandwidth_share is not None:
        text += f" ({100 * row.bandwidth_share:5.1f}% of peak)"
    if row.tflop_per_s is not None:
        text += f" {row.tflop_per_s:8.2f} TFLOP/s"
    if row.flops_share is not None:
        text += f" ({100 * row.flops_share:5.1f}% of bf16 peak)"
    if row.peak_memory_mib is not None:
        text += f" peak +{row.peak_memory_mib:.1f} MiB"
    if row.loss_rel_diff is not None:
        text += f" (loss vs torch float32: {row.loss_rel_diff:.1e} relative)"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU tensors under Triton's interpreter, tiny shapes")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 20; --tiny 2)")
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument(
        "--max-kept-classes", type=int, default=None,
        help="A/B of the one-read limit for plain rows (crossent.torch._triton.MAX_KEPT_CLASSES, default 32768): "
        "rows of more classes are read twice",
    )  # fmt: skip
    parser.add_argument("--out", type=pathlib.Path, help="JSON file to write")
    args = parser.parse_args(argv)

    if args.tiny:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no GPU visible to torch; use --tiny to run on CPU tensors under Triton's interpreter")
    repeats = args.repeats or (2 if args.tiny else 20)
    from crossent.torch import _triton

    if args.max_kept_classes is not None:
        _triton.MAX_KEPT_CLASSES = args.max_kept_classes
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    peak_bw = (_lookup(PEAK_BANDWIDTH, gpu) if gpu else None) or measured_copy_bandwidth(device)
    peak_flops = _lookup(PEAK_BF16_FLOPS, gpu) if gpu else None
    print(f"device: {gpu or 'CPU (Triton interpreter)'}; peak bandwidth: {peak_bw and peak_bw / 1e12} TB/s", flush=True)

    shapes = TINY_LOGITS_SHAPES if args.tiny else LOGITS_SHAPES
    rows = bench_logits(shapes, [torch.bfloat16, torch.float32], device, repeats, peak_bw)
    if not args.skip_linear:
        rows += bench_linear(TINY_LINEAR_SHAPE if args.tiny else LINEAR_SHAPE, device, repeats, peak_flops)
    for row in rows:
        if row.skipped:
            print(_format(row))

    import triton

    payload = {
        "gpu": gpu,
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "peak_bandwidth_bytes_per_s": peak_bw,
        "peak_bf16_flops": peak_flops,
        "repeats": repeats,
        "max_kept_classes": _triton.MAX_KEPT_CLASSES,
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    write_report(payload, args.out, "gpu-tiny" if args.tiny else "gpu", pathlib.Path(__file__).parent / "results")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
