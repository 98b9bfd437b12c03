"""The `seqrec` command line: one-line user errors with exit status 2, --debug, progress
output off a terminal, and every SASRecConfig field settable from the command line."""

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
import typing

import pytest
import torch

from seqrec_kernels.cli import build_parser, main, train_config
from seqrec_kernels.models.sasrec import SASRecConfig
from seqrec_kernels.train import TrainConfig, build_model, load_checkpoint

TINY = ["--epochs", "2", "--eval-every", "2", "--hidden", "8", "--blocks", "1", "--max-len", "6", "--device", "cpu",
        "--backend", "reference", "--num-negatives", "4"]  # fmt: skip


def sasrec_file(path, lengths, num_items=30):
    """A SASRec-format file: user u has lengths[u] interactions (items cycle over the catalog)."""
    lines = [f"{u} {1 + (u + t) % num_items}" for u, length in enumerate(lengths) for t in range(length)]
    path.write_text("\n".join(lines) + "\n")
    return path


def fails(capsys, argv, *fragments):
    """Runs the CLI, expects exit status 2 and one stderr line `seqrec: error: ...` holding fragments."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("seqrec: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (2 epochs, default progress setting) with stdout and stderr
    captured in StringIO, which is not a terminal: (run directory, stdout, stderr)."""
    root = tmp_path_factory.mktemp("cli")
    data = sasrec_file(root / "tiny.txt", [6] * 20)
    out, stdout, stderr = root / "run", io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main(["train", "--data", str(data), "--out", str(out), *TINY]) == 0
    return out, stdout.getvalue(), stderr.getvalue()


def test_progress_off_a_terminal_is_one_line_per_epoch(run):
    _, stdout, stderr = run
    assert "\r" not in stdout and "\r" not in stderr  # no progress-bar fragments
    lines = stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1", "epoch 2"]
    assert "valid NDCG@10" in [line for line in lines if line.startswith("epoch 2")][0]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_on_a_terminal(tmp_path):
    data = sasrec_file(tmp_path / "tiny.txt", [6] * 20)
    stdout, stderr = io.StringIO(), Terminal()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY])
    assert "\r" in stderr.getvalue() and "epoch 1" in stderr.getvalue()  # tqdm's bar
    assert "epoch 1:" not in stdout.getvalue() and "epoch 2:" in stdout.getvalue()  # validation lines only


def test_missing_and_malformed_data(tmp_path, capsys):
    fails(capsys, ["train", "--data", str(tmp_path / "nope.txt"), *TINY], "data: no such file", "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\n1 2 3\n")
    fails(capsys, ["train", "--data", str(bad), *TINY], "bad.txt:2: expected 'user item'")


def test_too_small_data_says_what_is_missing(tmp_path, capsys):
    short = sasrec_file(tmp_path / "short.txt", [2, 1, 2])
    fails(
        capsys,
        ["train", "--data", str(short), *TINY],
        "no user has the 3 interactions",
        "got 3 users, longest history 2",
    )
    three = sasrec_file(tmp_path / "three.txt", [3, 3])
    fails(capsys, ["train", "--data", str(three), *TINY], "0 users have a training pair")


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--epochs", "0"], "epochs: expected an int >= 1, got 0"),
        (["--epochs", "x"], "argument --epochs: invalid int value: 'x' (see seqrec train --help)"),
        (["--loss", "nope"], "argument --loss: invalid choice"),
        (["--hidden", "50", "--heads", "3"], "hidden: expected a multiple of heads (3)"),
        (["--dropout", "1.5"], "dropout: expected a probability in [0, 1)"),
        (["--lr", "0"], "lr: expected a positive learning rate"),
        (["--batch-size", "-1"], "batch_size: expected an int >= 1"),
    ],
)
def test_bad_option_values(capsys, options, fragment):
    fails(capsys, ["train", *options], fragment)


