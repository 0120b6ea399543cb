"""Worker processes for test_distributed.py: each rank compares the distributed loss with the
single-process crossent loss on the same data and writes its findings to a JSON file."""

from __future__ import annotations

import itertools
import json
import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

import crossent.torch as ct
from crossent.torch import distributed as cd


class CollectiveCounter:
    """Counts the collectives issued through torch.distributed while active."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._saved: dict[str, object] = {}

    def __enter__(self) -> CollectiveCounter:
        for name in ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_gather_into_tensor"):
            original = getattr(dist, name)
            self._saved[name] = original

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # A bounded timeout: a rank that failed must not leave the others waiting forever at the barrier.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))


def _report_and_exit(out_dir: str, rank: int, report: dict) -> None:
    """Write this rank's findings, wait for every rank, and leave without C++ teardown.

    Tearing gloo down while another rank is already exiting can abort a process ("terminate called
    without an active exception") after its work is done; after the barrier no rank needs the others.
    """
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if dist.is_initialized():
        dist.barrier()
    os._exit(0)


def _option_cases() -> list[tuple[str, bool, float, bool, dict]]:
    """(reduction, weighted, label_smoothing, probability, extra options): every combination."""
    grid = itertools.product(["mean", "sum", "none"], [False, True], [0.0, 0.2], [False, True])
    extras: list[dict] = [{}, {"z_loss": 1e-3, "softcap": 4.0}, {"normalizer": 13.0}]
    return [(r, w, e, p, x) for (r, w, e, p), x in itertools.product(grid, extras)
            if "normalizer" not in x or r == "mean"]  # fmt: skip


def _split(total: int, sizes: list[int], rank: int) -> tuple[int, int]:
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def vocab_parallel_worker(rank: int, world: int, port: int, sizes: list[int], out_dir: str) -> None:
    failures: list[str] = []
    counts: dict[str, list[int]] = {}
    try:
        _init(rank, world, port)
        total = sum(sizes)
        start, end = _split(total, sizes, rank)
        cases = _option_cases()
        for index, (reduction, weighted, eps, probability, extra) in enumerate(cases):
            g = torch.Generator().manual_seed(index)
            rows = 11
            logits = 3 * torch.randn(rows, total, generator=g, dtype=torch.float64)
            if probability:
                t = torch.rand(rows, total, generator=g, dtype=torch.float64)
                target = t / t.sum(1, keepdim=True)
            else:
                target = torch.randint(0, total, (rows,), generator=g)
                target[1] = -100
                target[2] = 0  # the first rank's slice
                target[3] = total - 1  # the last rank's slice
            weight = torch.rand(total, generator=g, dtype=torch.float64) + 0.1 if weighted else None
            kw = {"reduction": reduction, "label_smoothing": eps, **extra}
            full = logits.clone().requires_grad_(True)
            expected = ct.cross_entropy(full, target, weight, **kw)
            upstream = torch.rand(expected.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
            expected.backward(upstream)
            local = logits[:, start:end].clone().requires_grad_(True)
            local_target = target[:, start:end] if probability else target
            with CollectiveCounter() as forward_calls:
                got = cd.vocab_parallel_cross_entropy(local, local_target, weight=weight, **kw)
            with CollectiveCounter() as backward_calls:
                got.backward(upstream)
            counts.setdefault("forward", []).append(len(forward_calls.calls))
            counts.setdefault("backward", []).append(len(backward_calls.calls))
            name = f"case {index}: {kw} weighted={weighted} probability={probability}"
            if not torch.allclose(got, expected, rtol=1e-10, atol=1e-12, equal_nan=True):
                failures.append(f"{name}: loss {got} != {expected}")
            if not torch.allclose(local.grad, full.grad[:, start:end], rtol=1e-10, atol=1e-12):
                failures.append(f"{name}: gradient differs by {(local.grad - full.grad[:, start:end]).abs().max()}")
        # Every target in the last rank's slice: the other ranks' slices hold no target at all.
        on_last_rank = torch.full((5,), total - 1)
        logits = torch.randn(5, total, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
        full = logits.clone().requires_grad_(True)
        expected = ct.cross_entropy(full, on_last_rank, label_smoothing=0.1)
        expected.backward()
        local = logits[:, start:end].clone().requires_grad_(True)
        got = cd.vocab_parallel_cross_entropy(local, on_last_rank, label_smoothing=0.1)
        got.backward()
        if not torch.allclose(got, expected, rtol=1e-12):
            failures.append(f"all targets on one rank: loss {got} != {expected}")
        if not torch.allclose(local.grad, full.grad[:, start:end], rtol=1e-10, atol=1e-14):
            failures.append("all targets on one rank: gradient differs")
    except Exception:  # reported to the test, which fails with it
        failures.append(traceback.format_exc())
    finally:
        _report_and_exit(out_dir, rank, {"failures": failures, "collectives": counts})


def vocab_parallel_linear_worker(rank: int, world: int, port: int, sizes: list[int], out_dir: str) -> None:
    """The sharded output layer fused with the loss, against the single-process linear loss on the full
    layer: loss, and the gradients of the hidden rows, of this rank's weight rows and bias slice."""
    failures: list[str] = []
    counts: dict[str, list[int]] = {}
    try:
        _init(rank, world, port)
        total = sum(sizes)
        start, end = _split(total, sizes, rank)
        cases = _option_cases()
        cases += [
            ("mean", True, 0.1, False, {"dtype": torch.float32}),
            ("none", False, 0.0, True, {"dtype": torch.float32}),
        ]
        for index, (reduction, weighted, eps, probability, extra) in enumerate(cases):
            extra = dict(extra)
            dtype = extra.pop("dtype", torch.float64)
            g = torch.Generator().manual_seed(1000 + index)
            rows, features, chunk = 13, 6, 4  # 4 chunks of rows (3 with ignored rows dropped)
            hidden = torch.randn(rows, features, generator=g, dtype=torch.float64).to(dtype)
            W = torch.randn(total, features, generator=g, dtype=torch.float64).to(dtype)
            b = (0.5 * torch.randn(total, generator=g, dtype=torch.float64)).to(dtype) if index % 2 else None
            if probability:
                t = torch.rand(rows, total, generator=g, dtype=torch.float64)
                target = (t / t.sum(1, keepdim=True)).to(dtype)
            else:
                target = torch.randint(0, total, (rows,), generator=g)
                target[1] = target[7] = -100
                target[2] = 0  # the first rank's slice
                target[3] = total - 1  # the last rank's slice
            weight = (torch.rand(total, generator=g, dtype=torch.float64) + 0.1).to(dtype) if weighted else None
            kw = {"reduction": reduction, "label_smoothing": eps, "weight": weight, **extra}
            full = [hidden.clone().requires_grad_(True), W.clone().requires_grad_(True)]
            full_b = None if b is None else b.clone().requires_grad_(True)
            expected = ct.linear_cross_entropy(full[0], full[1], target, linear_bias=full_b, **kw)
            upstream = (
                torch.rand(expected.shape, generator=g, dtype=torch.float64).to(dtype) if reduction == "none" else None
            )
            expected.backward(upstream)
            mine = [hidden.clone().requires_grad_(True), W[start:end].clone().requires_grad_(True)]
            mine_b = None if b is None else b[start:end].clone().requires_grad_(True)
            local_target = target[:, start:end] if probability else target
            with CollectiveCounter() as forward_calls:
                got = cd.vocab_parallel_linear_cross_entropy(
                    mine[0], mine[1], local_target, local_bias=mine_b, chunk_size=chunk, **kw
                )
            with CollectiveCounter() as backward_calls:
                got.backward(upstream)
            chunks = -(-rows // chunk) if probability else -(-(rows - 2) // chunk)
            counts.setdefault("expected", []).append(
                # (+1 on the first call: the all_gather that derives the slice bounds, cached after)
                [2 * chunks + (reduction != "none") + (index == 0), 0 if reduction != "none" else 2 * chunks + 1]
            )
            counts.setdefault("got", []).append([len(forward_calls.calls), len(backward_calls.calls)])
            name = f"case {index}: {kw} probability={probability} bias={b is not None} dtype={dtype}"
            tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
            pairs = [("loss", got, expected), ("hidden grad", mine[0].grad, full[0].grad),
                     ("weight grad", mine[1].grad, full[1].grad[start:end])]  # fmt: skip
            if b is not None:
                pairs.append(("bias grad", mine_b.grad, full_b.grad[start:end]))
            for what, a, e in pairs:
                if not torch.allclose(a.double(), e.double(), equal_nan=True, **tol):
                    failures.append(f"{name}: {what} differs by {(a.double() - e.double()).abs().max()}")
    except Exception:
        failures.append(traceback.format_exc())
    finally:
        _report_and_exit(out_dir, rank, {"failures": failures, "collectives": counts})


def data_parallel_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """3 micro-batches per rank with unequal numbers of ignored tokens: summing the normalised
    micro-batch losses over ranks gives the full-batch mean, and the gradients match."""
    failures: list[str] = []
    try:
        _init(rank, world, port)
        g = torch.Generator().manual_seed(7)
        logits = torch.randn(world * 3 * 8, 17, generator=g, dtype=torch.float64)
        target = torch.randint(0, 17, (world * 3 * 8,), generator=g)
        target[torch.rand(target.shape, generator=g) < torch.linspace(0.05, 0.8, target.numel())] = -100
        weight = torch.rand(17, generator=g, dtype=torch.float64) + 0.1
        full = logits.clone().requires_grad_(True)
        expected = ct.cross_entropy(full, target, weight, label_smoothing=0.1)
        expected.backward()
        mine = torch.arange(rank * 24, (rank + 1) * 24)
        micro = [mine[i * 8 : (i + 1) * 8] for i in range(3)]
        with CollectiveCounter() as calls:
            count = cd.global_target_count([target[m] for m in micro], weight=weight)
        if calls.calls != ["all_reduce"]:
            failures.append(f"global_target_count issued {calls.calls}, expected one all_reduce")
        local = logits[mine].clone().requires_grad_(True)
        total = torch.zeros((), dtype=torch.float64)
        for i in range(3):
            part = slice(i * 8, (i + 1) * 8)
            loss = ct.cross_entropy(local[part], target[micro[i]], weight, label_smoothing=0.1, normalizer=count)
            loss.backward()  # gradients accumulate over the micro-batches
            total = total + loss.detach()
        dist.all_reduce(total)
        if not torch.allclose(total, expected.detach(), rtol=1e-12):
            failures.append(f"summed micro-batch losses {total} != full-batch mean {expected}")
        if not torch.allclose(local.grad, full.grad[mine], rtol=1e-10, atol=1e-14):
            failures.append("accumulated gradients differ from the full batch's")
    except Exception:
        failures.append(traceback.format_exc())
    finally:
        _report_and_exit(out_dir, rank, {"failures": failures})
