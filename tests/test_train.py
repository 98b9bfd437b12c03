"""End-to-end training on the synthetic data, checkpoints, resume, interruption, the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from seqrec_kernels import backends
from seqrec_kernels.backends import Backend
from seqrec_kernels.cli import main
from seqrec_kernels.data.dataset import LeaveOneOutSplit, SequenceDataset
from seqrec_kernels.data.synthetic import synthetic_interactions
from seqrec_kernels.metrics import evaluate
from seqrec_kernels.train import TrainConfig, load_checkpoint, train
from stubs import FixedScores


def config(tmp_path, **overrides):
    options = dict(epochs=8, eval_every=4, hidden=32, batch_size=128, dropout=0.2, out=str(tmp_path / "run"),
                   progress=False, device="cpu")  # fmt: skip
    options.update(overrides)
    return TrainConfig.from_dict(options)  # model options (hidden, loss, ...) beside the training ones


@pytest.mark.parametrize("loss", ["bce", "sampled_softmax"])
def test_training_beats_popularity(tmp_path, loss):
    report = train(config(tmp_path, loss=loss, num_negatives=64))
    split = LeaveOneOutSplit.of(SequenceDataset.from_interactions(synthetic_interactions()))
    popularity = {p: evaluate(FixedScores(split.train_item_counts(), max_len=50), split, "test", p) for p in report}
    for protocol in report:
        assert report[protocol]["NDCG@10"] > popularity[protocol]["NDCG@10"] + 0.1, (report, popularity)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == list(range(1, 9)) and "valid" in records[3]
    assert (run / "best.pt").exists() and (run / "last.pt").exists() and not list(run.glob("*.tmp"))
    assert json.loads((run / "test_metrics.json").read_text())["sampled"] == report["sampled"]


def test_resume_gives_the_same_state(tmp_path):
    straight = config(tmp_path / "straight", epochs=4, deterministic=True)
    train(straight)
    split_run = config(tmp_path / "split", epochs=2, deterministic=True)
    train(split_run)
    split_run.epochs, split_run.resume = 4, True
    train(split_run)
    a, _ = load_checkpoint(tmp_path / "straight" / "run" / "last.pt")
    b, state = load_checkpoint(tmp_path / "split" / "run" / "last.pt")
    assert state["state"]["epoch"] == 4
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_interrupt_saves_and_exits_cleanly(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = LeaveOneOutSplit.training_batch

    def interrupt_in_second_epoch(self, users, max_len):
        calls["n"] += 1
        if calls["n"] > 16:  # the synthetic data has 16 batches per epoch
            raise KeyboardInterrupt
        return original(self, users, max_len)

    monkeypatch.setattr(LeaveOneOutSplit, "training_batch", interrupt_in_second_epoch)
    assert train(config(tmp_path)) == {}
    _, state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["state"]["epoch"] == 1


def test_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "--epochs", "2", "--eval-every", "1", "--hidden", "16", "--out", str(run), "--no-progress",
          "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert "test metrics" in out
    # `auto` trains on the extension's C++ path on a CPU where it is built (twice the reference's speed)
    # (bce: no loss op, so the log names one backend)
    assert f"backend {'cpp' if Backend.CPP in backends.available('cpu') else 'auto'}," in out
    main(["eval", str(run / "best.pt")])
    assert "NDCG@10" in capsys.readouterr().out
    main(["recommend", str(run / "best.pt"), "1", "2", "3", "-k", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].lstrip().startswith("1. item")
    main(["plot", str(run)])
    assert (run / "curves.png").exists()


@pytest.mark.skipif(Backend.CPP not in backends.available("cpu"), reason="the extension is not built")
@pytest.mark.parametrize("loss", ["sampled_softmax", "full_softmax"])
def test_auto_on_cpu_trains_attention_on_cpp_and_losses_on_the_reference(tmp_path, monkeypatch, capsys, loss):
    """The C++ loops beat the reference's attention on a CPU, not its BLAS matrix products in the
    losses (several times slower at Games' shape): `auto` splits the two, and the log says so."""
    import seqrec_kernels.models.sasrec as sasrec

    backends_seen = {}
    for op in ("fused_attention_varlen", f"{loss}_loss"):
        original = getattr(sasrec, op)

        def spy(*args, _op=op, _original=original, **kwargs):
            backends_seen[_op] = Backend.parse(kwargs["backend"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(sasrec, op, spy)
    main(["train", "--epochs", "1", "--eval-every", "1", "--hidden", "16", "--loss", loss, "--num-negatives", "8",
          "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"])  # fmt: skip
    assert backends_seen == {"fused_attention_varlen": Backend.CPP, f"{loss}_loss": Backend.AUTO}
    assert "backend cpp, loss on reference," in capsys.readouterr().out


def test_distributed_data_parallel_with_gloo(tmp_path):
    """torchrun with 2 CPU processes: one log, one metrics file, one report, from process 0."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "seqrec_kernels", "train", "--epochs", "2", "--eval-every", "1", "--hidden", "16",
               "--out", str(run), "--no-progress", "--device", "cpu"]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout and result.stdout.count("test metrics") == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    model, state = load_checkpoint(run / "last.pt")
    assert state["state"]["epoch"] == 2
