"""CPU smoke test of the benchmark suite: each benchmark in --quick mode writes its rows,
the charts are drawn, rows are upserted by key, and `python -m benchmarks` reaches them."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("attention", "softmax_loss", "sasrec")


def load(name: str = ""):
    """benchmarks.<name> (the suite itself for ""): a folder of the checkout, not an installed package."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("benchmarks" + (f".{name}" if name else ""))


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module", autouse=True)
def lengths_without_the_datasets():
    """The smoke test checks the machinery, not the data: where ../shared/data is absent,
    the benchmarks take uniform lengths instead of failing as a CI benchmark run does."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("CI", raising=False)
        yield


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """The three benchmarks, --quick on the CPU, into one CSV (run once for this module)."""
    path = tmp_path_factory.mktemp("bench") / "results.csv"
    threads = torch.get_num_threads()  # --quick on a CPU runs single-threaded; give the rest back
    try:
        for name in BENCHMARKS:
            load(name).main(["--quick", "--device", "cpu", "--csv", str(path)])
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.mark.parametrize("name", BENCHMARKS)
def test_quick_run_writes_checked_rows(results, name):
    rows = [r for r in read(results) if r["benchmark"] == name]
    assert rows, f"{name}: no rows in {results}"
    statuses = {r["provider"]: r["status"] for r in rows}
    assert statuses["reference"] == "ok"
    bad = [(r["provider"], r["shape"], r["status"]) for r in rows if r["status"].startswith(("error", "mismatch"))]
    assert not bad, f"{name}: providers failing or disagreeing with the reference: {bad}"
    timed = [r for r in rows if r["status"] == "ok"]
    assert all(float(r["ms"]) > 0 and r["speedup_vs_reference"] for r in timed)
    assert (results.parent / f"{name}-{load('common').slug(rows[0]['gpu'])}.md").exists()


def test_sasrec_times_padded_and_packed_batches(results):
    rows = [r for r in read(results) if r["benchmark"] == "sasrec"]
    configs = {}  # (shape, loss, dtype, provider) -> {batching: row}
    for r in rows:
        loss, batching = r["variant"].rsplit(" ", 1)
        configs.setdefault((r["shape"], loss, r["dtype"], r["provider"]), {})[batching] = r
    assert {loss for _, loss, _, _ in configs} == {"bce", "sampled_softmax"}
    assert all(set(pair) == {"padded", "packed"} for pair in configs.values()), configs
    for pair in configs.values():
        padded, packed = pair["padded"], pair["packed"]
        assert padded["speedup_vs_padded"] == ""
        assert float(packed["speedup_vs_padded"]) == pytest.approx(float(padded["ms"]) / float(packed["ms"]), rel=5e-3)
    # The packed reference is checked against the padded one: the same loss and gradient.
    assert all(float(pair["packed"]["max_rel_error"]) < 1e-4 for (*_, provider), pair in configs.items()
               if provider == "reference")  # fmt: skip


@pytest.mark.parametrize("name", ["attention", "softmax_loss"])
def test_compiled_reference_runs_on_the_first_cpu_shape(results, name):
    compiled = [r for r in read(results) if r["benchmark"] == name and r["provider"] == "compile"]
    assert compiled[0]["status"] == "ok"
    assert all(r["status"].startswith("skipped") for r in compiled[1:] if r["shape"] != compiled[0]["shape"])


def test_plot_draws_the_speedup_charts(results, tmp_path):
    written = load("plot").main(["--csv", str(results), "--out", str(tmp_path)])
    names = {p.name for p in written}
    for name in BENCHMARKS:
        assert any(n.startswith(name) and n.endswith("-speedup.png") for n in names), names
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_rows_are_upserted_by_key(tmp_path):
    common = load("common")
    path = tmp_path / "results.csv"
    key = dict(benchmark="attention", gpu="GPU", torch="2", triton="3", commit="abc", shape="S", variant="dense",
               dtype="bfloat16", mode="forward", provider="triton", status="ok")  # fmt: skip
    first = common.Row(**key, ms=2.0)
    other = dataclasses.replace(first, provider="reference", ms=4.0)
    common.upsert(path, [first, other])
    common.upsert(path, [dataclasses.replace(first, ms=1.0)])  # the same key: replaced
    common.upsert(path, [dataclasses.replace(first, commit="def", ms=3.0)])  # another commit: added
    rows = read(path)
    assert sorted((r["provider"], r["commit"], float(r["ms"])) for r in rows) == [
        ("reference", "abc", 4.0), ("triton", "abc", 1.0), ("triton", "def", 3.0)
    ]  # fmt: skip


def test_python_m_benchmarks_runs_a_benchmark(tmp_path, capsys):
    """`python -m benchmarks NAME ...` (what `make bench` runs) reaches the benchmark."""
    path = tmp_path / "results.csv"
    threads = torch.get_num_threads()
    try:
        load().main(["sasrec", "--quick", "--device", "cpu", "--providers", "reference", "--csv", str(path)])
    finally:
        torch.set_num_threads(threads)
    assert {r["provider"] for r in read(path)} == {"reference"}
    assert "rows upserted" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="benchmark: expected one of"):
        load().main(["nonsense"])


def test_retrieval_quick_run_checks_the_score_matrix_path(tmp_path):
    """The retrieval benchmark (not in `results`: its compiled provider would compile for
    tens of seconds more) times the reference against torch's [B, N] path and checks it."""
    path = tmp_path / "results.csv"
    threads = torch.get_num_threads()
    try:
        load("retrieval").main(["--quick", "--device", "cpu", "--providers", "reference,torch", "--csv", str(path)])
    finally:
        torch.set_num_threads(threads)
    rows = read(path)
    assert {r["variant"] for r in rows} == {"topk", "ranks"}
    assert {(r["provider"], r["status"]) for r in rows} == {("reference", "ok"), ("torch", "ok")}
    assert all(float(r["max_rel_error"]) < 1e-5 for r in rows if r["provider"] == "torch")
