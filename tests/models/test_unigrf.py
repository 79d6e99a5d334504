"""UniGRF: no leakage into either task (fp64), one code path for training and candidate scoring, the
enhancer's mining rule, the weighter's formula, the retrieval loss's masking and logQ, and learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genrec.data.batching import JaggedBatch
from genrec.models import build_model
from genrec.models.unigrf import AdaptiveWeighter, adaptive_weights, relative_score
from genrec.nn.events import item_action_layout
from tests.helpers import make_batch
from tests.models.test_generative import INFO

BACKBONES = ["hstu", "llama"]


def make_unigrf(backbone: str, dtype=torch.float64, **args) -> torch.nn.Module:
    torch.manual_seed(0)
    args = {"backbone": backbone, "d_model": 16, "num_heads": 2, "num_layers": 2, "dropout": 0.0,
            "num_negatives": 16, "hard_negatives": 4, "enhancer_pool": 20, **args}
    return build_model("unigrf", args, INFO, 32).to(dtype).eval()


def _clone(batch: JaggedBatch) -> JaggedBatch:
    return JaggedBatch(**{k: v.clone() for k, v in batch.tensors().items()})


def _event_rows(batch: JaggedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence, request and position of every target, in flat target order."""
    m = batch.target_mask
    return batch.sequence_index()[m], batch.request_ids[m], batch.positions()[m]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("seed", [0, 1])
