"""crossent.torch.distributed on gloo, in spawned processes: equal to the single-process loss."""

from __future__ import annotations

import json
import socket

import pytest

torch = pytest.importorskip("torch")
mp = pytest.importorskip("torch.multiprocessing")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

import distributed_cases  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world, args, tmp_path):
    mp.spawn(fn, args=(world, _free_port(), *args, str(tmp_path)), nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize(
    "sizes",
    [[40, 40], [17, 23], [250, 251, 250, 250], [600, 1, 200, 200]],
    ids=["2 even", "2 uneven", "V=1001 over 4", "4 with a 1-class slice"],
)
def test_vocab_parallel_equals_single_process(tmp_path, sizes):
    reports = _spawn(distributed_cases.vocab_parallel_worker, len(sizes), (sizes,), tmp_path)
    failures = [f for report in reports for f in report["failures"]]
    assert not failures, "\n".join(failures[:5])
    for report in reports:
        # Two collectives per forward (MAX then one packed SUM), none in backward; the slice bounds
        # are derived once (one all_gather) on the first call and cached.
        forward = report["collectives"]["forward"]
        assert forward[0] == 3 and set(forward[1:]) == {2}, forward
        assert set(report["collectives"]["backward"]) == {0}


@pytest.mark.parametrize("sizes", [[17, 23], [250, 251, 250, 250]], ids=["2 uneven", "V=1001 over 4"])
def test_vocab_parallel_linear_equals_single_process_linear_loss(tmp_path, sizes):
    reports = _spawn(distributed_cases.vocab_parallel_linear_worker, len(sizes), (sizes,), tmp_path)
    failures = [f for report in reports for f in report["failures"]]
    assert not failures, "\n".join(failures[:5])
    for report in reports:
        # Per chunk of rows, the loss's two collectives; the hidden rows' gradient all-reduced once, in
        # the forward sweep for mean and sum (backward silent), in the recomputing backward for none.
        assert report["collectives"]["got"] == report["collectives"]["expected"]


def test_gradient_accumulation_over_ranks_equals_the_full_batch(tmp_path):
    reports = _spawn(distributed_cases.data_parallel_worker, 2, (), tmp_path)
    failures = [f for report in reports for f in report["failures"]]
    assert not failures, "\n".join(failures[:5])
