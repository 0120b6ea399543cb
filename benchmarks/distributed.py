"""Benchmark the vocabulary-parallel loss and the sharded fused output layer on gloo against one process.

The loss at 4096 x 32768 float32 on 2 ranks; the sharded output layer fused with the loss, 2048 x 512
hidden rows against a 32768 x 512 layer.

    python benchmarks/distributed.py [--rows 4096] [--vocab 32768] [--hidden 512] [--ranks 2]

Each rank holds a V / ranks slice of every row (or of the layer's rows) and runs forward+backward; the
single process runs crossent.torch.cross_entropy on the whole logits (linear_cross_entropy on the whole
layer). On this 2-core machine each rank gets one core, the single process both. Prints the times and
the bytes all-reduced per forward; writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crossent.bench import best_of, write_report


def _linear_problem(rows: int, hidden: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear case's rows, full layer and targets, the same in every process."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows // 2, hidden, generator=g)
    W = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    return x, W, torch.randint(0, vocab, (rows // 2,), generator=g)


def _rank(rank: int, world: int, port: int, rows: int, vocab: int, hidden: int, repeats: int, out: str) -> None:
    from crossent.torch import distributed as cd

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    import crossent

    threads = max(1, (os.cpu_count() or 1) // world)  # the cores shared out, no oversubscription
    torch.set_num_threads(threads)
    crossent.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    local_size = vocab // world
    g = torch.Generator().manual_seed(rank)
    local = torch.randn(rows, local_size, generator=g).requires_grad_(True)
    target = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        local.grad = None
        cd.vocab_parallel_cross_entropy(local, target).backward()
        dist.barrier()

    seconds = best_of(step, repeats)
    x, W, y = _linear_problem(rows, hidden, vocab)
    x.requires_grad_(True)
    W_local = W[rank * local_size : (rank + 1) * local_size].clone().requires_grad_(True)

    def linear_step() -> None:
        x.grad = W_local.grad = None
        cd.vocab_parallel_linear_cross_entropy(x, W_local, y).backward()
        dist.barrier()

    linear_seconds = best_of(linear_step, repeats)
    if rank == 0:
        report = {"seconds": seconds, "linear_seconds": linear_seconds, "threads_per_rank": torch.get_num_threads()}
        pathlib.Path(out).write_text(json.dumps(report))
    dist.barrier()
    os._exit(0)  # no gloo teardown: it can abort when the other rank exits first


def main(argv: list[str] | None = None) -> int:
    import crossent.torch as ct

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)

    x = torch.randn(args.rows, args.vocab).requires_grad_(True)
    y = torch.randint(0, args.vocab, (args.rows,))

    def single() -> None:
        x.grad = None
        ct.cross_entropy(x, y).backward()

    single_s = best_of(single, args.repeats)
    lx, lW, ly = _linear_problem(args.rows, args.hidden, args.vocab)
    lx.requires_grad_(True)
    lW.requires_grad_(True)

    def single_linear() -> None:
        lx.grad = lW.grad = None
        ct.linear_cross_entropy(lx, lW, ly).backward()

    single_linear_s = best_of(single_linear, args.repeats)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_file = pathlib.Path(f"/tmp/crossent-dist-{os.getpid()}.json")
    mp.spawn(_rank, args=(args.ranks, port, args.rows, args.vocab, args.hidden, args.repeats, str(result_file)),
             nprocs=args.ranks, join=True)  # fmt: skip
    parallel = json.loads(result_file.read_text())
    payload_bytes = args.rows * 4 * (1 + 2)  # MAX of the slices' log-sum-exps, then SUM of (sum-exp, target logit)
    gathered_bytes = args.rows * args.vocab * 4
    report = {
        "shape": [args.rows, args.vocab],
        "ranks": args.ranks,
        "single_process_s": single_s,
        "vocab_parallel_s": parallel["seconds"],
        "linear_shape": [args.rows // 2, args.hidden, args.vocab],
        "single_process_linear_s": single_linear_s,
        "vocab_parallel_linear_s": parallel["linear_seconds"],
        "threads_per_rank": parallel["threads_per_rank"],
        "allreduce_payload_bytes_per_forward": payload_bytes,
        "gathered_logits_bytes": gathered_bytes,
    }
    print(
        f"{args.rows}x{args.vocab} f32 forward+backward: one process {single_s * 1e3:.1f} ms, "
        f"{args.ranks} gloo ranks {parallel['seconds'] * 1e3:.1f} ms "
        f"({parallel['threads_per_rank']} thread(s) each); all-reduced per forward {payload_bytes / 1024:.0f} KiB "
        f"vs {gathered_bytes / 2**20:.0f} MiB to gather the logits"
    )
    print(
        f"linear {args.rows // 2}x{args.hidden} @ {args.vocab}x{args.hidden} forward+backward: one process "
        f"{single_linear_s * 1e3:.1f} ms, {args.ranks} gloo ranks {parallel['linear_seconds'] * 1e3:.1f} ms"
    )
    write_report(report, args.out, "distributed", pathlib.Path(__file__).parent / "results")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