def test_bad_checkpoints(tmp_path, capsys):
    fails(capsys, ["eval", str(tmp_path / "nope.pt")], "checkpoint: no such file")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    fails(capsys, ["eval", str(garbage)], "is not a torch checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    fails(capsys, ["recommend", str(foreign), "1"], "is not a seqrec checkpoint")


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "nope.pt"), "--debug"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("Traceback")
    assert err.endswith(f"seqrec: error: checkpoint: no such file {tmp_path / 'nope.pt'}\n")


def test_subprocess_exit_status_and_single_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "seqrec_kernels", "plot", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("seqrec: error: run: no metrics.jsonl") and result.stderr.count("\n") == 1


def test_eval_recommend_and_bad_items(run, capsys):
    out, _, _ = run
    main(["eval", str(out / "best.pt")])
    assert "NDCG@10" in capsys.readouterr().out
    fails(capsys, ["recommend", str(out / "best.pt"), "1", "999"], "items: expected ids in 1..25, got [1, 999]")


def non_default(name, kind, default):
    """A valid value of a SASRecConfig field other than its default."""
    if typing.get_origin(kind) is typing.Literal:
        return next(choice for choice in typing.get_args(kind) if choice != default)
    if kind is bool:
        return not default
    if kind is int:
        return default * 2
    if kind is float:
        return default / 2
    raise AssertionError(f"SASRecConfig.{name}: no test value for type {kind}")


def test_every_model_option_round_trips_from_the_command_line():
    hints = typing.get_type_hints(SASRecConfig)
    fields = [f for f in dataclasses.fields(SASRecConfig) if f.name != "num_items"]
    expected = {f.name: non_default(f.name, hints[f.name], f.default) for f in fields}
    argv = ["train"]
    for name, value in expected.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    config = train_config(build_parser().parse_args(argv))
    assert config.model == SASRecConfig(num_items=0, **expected)
    assert TrainConfig.from_dict(dataclasses.asdict(config)) == config  # what checkpoints store
    model = build_model(config, num_items=30, device="cpu")
    assert model.config == SASRecConfig(num_items=30, **expected)


def test_checkpoints_written_before_the_model_config_still_load(run, tmp_path, capsys):
    """Checkpoints used to store a flat TrainConfig (model options beside training ones)."""
    out, _, _ = run
    state = torch.load(out / "best.pt", weights_only=False)
    new = state["train_config"]
    old = {name: value for name, value in new.items() if name != "model"}
    old.update({name: new["model"][name] for name in ("max_len", "hidden", "blocks", "heads", "dropout", "norm_first",
                                                       "loss", "num_negatives", "sampler")})  # fmt: skip
    old_state = dict(state, train_config=old, model_config={k: v for k, v in state["model_config"].items()
                                                            if k != "gbce_t"})  # fmt: skip
    torch.save(old_state, tmp_path / "old.pt")
    model, _ = load_checkpoint(tmp_path / "old.pt")
    reference, _ = load_checkpoint(out / "best.pt")
    assert model.config == reference.config
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    main(["eval", str(tmp_path / "old.pt")])
    assert "NDCG@10" in capsys.readouterr().out


def test_demo_runs_every_backend_from_a_plain_shell():
    """`seqrec demo` as a user types it: TRITON_INTERPRET unset at import (the crash of issue
    27: Triton kernels decorated for the GPU, then called on CPU tensors). Every backend
    available on this machine prints a row per dtype, with errors that are small numbers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = subprocess.run([sys.executable, "-m", "seqrec_kernels", "demo", "--batch", "3", "--length", "9",
                             "--head-dim", "5"], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    expected = ["reference", "triton", "cpp"] if device == "cpu" else ["reference", "triton", "cuda"]
    assert sorted({row[0] for row in rows}) == sorted(expected), result.stdout
    assert len(rows) == 2 * len(expected)
    for row in rows:
        assert all(float(error) < 0.1 for error in row[2:]), row
