"""HSTU, GenRank, DFGR, SFGR: no label leakage (fp64), train/serve agreement, gradients, odd shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.data.batching import JaggedBatch
from genrec.data.info import DatasetInfo
from genrec.models import build_model
from tests.helpers import make_batch

GENERATIVE = ["hstu", "genrank", "dfgr", "dfgr_sparse", "sfgr"]
VARIANTS = {"dfgr_sparse": ("dfgr", {"fake_flow": "targets"})}  # test name -> model and its arguments
INFO = DatasetInfo(num_items=40, num_actions=5, num_users=10, item_genres=np.zeros((41, 1), np.float32),
                   rating_values=[1.0, 2.0, 3.0, 4.0, 5.0])


def make_model(name: str, dtype=torch.float64, **args):
    """A tiny model; ``name`` is a registry name or one of :data:`VARIANTS`."""
    torch.manual_seed(0)
    name, preset = VARIANTS.get(name, (name, {}))
    model = build_model(name, {"d_model": 16, "num_heads": 2, "num_layers": 2, "dropout": 0.0, **preset, **args},
                        INFO, 32)
    return model.to(dtype).eval()


def _targets_info(batch: JaggedBatch):
    seq = batch.sequence_index()[batch.target_mask]
    req = batch.request_ids[batch.target_mask]
    return seq, req


@pytest.mark.parametrize("name", GENERATIVE)
@pytest.mark.parametrize("seed", [0, 1])
def test_changing_a_requests_actions_moves_no_prediction_in_or_before_it(name, seed):
    model = make_model(name)
    # SFGR hides the actions of all targets in a pass, so its earlier requests must be history;
    # DFGR's sparse fake flow holds only the targets: the second half of each sequence
    batch = make_batch([13, 1, 7, 20], seed, all_targets=name not in ("sfgr", "dfgr_sparse"))
    with torch.no_grad():
        before = model.rank_logits(batch)
    rng = np.random.default_rng(100 + seed)
    seq_of = batch.sequence_index()
    moved_later = False
    for b in (0, 3):
        in_seq = torch.nonzero(seq_of == b).flatten()
        event = int(in_seq[rng.integers(0, len(in_seq) // 2 - 2)])
        r = int(batch.request_ids[event])
        same_request = in_seq[batch.request_ids[in_seq] == r]
        perturbed = JaggedBatch(**{k: v.clone() for k, v in batch.tensors().items()})
        perturbed.actions[same_request] = (perturbed.actions[same_request] + 1 + rng.integers(0, 4)) % 5
        perturbed.labels[same_request] = (perturbed.actions[same_request] >= 3).float()
        with torch.no_grad():
            after = model.rank_logits(perturbed)
        seq, req = _targets_info(batch)
        untouched = (seq != b) | (req <= r)
        assert torch.equal(before[untouched], after[untouched]), "prediction moved by its own/future labels"
        later = (seq == b) & (req > r)
        moved_later |= bool(later.any()) and not torch.equal(before[later], after[later])
    assert moved_later, "actions of an earlier request must influence later predictions"


@pytest.mark.parametrize("name", ["dfgr", "dfgr_sparse", "genrank"])
def test_training_pass_matches_serving_from_history_only(name):
    model = make_model(name, dtype=torch.float32)
    # the sparse fake flow on targets in the second half of each sequence only
    batch = make_batch([17, 9, 1, 12, 30], seed=3, all_targets=False) if name == "dfgr_sparse" else \
        make_batch([17, 9, 1, 12], seed=3)
    with torch.no_grad():
        trained = model.rank_logits(batch)
    seq, req = _targets_info(batch)
    flat_targets = torch.nonzero(batch.target_mask).flatten()
    checked = 0
    for i, event in enumerate(flat_targets.tolist()):
        b, r = int(seq[i]), int(req[i])
        s = int(batch.offsets[b])
        in_seq = torch.arange(s, int(batch.offsets[b + 1]))
        hist = in_seq[batch.request_ids[in_seq] < r]
        if len(hist) == 0:
            continue
        history = JaggedBatch(
            offsets=torch.tensor([0, len(hist)]), items=batch.items[hist], actions=batch.actions[hist],
            labels=batch.labels[hist], timestamps=batch.timestamps[hist], request_ids=batch.request_ids[hist],
            target_mask=torch.zeros(len(hist), dtype=torch.bool), users=torch.tensor([b]))
        with torch.no_grad():
            served = model.score(history, batch.items[event].view(1, 1), batch.timestamps[event].view(1))[..., 0]
        assert abs(float(served) - float(trained[i])) <= 1e-5
        checked += 1
    assert checked > 20


@pytest.mark.parametrize("name", ["dfgr", "genrank"])
def test_serving_scores_candidates_independently(name):
    model = make_model(name)
    batch = make_batch([11], seed=4)
    history = JaggedBatch(**batch.tensors())
    cands = torch.tensor([[3, 7, 9, 21]])
    when = torch.tensor([batch.timestamps.max() + 60])
    with torch.no_grad():
        together = model.score(history, cands, when)[..., 0]
        alone = torch.stack([model.score(history, cands[:, j: j + 1], when)[..., 0] for j in range(4)], -1).view(1, 4)
    assert torch.allclose(together, alone, atol=1e-12)


@pytest.mark.parametrize("name", GENERATIVE)
def test_gradients_match_finite_differences(name):
    model = make_model(name)
    batch = make_batch([3, 1, 4], seed=5)
    params = [p for p in model.parameters() if p.requires_grad]
    probe = model.heads.mlp[-1].bias  # gradient flows through the whole network into every target

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            probe.copy_(w)
        return model(batch)["loss"]

    model.zero_grad()
    model(batch)["loss"].backward()
    assert all(p.grad is not None for p in params)
    eps = 1e-6
    w0 = probe.detach().clone()
    analytic = probe.grad.clone()
    for j in range(len(w0)):
        plus, minus = w0.clone(), w0.clone()
        plus[j] += eps
        minus[j] -= eps
        numeric = (loss_of(plus) - loss_of(minus)) / (2 * eps)
        assert abs(float(numeric.detach()) - float(analytic[j])) < 1e-6
    loss_of(w0)
    # and through the attention: torch.autograd.gradcheck on the block input
    x = torch.randn(1, 5, 16, dtype=torch.float64, requires_grad=True)
    from genrec.ops.layout import TokenLayout

    t = torch.tensor
    layout = TokenLayout(valid=t([[True] * 5]), request=t([[0, 1, 1, 2, 2]]), event=t([[0, 1, 2, 3, 4]]),
                         fake=t([[False, False, False, True, True]]), position=t([[0, 1, 2, 3, 3]]),
                         timestamp=t([[0, 5, 5, 9, 9]]), rule="dual_flow")
    block = model.blocks[0]
    assert torch.autograd.gradcheck(lambda inp: block(inp, layout), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", GENERATIVE)
@pytest.mark.parametrize("lengths", [[1], [1, 1, 1], [2, 31, 5], [32]])
def test_odd_ragged_and_single_event_sequences(name, lengths):
    model = make_model(name, dtype=torch.float32)
    model.train()
    batch = make_batch(lengths, seed=sum(lengths))
    out = model(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    model.eval()
    with torch.no_grad():
        logits = model.rank_logits(batch)
    assert logits.shape == (int(batch.target_mask.sum()),) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", GENERATIVE)
def test_predictions_do_not_depend_on_batch_neighbours(name):
    model = make_model(name)
    b = make_batch([9, 25, 4], seed=7)
    a = JaggedBatch(**{k: v[:9] if k not in ("offsets", "users") else v[:2] for k, v in b.tensors().items()})
    with torch.no_grad():
        alone = model.rank_logits(a)
        together = model.rank_logits(b)[: int(a.target_mask.sum())]
    assert torch.allclose(alone, together, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", GENERATIVE)
def test_a_training_step_on_a_moved_batch_reads_nothing_back_from_the_device(name, backend):
    """On the ``meta`` device any host read raises: the loss of a moved batch (times checked on the
    host; its longest sequence, most targets of a row and number of targets carried from the host)
    and its gradients build there, the gathers at the targets sized by that number, so on CUDA the
    step queues without a sync. On the triton backend the attention is its custom op's fake (the
    kernels' layout work, which runs for real, builds on meta as tests/ops/triton/test_tiles.py
    checks). A batch built on the device reads its counts back (the test can fail)."""
    from genrec.ops.layout import time_spans_checked_on_host
    from tests.helpers import with_last_targets

    if backend == "triton":  # the kernels' module imports Triton
        pytest.importorskip("triton")
        from genrec.ops.triton.backend import TRITON
    model = make_model(name, torch.float32, d_model=32).train().to("meta")  # head dim 16: the kernels' least
    if backend == "triton":
        if name == "genrank":
            pytest.skip("GenRank's softmax attention is flex_attention there, which refuses meta tensors")
        for block in model.blocks:
            block.backend = TRITON
    batch = with_last_targets(make_batch([37, 90, 5, 61, 1], seed=2), 0.1).to("meta")
    with time_spans_checked_on_host():
        loss = model(batch)["loss"]
        loss.backward()
        assert loss.device.type == "meta" and all(p.grad is not None for p in model.blocks.parameters())
        built_there = JaggedBatch(**batch.tensors(), known_max_len=batch.known_max_len,
                                  known_max_targets=batch.known_max_targets)  # its number of targets unknown
        with pytest.raises(RuntimeError, match="meta"):
            model(built_there)


def test_multiclass_and_extra_binary_heads_train():
    model = make_model("dfgr", dtype=torch.float32, extra_thresholds=[1.5, 4.5], multiclass_weight=0.5)
    model.train()
    out = model(make_batch([8, 5], seed=2))
    assert {"ranking_loss", "extra_binary_loss", "multiclass_loss"} <= set(out)
    out["loss"].backward()


@pytest.mark.parametrize("name", ["hstu", "dfgr", "dfgr_sparse", "sfgr", "unigrf"])
def test_a_model_without_the_relative_bias_has_no_tables_and_equals_one_whose_tables_are_zero(name):
    """``relative_bias: false``: no bias tables in any block (nothing to train or to checkpoint), and
    training logits and served scores exactly those of the biased model, whose tables start at zero,
    before it learns them. A bias left in (or a table read) would show once those tables are moved."""
    from tests.models.test_unigrf import make_unigrf

    def build(**args):
        return make_unigrf("hstu", **args) if name == "unigrf" else make_model(name, **args)
    without, with_bias = build(relative_bias=False), build()
    names = {n for n, _ in without.named_parameters()}
    assert not any("rel_pos" in n or "rel_time" in n for n in names)
    assert names == {n for n, _ in with_bias.named_parameters() if "rel_" not in n}
    batch = make_batch([13, 1, 7, 20], seed=2, all_targets=name not in ("sfgr", "dfgr_sparse"))
    history, cands = make_batch([11], seed=4), torch.tensor([[3, 7, 9, 21]])
    when = history.timestamps.max().view(1) + 3600

    def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return model.rank_logits(batch), model.score(history, cands, when)
    plain = outputs(without)
    assert all(torch.equal(a, b) for a, b in zip(plain, outputs(with_bias), strict=True))
    with torch.no_grad():
        for block in with_bias.blocks:
            block.rel_pos.normal_(0, 0.5)
            block.rel_time.normal_(0, 0.5)
    assert not any(torch.allclose(a, b) for a, b in zip(plain, outputs(with_bias), strict=True))


@pytest.mark.parametrize("name", ["hstu", "sfgr", "dfgr", "dfgr_sparse", "genrank"])
def test_the_last_block_skips_the_tokens_no_loss_reads_and_changes_no_logit_or_gradient(name, monkeypatch):
    """The last block of HSTU, SFGR, DFGR and GenRank computes the outputs of the tokens from the
    first one the loss reads (HSTU: the first target's item token; SFGR: the first target's token;
    DFGR: the fake flow; GenRank: the candidates) and nothing before: the loss and every gradient
    are those of the blocks run over every token (fp64), and the last block is asked for at most
    the tokens from there."""
    from genrec.models import dfgr, genrank, hstu, sfgr
    from genrec.nn.hstu import HSTUBlock
    from genrec.nn.softmax import SoftmaxBlock
    from tests.helpers import loss_and_grads, record_outputs_from, with_last_targets

    model = make_model(name).train()
    batch = with_last_targets(make_batch([13, 30, 7], seed=4), 0.25)  # first target: event 5 of 7
    block = SoftmaxBlock if name == "genrank" else HSTUBlock
    full_forward = block.forward
    asked = record_outputs_from(monkeypatch, block)
    loss, grads = loss_and_grads(model, batch)
    n = batch.max_len
    assert asked == [0, {"hstu": 2 * 5, "sfgr": 5, "dfgr": n, "dfgr_sparse": n, "genrank": n}[name]]
    module = {"hstu": hstu, "sfgr": sfgr, "dfgr": dfgr, "dfgr_sparse": dfgr, "genrank": genrank}[name]
    assert module.last_outputs_from(batch) == asked[1]  # the offset the FLOP counts take (benchmarks/speed.py)
    monkeypatch.setattr(block, "forward", lambda self, x, layout, *args, outputs_from=0: (
        full_forward(self, x, layout, *args)[:, outputs_from:]))  # every token's outputs, then sliced
    want_loss, want_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == want_grads.keys()
    for key, grad in want_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-10, atol=1e-12, msg=key)
