"""seqrec_kernels.integrations.recbole.SASRec against RecBole's own SASRec on identical
weights (RecBole in float64 the truth, in float32 the baseline of the tolerance rule):
the sequence outputs and scores in eval mode, the CE and BPR losses and their gradients,
checkpoints both ways; and a short RecBole training run on ml-100k (on the built-in
synthetic data in a clone without ../shared/data, as in CI).

`make test` runs this file in its own venv with RecBole installed (`make test-recbole`,
SEQREC_REQUIRE_RECBOLE=1: a missing RecBole fails). A bare pytest skips it where RecBole is
not installed: `pip install "seqrec_kernels[recbole]"` (tested with RecBole 1.2.1, which
needs numpy < 2)."""

import copy
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

from attention_helpers import assert_flash_rule
from backends_under_test import ALL
from seqrec_kernels.backends import EXTENSION_ERROR

ML_100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k.inter"
HAVE_RECBOLE = importlib.util.find_spec("recbole") is not None
if not HAVE_RECBOLE and os.environ.get("SEQREC_REQUIRE_RECBOLE") == "1":
    raise RuntimeError("SEQREC_REQUIRE_RECBOLE=1 but RecBole is not installed (pip install 'seqrec_kernels[recbole]')")
needs_recbole = pytest.mark.skipif(
    not HAVE_RECBOLE,
    reason="RecBole is not installed (pip install 'seqrec_kernels[recbole]': RecBole 1.2.1 with numpy < 2)",
)


@pytest.mark.skipif(HAVE_RECBOLE, reason="RecBole is installed")
def test_import_without_recbole_says_how_to_install():
    with pytest.raises(ImportError, match=r"pip install 'seqrec_kernels\[recbole\]'"):
        import seqrec_kernels.integrations.recbole  # noqa: F401


def _atomic_data(data_path: Path) -> str:
    """Writes the dataset RecBole reads into data_path/<name>/<name>.inter and returns its name:
    ml-100k where ../shared/data has it, else the built-in synthetic data (a clone without
    ../shared, as in CI)."""
    if ML_100K.exists():
        (data_path / "ml-100k").mkdir()
        (data_path / "ml-100k" / "ml-100k.inter").symlink_to(ML_100K)
        return "ml-100k"
    from seqrec_kernels.data.synthetic import synthetic_interactions

    sequences = synthetic_interactions(num_users=300, num_items=300, seed=0).sequences
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [f"{user}\t{item}\t{time}" for user, items in enumerate(sequences) for time, item in enumerate(items)]
    (data_path / "synthetic").mkdir()
    (data_path / "synthetic" / "synthetic.inter").write_text("\n".join(lines) + "\n")
    return "synthetic"