def test_feedback_of_a_request_moves_no_ranking_prediction_in_or_before_it(backbone, seed):
    model = make_unigrf(backbone)
    batch = make_batch([13, 1, 7, 20], seed)
    with torch.no_grad():
        before = model.rank_logits(batch)
    seq, req, _ = _event_rows(batch)
    rng = np.random.default_rng(seed)
    moved_later = False
    for b in (0, 3):
        in_seq = torch.nonzero(batch.sequence_index() == b).flatten()
        r = int(batch.request_ids[in_seq[rng.integers(0, len(in_seq) // 2)]])
        same = in_seq[batch.request_ids[in_seq] == r]
        perturbed = _clone(batch)
        perturbed.labels[same] = 1 - perturbed.labels[same]
        with torch.no_grad():
            after = model.rank_logits(perturbed)
        untouched = (seq != b) | (req <= r)
        assert torch.equal(before[untouched], after[untouched]), "P(b_k) moved with b_k or a same-request label"
        later = (seq == b) & (req > r)
        moved_later |= not torch.equal(before[later], after[later])
    assert moved_later, "feedback of earlier requests must reach later predictions"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_retrieval_query_reads_only_events_before_its_target(backbone):
    model = make_unigrf(backbone)
    batch = make_batch([13, 1, 7, 20], seed=2)
    with torch.no_grad():
        before = model.retrieval_queries(batch)
    seq, _, pos = _event_rows(batch)
    for b, k in ((0, 6), (3, 11), (3, 0)):
        event = int(batch.offsets[b]) + k
        tail = torch.arange(event, int(batch.offsets[b + 1]))
        perturbed = _clone(batch)
        perturbed.items[tail] = perturbed.items[tail] % 40 + 1  # the target item and everything after it
        perturbed.labels[tail] = 1 - perturbed.labels[tail]
        with torch.no_grad():
            after = model.retrieval_queries(perturbed)
        fixed = (seq != b) | (pos <= k)
        assert torch.equal(before[fixed], after[fixed]), "a query read its own target or a later event"
        assert not torch.equal(before[~fixed], after[~fixed])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_candidate_scoring_matches_the_training_pass(backbone):
    """retrieve_and_rank (mining) and score (recommend) and rank_logits / retrieval_queries (training, evaluation)
    give the same numbers for a candidate shown as the next request, alone or with others."""
    model = make_unigrf(backbone)
    history = make_batch([9], seed=3)
    history.target_mask[:] = False
    candidates = torch.tensor([[5, 17, 33]])
    when = history.timestamps[-1:] + 600
    with torch.no_grad():
        query, together = model.retrieve_and_rank(history, candidates, when)
        assert torch.equal(model.score(history, candidates, when)[..., 0], together)
    for j, item in enumerate(candidates[0].tolist()):
        extended = JaggedBatch(
            offsets=torch.tensor([0, 10]), items=torch.cat([history.items, torch.tensor([item])]),
            actions=torch.cat([history.actions, torch.tensor([0])]),
            labels=torch.cat([history.labels, torch.tensor([1.0])]),
            timestamps=torch.cat([history.timestamps, when]),
            request_ids=torch.cat([history.request_ids, history.request_ids[-1:] + 1]),
            target_mask=torch.cat([history.target_mask, torch.tensor([True])]), users=history.users)
        with torch.no_grad():
            assert float(model.rank_logits(extended)[0]) == pytest.approx(float(together[0, j]), abs=1e-10)
            assert torch.allclose(model.retrieval_queries(extended)[0], query[0], atol=1e-10)


def test_relative_score_prefers_items_retrieval_likes_and_ranking_dislikes():
    s_ret = torch.tensor([0.9, 0.9, 0.2, 0.5])
    s_rank = torch.tensor([0.1, 0.8, 0.1, 0.5])
    score = relative_score(s_ret, s_rank)
    assert score[0] > score[1] and score[0] > score[2]  # high retrieval, low ranking wins
    assert float(score[3]) == pytest.approx(0.5 * math.log(2.0))


def test_adaptive_weights_follow_the_paper_formula():
    same = adaptive_weights(torch.tensor([2.0, 0.5]), torch.tensor([4.0, 1.0]), 0.1)
    assert torch.allclose(same, torch.ones(2))  # equal convergence rates: equal weights
    w = adaptive_weights(torch.tensor([3.0, 0.6]), torch.tensor([4.0, 0.6]), 0.5)  # r = (0.75, 1.0)
    expected = 2 * torch.softmax(torch.tensor([0.75, 1.0]) / 0.5, 0)
    assert torch.allclose(w, expected) and w[1] > w[0]  # the slower task gets the larger weight
    assert float(w.sum()) == pytest.approx(2.0)
    first = adaptive_weights(torch.tensor([3.0, 0.6]), torch.full((2,), float("nan")), 0.5)
    assert torch.equal(first, torch.ones(2))


def test_weighter_without_smoothing_uses_the_previous_step_and_is_checkpointed():
    weighter = AdaptiveWeighter(temperature=0.2, smoothing=0.0)
    assert torch.equal(weighter(torch.tensor([4.0, 1.0])), torch.ones(2))
    w = weighter(torch.tensor([2.0, 1.0]))
    assert torch.allclose(w, 2 * torch.softmax(torch.tensor([0.5, 1.0]) / 0.2, 0))
    assert torch.equal(weighter.state_dict()["smoothed"], torch.tensor([2.0, 1.0]))
    weighter.eval()
    weighter(torch.tensor([9.0, 9.0]))
    assert torch.equal(weighter.smoothed, torch.tensor([2.0, 1.0])), "evaluation must not move the weighter"


def test_mining_keeps_the_top_relative_scores_among_unseen_items():
    # the pool is the whole catalogue, so the expected choice does not depend on the random draw
    model = make_unigrf("llama", enhancer_pool=40, hard_negatives=5, favourite_threshold=0.0, max_favourites=3)
    batch = make_batch([6, 11, 3], seed=6)
    stats = model.before_epoch(1, [batch], torch.device("cpu"))
    assert stats == {"mined_users": 3.0, "favourites": 9.0}
    everything = torch.arange(1, 41).expand(3, 40)
    with torch.no_grad():
        query, rank = model.retrieve_and_rank(batch, everything)
    s_ret = torch.sigmoid((query[:, None] * model.item_emb(everything)).sum(-1))
    s_rank = torch.sigmoid(rank)
    for b in range(3):
        seen = set(batch.items[batch.offsets[b]: batch.offsets[b + 1]].tolist())
        unseen = torch.tensor([i for i in range(1, 41) if i not in seen])
        score = relative_score(s_ret[b, unseen - 1], s_rank[b, unseen - 1])
        expected = set(unseen[score.topk(5).indices].tolist())
        assert set(model.hard[batch.users[b]].tolist()) == expected
        liked = unseen[s_rank[b, unseen - 1].topk(3).indices]
        assert set(model.favourites[batch.users[b]].tolist()) == set(liked.tolist())


def test_favourites_need_a_ranking_probability_above_tau():
    model = make_unigrf("hstu", enhancer_pool=40, favourite_threshold=0.999)
    batch = make_batch([6, 11, 3], seed=6)
    assert model.before_epoch(1, [batch], torch.device("cpu"))["favourites"] == 0.0
    assert model.before_epoch(0, [batch], torch.device("cpu")) == {"mined_users": 0.0, "favourites": 0.0}


def test_retrieval_loss_masks_the_positive_and_favourites_among_negatives():
    model = make_unigrf("llama", dtype=torch.float32, num_negatives=12, hard_negatives=3)
    queries = torch.randn(4, 16)
    positives = torch.tensor([3, 8, 8, 20])
    users = torch.tensor([0, 1, 2, 3])
    model.hard[users] = positives[:, None].expand(4, 3)  # every hard negative is the row's own positive
    model.favourites[1, :2] = torch.tensor([30, 31])
    torch.manual_seed(7)
    got = model.retrieval_loss(queries, positives, users)
    torch.manual_seed(7)
    uniform = torch.randint(1, 41, (9,))
    table = model.item_emb.weight
    neg = (queries @ table[uniform].T).masked_fill(uniform[None] == positives[:, None], float("-inf"))
    neg[users == 1] = neg[users == 1].masked_fill(torch.isin(uniform, torch.tensor([30, 31]))[None], float("-inf"))
    logits = torch.cat([(queries * table[positives]).sum(-1, keepdim=True), neg], 1)
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(got, expected, atol=1e-6)


def test_logq_correction_cancels_for_uniform_negatives_and_counts_in_batch_ones():
    plain = make_unigrf("llama", dtype=torch.float32, hard_negatives=0)
    corrected = make_unigrf("llama", dtype=torch.float32, hard_negatives=0, logq_correction=True)
    queries, positives, users = torch.randn(6, 16), torch.tensor([1, 2, 2, 2, 5, 9]), torch.zeros(6, dtype=torch.long)
    torch.manual_seed(1)
    a = plain.retrieval_loss(queries, positives, users)
    torch.manual_seed(1)
    b = corrected.retrieval_loss(queries, positives, users)
    assert torch.allclose(a, b, atol=1e-6)  # a constant shift of every logit changes nothing
    in_batch = make_unigrf("llama", dtype=torch.float32, hard_negatives=0, in_batch_negatives=True,
                           logq_correction=True)
    in_batch.item_counts[2] = 1000.0  # a popular item is a frequent in-batch negative: its logit is lowered
    log_count = in_batch._log_expected_count(6, 16)
    assert log_count[2] > log_count[1]
    assert torch.isfinite(in_batch.retrieval_loss(queries, positives, users))


@pytest.mark.parametrize("args", [
    {"objective": "ranking"}, {"objective": "both"}, {"backbone": "gpt"}, {"hard_negatives": 16},
    {"enhancer_pool": 2}])
def test_bad_configs_are_refused_with_the_field_named(args):
    with pytest.raises(ValueError, match="objective|backbone|hard_negatives|enhancer_pool"):
        make_unigrf(**({"backbone": "hstu"} | args))


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("objective", ["unified", "retrieval", "ranking"])
def test_each_objective_learns_a_batch(backbone, objective):
    single = {} if objective == "unified" else {"hard_negatives": 0, "favourite_threshold": 1.0, "weighter": False}
    model = make_unigrf(backbone, dtype=torch.float32, objective=objective, **single).train()
    assert model.tasks == {"unified": ("ranking", "retrieval"), "retrieval": ("retrieval",),
                           "ranking": ("ranking",)}[objective]
    batch = make_batch([13, 1, 7, 20], seed=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss() -> dict:
        torch.manual_seed(0)
        return model(batch)

    first = loss()
    for _ in range(40):
        opt.zero_grad()
        loss()["loss"].backward()
        opt.step()
    last = loss()
    for key in ("retrieval_loss", "ranking_loss"):
        if key in first:
            assert float(last[key]) < 0.8 * float(first[key]), key
    if objective == "unified":
        assert {"w_retrieval", "w_ranking"} <= set(last)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("favourites", [False, True])
def test_the_last_block_skips_the_tokens_no_loss_reads_and_changes_no_loss_or_gradient(backbone, favourites,
                                                                                     monkeypatch):
    """Training's last block computes the tokens from the first target's retrieval query on (the
    feedback token before it) and nothing before: the loss and every gradient are those of the blocks
    run over every token (fp64, both tasks, the same negatives). With favourites the query after each
    row's last event counts too: a short row without targets pulls the offset back to its last
    feedback token."""
    from genrec.models import unigrf
    from genrec.nn.hstu import HSTUBlock
    from genrec.nn.llama import LlamaBlock
    from tests.helpers import loss_and_grads, record_outputs_from, with_last_targets

    model = make_unigrf(backbone, weighter=False).train()
    batch = with_last_targets(make_batch([13, 30, 7, 3], seed=4), 0.25)  # first target: event 5 of 7
    batch.target_mask[batch.sequence_index() == 3] = False  # 3 events, none a target
    if favourites:
        model.favourites[batch.users[3], 0] = 17  # the short row's end query: its last feedback token
    block = HSTUBlock if backbone == "hstu" else LlamaBlock
    full_forward = block.forward
    asked = record_outputs_from(monkeypatch, block)
    loss, grads = loss_and_grads(model, batch, seed=1)  # the same sampled negatives in both passes
    assert asked == [0, 2 * 3 - 1 if favourites else 2 * 5 - 1]
    assert unigrf.last_outputs_from(batch, end_queries=favourites) == asked[1]
    for read in (model.rank_logits, model.retrieval_queries):  # evaluation reads from the first target's query on
        asked.clear()
        read(batch)
        assert asked == [0, 2 * 5 - 1]
    monkeypatch.setattr(block, "forward", full_forward)
    monkeypatch.setattr(unigrf, "last_outputs_from", lambda *args, **kwargs: 0)  # every block over every token
    want_loss, want_grads = loss_and_grads(model, batch, seed=1)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == want_grads.keys()
    for key, grad in want_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-10, atol=1e-12, msg=key)


def test_a_llama_block_asked_for_its_last_tokens_gives_the_full_blocks_outputs_and_gradients():
    """The Llama block's ``outputs_from`` against the block run over every token (fp64): the same
    outputs there, the same gradients of the input and every weight; earlier tokens still give keys
    and values (their input gradient is not zero)."""
    from genrec.nn.events import Events
    from genrec.nn.llama import LlamaBlock
    from genrec.ops.dispatch import REFERENCE
    from tests.nn.test_hstu_block import outputs_and_grads

    torch.manual_seed(0)
    block = LlamaBlock(16, 2, 0.0, REFERENCE).double()
    layout = item_action_layout(Events.from_batch(make_batch([11, 3, 17], seed=0)))
    x = torch.randn(*layout.shape, 16, dtype=torch.float64, requires_grad=True)
    n = layout.shape[1]
    for start in (1, n // 2, n - 1):
        upstream = torch.randn(x.shape[0], n - start, 16, dtype=torch.float64)
        want, want_dx, want_dw = outputs_and_grads(block, block(x, layout)[:, start:], x, upstream)
        got, dx, dw = outputs_and_grads(block, block(x, layout, outputs_from=start), x, upstream)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12)
        assert dx[:, :start].abs().sum() > 0
        for name, grad in want_dw.items():
            torch.testing.assert_close(dw[name], grad, rtol=1e-12, atol=1e-12, msg=name)
