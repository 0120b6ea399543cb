"""The command line, run for real in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import crossent


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crossent", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_default_explain_reproduces_the_notebooks():
    result = run("explain", "--plain")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "loss (mean) = 1.7603" in out
    assert "seed 000: segmentation, 6 images x 3 classes x 5 x 5 pixels" in out
    assert "[FAIL]" not in out
    for identity in ["CE(x) = NLL(log_softmax(x))", "log_softmax(log_softmax(x)) = log_softmax(x)", "gradient ="]:
        assert f"[ok ] {identity}" in out
    assert "more rows not shown (of 150)" in out  # the 150-pixel batch is summarised


def test_default_explain_cross_checks_installed_frameworks():
    pytest.importorskip("torch")
    out = run("explain", "--plain").stdout
    assert "torch " in out and "largest difference from crossent" in out


def test_json_matches_the_library(tmp_path, rng):
    x = rng.standard_normal((7, 4))
    y = np.array([0, 3, -100, 1, 2, 2, 3])
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "y.json").write_text(json.dumps(y.tolist()))
    result = run(
        "explain", "--logits", str(tmp_path / "x.npy"), "--target", str(tmp_path / "y.json"),
        "--weight", "[1, 2, 0.5, 1]", "--label-smoothing", "0.1", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trace = json.loads(result.stdout)["traces"][0]
    expected = crossent.cross_entropy(x, y, np.array([1, 2, 0.5, 1]), label_smoothing=0.1)
    assert trace["loss"] == pytest.approx(float(expected), rel=1e-12)
    assert trace["denominator"] == pytest.approx(1 + 1 + 2 + 0.5 + 0.5 + 1)
    assert len(trace["rows"]) == 7 and trace["rows"][2]["ignored"] is True
    assert all(check["holds"] for check in trace["checks"])


def test_csv_input_and_reduction_none(tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3\n3,2,1\n")
    (tmp_path / "y.csv").write_text("2\n0\n")
    result = run("explain", "--logits", str(tmp_path / "x.csv"), "--target", str(tmp_path / "y.csv"),
                 "--reduction", "none", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    loss = json.loads(result.stdout)["traces"][0]["loss"]
    np.testing.assert_allclose(loss, crossent.cross_entropy(np.array([[1.0, 2, 3], [3, 2, 1]]), np.array([2, 0]),
                                                            reduction="none"))  # fmt: skip


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_of_the_expected_size(tmp_path):
    pytest.importorskip("matplotlib")
    from crossent.cli import render

    path = tmp_path / "probs.png"
    result = run("explain", "--plain", "--plot", str(path))
    assert result.returncode == 0, result.stderr
    # The seed-001 example has 5 rows: 5 panels of 1.6 in at 100 dpi, 8 in wide.
    assert _png_size(path) == (int(render.PLOT_WIDTH_IN * 100), int(render.PLOT_ROW_HEIGHT_IN * 5 * 100))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "--logits", "[[1, 2], [3, 4]]", "--target", "[0, 5]"], "target value 5 is out of range"),
        (["explain", "--logits", "[[1, 2], [3, 4]]", "--target", "[0, 1, 1]"], "does not match input shape"),
        (["explain", "--logits", "missing.npy", "--target", "[0]"], "no such file 'missing.npy'"),
        (["explain", "--logits", "[[1, 2], [3, 4]", "--target", "[0, 1]"], "is not valid JSON"),
        (["explain", "--logits", "[[1, 2]]"], "--logits needs --target"),
        (["explain", "--logits", "[[1, 2]]", "--target", "[0.5]"], "class indices must be whole numbers"),
        (["explain", "--logits", "[[1, 2]]", "--target", "[0]", "--label-smoothing", "2"], "label_smoothing must be"),
        (["explain", "--logits", "[[1, 2]]", "--target", "[0]", "--reduction", "avg"], "invalid choice: 'avg'"),
        (["explain", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["explain", "--max-rows", "0"], "--max-rows must be at least 1"),
        (["teleport"], "invalid choice: 'teleport'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    result = run(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_malformed_file_is_reported(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("1,2\nthree,4\n")
    result = run("explain", "--logits", str(bad), "--target", "[0, 1]")
    assert result.returncode == 2 and "cannot read" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_info_reports_kernel_and_frameworks():
    result = run("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["crossent"] == crossent.__version__
    assert info["native"] == crossent.config()["native"]
    assert info["threads"] >= 1 and "numpy" in info["frameworks"] and "triton" in info["frameworks"]
    assert isinstance(info["gpu"], str)
    text = run("info").stdout
    assert "isa" in text and "frameworks:" in text


def test_console_script_entry_point_is_declared():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    if "crossent" not in scripts:
        pytest.fail("the crossent console script is not installed (pip install . declares it)")
    assert scripts["crossent"] == "crossent.cli:main"


def test_bench_peers_are_timed_in_turns():
    # Every round gives each peer a turn, in an order rotated by one per round, so that a drift of the
    # machine's speed reaches all peers alike; a turn is one untimed call, then calls_per_round timed.
    from crossent.bench import best_in_turns

    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    best = best_in_turns(calls, rounds=3, calls_per_round=2)
    rounds = ["".join(order[9 * k : 9 * (k + 1)]) for k in range(3)]
    assert rounds == ["aaabbbccc", "bbbcccaaa", "cccaaabbb"]
    assert len(order) == 27
    assert sorted(best) == ["a", "b", "c"] and all(0 <= t < 1 for t in best.values())


def test_bench_suite_plumbing_on_a_tiny_case():
    # Timings are never asserted; this checks that every peer runs and the report is well-formed.
    from crossent.bench import format_table, ratio_rows, run_suite
    from crossent.bench.suite import Case

    case = Case("tiny 64x100", (64, 100), peers=("crossent", "numpy", "floor"), repeats=1)
    results = run_suite([case])
    assert {(r.mode, r.impl) for r in results if r.seconds is not None} == {
        (m, i) for m in ("forward", "forward+backward") for i in ("crossent", "numpy", "floor")
    }
    assert all(r.median_seconds >= r.seconds for r in results if r.seconds is not None)
    rows = ratio_rows(results)
    assert [r["mode"] for r in rows] == ["forward", "forward+backward"]
    assert all(r["numpy_ratio"] > 0 for r in rows)
    assert "tiny 64x100" in format_table(rows)
    json.dumps(rows)


def test_bench_thread_scaling_case_reports_best_and_median_ratios():
    # The (threads) cases time only crossent with out= on all threads and on one: the table has no plain
    # crossent time for them, and the ratio is one thread's time over all threads', best and median.
    from crossent.bench import format_table, ratio_rows, run_suite
    from crossent.bench.suite import Case

    case = Case("tiny (threads)", (64, 100), peers=("crossent-out", "crossent-1thread"), repeats=3, group="threads")
    rows = ratio_rows(run_suite([case]))
    for row in rows:
        assert row["crossent_s"] is None
        assert row["crossent-1thread_ratio"] == row["crossent-1thread_s"] / row["crossent-out_s"]
        assert row["crossent-1thread_median_ratio"] > 0
    assert "tiny (threads)" in format_table(rows)


# Issue 16, item 13: what the help promises about array options, a closed pipe, all-ignored targets, info.


def _oracle():
    return pytest.importorskip("oracle")  # torch float64


def test_inline_csv_bare_number_and_json_file_as_the_help_promises(tmp_path):
    (tmp_path / "l.json").write_text("[[1, 2, 3], [3, 2, 1]]")
    x = np.array([[1.0, 2, 3], [3, 2, 1]])
    result = run("explain", "--logits", str(tmp_path / "l.json"), "--target", "0,2", "--weight", "1,2,0.5", "--json")
    assert result.returncode == 0, result.stderr
    expected = _oracle().cross_entropy(x, np.array([0, 2]), np.array([1, 2, 0.5])).loss
    assert json.loads(result.stdout)["traces"][0]["loss"] == pytest.approx(float(expected), rel=1e-12)
    # A bare number is a 0-d target for 1-D logits; '-1,2;...' rows with ';' are not taken for options.
    result = run("explain", "--logits", "-1,2,0.5", "--target", "1", "--json")
    assert result.returncode == 0, result.stderr
    expected = _oracle().cross_entropy(np.array([-1.0, 2, 0.5]), np.array(1)).loss
    assert json.loads(result.stdout)["traces"][0]["loss"] == pytest.approx(float(expected), rel=1e-12)
    result = run("explain", "--logits", "-1,2;-inf,1e30", "--target", "0,1", "--reduction", "none", "--json")
    assert result.returncode == 0, result.stderr
    expected = _oracle().cross_entropy(np.array([[-1.0, 2], [-np.inf, 1e30]]), np.array([0, 1]), reduction="none").loss
    np.testing.assert_array_equal(json.loads(result.stdout)["traces"][0]["loss"], expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--logits", "1,x,3", "--target", "0"], "--logits: 'x' in '1,x,3' is not a number"),
        (["--logits", "1,2;3", "--target", "0,0"], "--logits: the rows of '1,2;3' have different lengths [1, 2]"),
        (["--logits", '[1, "x"]', "--target", "0"], "--logits: expected real numbers: 'x' is not a real number"),
        (["--logits", "1,2", "--target", "0,y"], "--target: 'y' in '0,y' is not a number"),
        (["--logits", "1,2", "--target", "0.5"], "class indices must be whole numbers, got 0.5"),
        (["--logits", "1,2", "--target", "0", "--weight", "1,two"], "--weight: 'two' in '1,two' is not a number"),
        (["--logits", "1,2", "--target", "0", "--weight", "1,2;3,4"], "--weight: expected one weight per class"),
        (["--logits", "1,2", "--target", "0", "--weight", "w.npy"], "--weight: no such file 'w.npy'"),
        (["--logits", "[[1, 2], [3]]", "--target", "0,1"], "--logits: '[[1, 2], [3]]' is not a rectangular array"),
    ],
)
def test_bad_array_values_are_named(args, message):
    result = run("explain", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_closed_pipe_exits_quietly():
    # `crossent explain --json | head -1`: the reader closes the pipe after the first line. Every row
    # shown makes the output (about 96 KiB) more than a pipe holds (64 KiB on Linux), so that the writer
    # meets the closed pipe however its writes are buffered.
    command = [sys.executable, "-m", "crossent", "explain", "--json", "--max-rows", "100000"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
    assert first.strip() == b"{"
    assert stderr == "" and code == 141  # 128 + SIGPIPE, as a shell reports a tool ended by the pipe


def test_every_target_ignored_holds_its_identities_without_warnings():
    x = np.array([[1.0, 2, 3], [3, 2, 1]])
    result = run("explain", "--logits", "1,2,3;3,2,1", "--target", "-100,-100", "--json")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    trace = json.loads(result.stdout)["traces"][0]
    expected = _oracle().cross_entropy(x, np.array([-100, -100]))  # loss 0/0 = NaN, gradient 0
    assert np.isnan(expected.loss) and trace["loss"] == "nan"  # JSON has no NaN: the string
    assert np.all(expected.grad == 0)
    gradient = [c for c in trace["checks"] if c["name"].startswith("gradient")]
    assert len(gradient) == 1 and gradient[0]["holds"] and gradient[0]["difference"] == 0.0
    assert all(c["holds"] for c in trace["checks"])
    # A counted target of weight 0 over a total weight of 0 is 0 * (1/0) = NaN in torch; the identity agrees.
    result = run("explain", "--logits", "1,2,3;3,2,1", "--target", "0,0", "--weight", "0,1,1", "--json")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert all(c["holds"] for c in json.loads(result.stdout)["traces"][0]["checks"])


@pytest.mark.parametrize("mode", ["--plain", "rich"])
def test_info_separates_names_from_values(mode):
    if mode == "rich":
        pytest.importorskip("rich")
    result = run("info", *([mode] if mode == "--plain" else []))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    info = json.loads(run("info", "--json").stdout)
    for name, version in info["frameworks"].items():
        line = next(line for line in lines if line.strip().startswith(name + " "))
        assert line.split()[0] == name and " ".join(line.split()[1:]) == (version or "not installed")
    for key in ("native", "isa", "available_isas", "omp_num_threads", "buffer_cache"):
        line = next(line for line in lines if line.startswith(key))
        assert line[len(key) : len(key) + 2] == "  ", line


def test_special_values_are_standard_json_and_shown_in_the_rich_table():
    # -inf on a non-target class is a valid input (loss 0.3133 on row 2, by hand: log(1 + e^-1) = 0.3133);
    # +inf and NaN rows give NaN losses, as torch does.
    logits, target = "inf,1,2;nan,0,1;-inf,2,3", "0;1;2"
    result = run("explain", "--logits", logits, "--target", target, "--reduction", "none", "--json")
    assert result.returncode == 0, result.stderr
    assert "Infinity" not in result.stdout and "NaN" not in result.stdout  # not standard JSON tokens
    trace = json.loads(result.stdout)["traces"][0]
    assert trace["loss"][0] == "nan" and trace["loss"][1] == "nan"
    assert trace["loss"][2] == pytest.approx(np.log1p(np.exp(-1.0)), rel=1e-12)
    assert trace["rows"][0]["max"] == "inf" and trace["rows"][2]["max"] == 3.0
    # rich would read "[inf, 1.0000, 2.0000]" as a markup tag and print an empty cell
    rich_out = subprocess.run(
        [sys.executable, "-m", "crossent", "explain", "--logits", logits, "--target", target],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "COLUMNS": "200"},
    ).stdout  # fmt: skip
    for cell in ("[inf, 1.0000, 2.0000]", "[nan, 0.0000, 1.0000]", "[-inf, 2.0000, 3.0000]"):
        assert cell in rich_out


def test_info_names_the_gpu_and_triton(monkeypatch):
    # No GPU here: torch's answers are replaced, to check what info says when one is there, and none.
    torch = pytest.importorskip("torch")
    from crossent import cli

    versions = {"torch": "2", "triton": "3.9.0"}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli._gpu_info(versions).startswith("none visible to torch; on CUDA/ROCm crossent.torch runs Triton 3.9.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H200")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert cli._gpu_info(versions) == "NVIDIA H200 (CUDA 12.8); crossent.torch runs Triton 3.9.0 kernels"
    assert "torch ops (triton is not installed)" in cli._gpu_info({"torch": "2", "triton": None})


def test_explain_shows_each_option_term_and_they_add_up_to_the_loss():
    # label smoothing (with weights), z-loss and a soft cap: each row's shown terms sum to its loss, and
    # that loss is the oracle's (torch in float64, z-loss and soft cap by hand).
    raw = np.array([[1.0, 2, 3], [3, 2, 1], [0.5, -4, 2]])
    w, eps, z, cap = np.array([1, 2, 0.5]), 0.1, 0.01, 2.0
    result = run(
        "explain", "--logits", "1,2,3;3,2,1;0.5,-4,2", "--target", "2,0,-100", "--weight", "1,2,0.5",
        "--label-smoothing", "0.1", "--z-loss", "0.01", "--softcap", "2", "--reduction", "none", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["traces"][0]["rows"]
    expected = _oracle().cross_entropy(raw, np.array([2, 0, -100]), w, reduction="none", label_smoothing=eps,
                                       z_loss=z, softcap=cap).loss  # fmt: skip
    for row, want in zip(rows, expected, strict=True):
        x = cap * np.tanh(np.array(row["logits"]) / cap)
        np.testing.assert_allclose(row["capped_logits"], x, rtol=1e-12)
        if row["ignored"]:
            assert row["loss"] == row["smoothing"] == row["z_term"] == 0
            continue
        lse = np.log(np.sum(np.exp(x)))
        assert row["smoothing"] == pytest.approx(eps / 3 * np.sum(w * (lse - x)), rel=1e-12)
        assert row["z_term"] == pytest.approx(z * lse**2, rel=1e-12)
        shown = (1 - eps) * row["weight"] * (row["minus_target_logit"] + row["logsumexp"]) + row["smoothing"]
        assert shown + row["z_term"] == pytest.approx(want, rel=1e-12) == pytest.approx(row["loss"], rel=1e-12)
    plain = run("explain", "--logits", "1,2,3", "--target", "2", "--label-smoothing", "0.1", "--z-loss", "0.01",
                "--softcap", "2", "--plain").stdout  # fmt: skip
    for text in ("capped logits x", "smoothing", "z-loss", "(1 - 0.1) * w[class]", "2 * tanh(logits / 2)"):
        assert text in plain


def test_explain_smoothing_term_with_a_negative_class_weight():
    # torch takes any class weights: a negative one still adds its share of the smoothing term.
    x, w, eps = np.array([1.0, 2, 3]), np.array([1, -2, 0.5]), 0.1
    result = run("explain", "--logits", "1,2,3", "--target", "2", "--weight", "1,-2,0.5", "--label-smoothing", "0.1",
                 "--reduction", "none", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["traces"][0]["rows"][0]
    lse = np.log(np.sum(np.exp(x)))
    assert row["smoothing"] == pytest.approx(eps / 3 * np.sum(w * (lse - x)), rel=1e-12)
    expected = _oracle().cross_entropy(x[None], np.array([2]), w, reduction="none", label_smoothing=eps).loss[0]
    assert (1 - eps) * 0.5 * (lse - 3) + row["smoothing"] == pytest.approx(expected, rel=1e-12)