@pytest.fixture(scope="module")
def recbole_data(tmp_path_factory):
    """RecBole's config and data loaders for SASRec on ml-100k (the synthetic data where it is
    absent): its users with at most 40 ratings (305 of ml-100k's 943, 8,390 ratings), a small
    model, two epochs; the C++ backend (the CPU reference's dropout is slow) where the
    extension is built."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation

    from seqrec_kernels.integrations.recbole import SASRec

    data_path = tmp_path_factory.mktemp("recbole")
    name = _atomic_data(data_path)
    config = Config(
        model=SASRec,
        dataset=name,
        config_dict=dict(
            data_path=str(data_path), checkpoint_dir=str(data_path / "saved"), use_gpu=False, device="cpu",
            load_col={"inter": ["user_id", "item_id", "timestamp"]},
            user_inter_num_interval="[0,40]", n_layers=2, n_heads=2, hidden_size=32, inner_size=64,
            MAX_ITEM_LIST_LENGTH=20, train_neg_sample_args=None, epochs=2, train_batch_size=512,
            eval_batch_size=4096, show_progress=False, save_dataset=False, save_dataloaders=False,
            seqrec_backend="cpp" if EXTENSION_ERROR is None else "reference",
        ),
    )  # fmt: skip
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    return config, train, valid


def twin_models(config, dataset, loss_type):
    """RecBole's SASRec and ours with RecBole's weights, in eval mode."""
    from seqrec_kernels.integrations.recbole import RecBoleSASRec, SASRec

    config = copy.deepcopy(config)
    config["loss_type"] = loss_type
    theirs = RecBoleSASRec(config, dataset).eval()
    ours = SASRec(config, dataset).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def outputs_and_grads(model, interaction):
    """The sequence outputs, full-sort scores and loss of a batch, and the gradients of
    every parameter of the loss."""
    model.zero_grad(set_to_none=True)
    loss = model.calculate_loss(interaction)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
        output = model(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
    return {"output": output, "scores": scores, "loss": loss.detach()}, grads


def check_against_recbole(theirs, ours, interaction):
    truth, truth_grads = outputs_and_grads(copy.deepcopy(theirs).double(), interaction)
    baseline, base_grads = outputs_and_grads(theirs, interaction)
    result, grads = outputs_and_grads(ours, interaction)
    for name, value in result.items():
        assert value.dtype == torch.float32
        assert_flash_rule(name, value, truth[name], baseline[name], torch.float32, 2)
    assert grads.keys() == truth_grads.keys()
    for name, grad in grads.items():
        assert_flash_rule(f"d {name}", grad, truth_grads[name], base_grads[name], torch.float32, 3)


def small_batch(train, rows):
    """The first `rows` sequences of the first training batch."""
    interaction = next(iter(train))
    return interaction[torch.arange(rows)]


@needs_recbole
@pytest.mark.parametrize("backend", ALL)
def test_ce_matches_recbole(recbole_data, backend):
    """loss_type CE: same outputs, scores, loss (full_softmax_loss over every item) and gradients."""
    config, train, _ = recbole_data
    theirs, ours = twin_models(config, train.dataset, "CE")
    ours.set_backend(backend)
    check_against_recbole(theirs, ours, small_batch(train, 8 if backend == "triton" else 64))


@needs_recbole
def test_bpr_matches_recbole(recbole_data):
    """loss_type BPR (RecBole's BPRLoss on fused outputs): same loss and gradients."""
    from recbole.data.interaction import Interaction

    config, train, _ = recbole_data
    theirs, ours = twin_models(config, train.dataset, "BPR")
    interaction = small_batch(train, 64)
    negatives = torch.randint(1, train.dataset.item_num, interaction[ours.POS_ITEM_ID].shape)
    interaction.update(Interaction({ours.NEG_ITEM_ID: negatives}))
    check_against_recbole(theirs, ours, interaction)


@needs_recbole
def test_import_keeps_anomaly_detection_off():
    """RecBole's model package turns autograd anomaly detection on when imported; the
    integration restores the setting it found (off), so backward passes stay fast."""
    import seqrec_kernels.integrations.recbole  # noqa: F401

    assert not torch.is_anomaly_enabled()


@needs_recbole
def test_checkpoints_load_both_ways(recbole_data):
    """The same state_dict keys: RecBole's SASRec loads ours and ours loads RecBole's (strict)."""
    from seqrec_kernels.integrations.recbole import RecBoleSASRec

    config, train, _ = recbole_data
    theirs, ours = twin_models(config, train.dataset, "CE")
    fresh_theirs = RecBoleSASRec(config, train.dataset)
    fresh_theirs.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(fresh_theirs.state_dict()[name], tensor)


@needs_recbole
def test_recbole_training_run(recbole_data, tmp_path, monkeypatch):
    """RecBole's Trainer trains the drop-in (dropout on, CE through full_softmax_loss): the
    training loss falls from epoch to epoch, and the validation NDCG@10 (RecBole's full
    ranking) at least twice that of a random ranking."""
    from recbole.trainer import Trainer

    from seqrec_kernels.integrations.recbole import SASRec

    monkeypatch.chdir(tmp_path)  # RecBole's Trainer writes log_tensorboard/ into the working directory
    config, train, valid = recbole_data
    trainer = Trainer(config, SASRec(config, train.dataset))
    _, result = trainer.fit(train, valid, saved=False, show_progress=False)
    losses = [trainer.train_loss_dict[epoch] for epoch in range(config["epochs"])]
    assert all(math.isfinite(loss) for loss in losses) and losses[1] < losses[0], losses
    random_ndcg = sum(1 / math.log2(rank + 1) for rank in range(1, 11)) / train.dataset.item_num
    assert result["ndcg@10"] > 2 * random_ndcg, result
