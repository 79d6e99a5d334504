"""Layouts prepared ahead of the step (genrec.nn.prepared): the fused attention and the models'
training steps on a batch whose layout the loader built on the host read exactly what they would
have built, build nothing themselves, and give the same outputs bit for bit and the same gradients
(up to the order of the bias gradients' float atomic adds on a GPU, which differs between any two
runs). On the CPU through Triton's interpreter (small shapes), on a GPU with the host-built
schedules moved."""

from __future__ import annotations

import pickle

import pytest
import torch

from genrec.data.batching import JaggedBatch, collate, map_tensors, to_device
from genrec.ops.layout import TokenLayout
from tests.models.test_generative import make_model
from tests.ops.triton.test_hstu import CUDA, DEVICE, INTERPRET, LAYOUTS, _inputs, _layout

pytestmark = pytest.mark.skipif(not CUDA and not INTERPRET,
                                reason="needs a CUDA device, or Triton (the dev extra) for its CPU interpreter")
# float32 sums in another order: the bias gradients' atomic adds on a GPU (~1e-7 relative seen on an
# H100 between two runs of the same schedules); the interpreter adds in one order
ATOMIC_ORDER = {"rtol": 1e-5, "atol": 1e-6} if CUDA else {"rtol": 0, "atol": 0}
if CUDA or INTERPRET:
    from genrec.ops.triton import hstu
    from genrec.ops.triton.backend import TRITON


def _fresh(layout: TokenLayout, device) -> TokenLayout:
    """The same tokens on ``device`` with an empty cache (as a step builds its layout anew)."""
    fields = (layout.valid, layout.request, layout.event, layout.fake, layout.position, layout.timestamp)
    return TokenLayout(*(t.to(device) for t in fields), layout.rule)


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """Every schedule or metadata build the fused attention starts, by name (the builders, which only
    a cache miss calls)."""
    calls: list[str] = []
    for name in ("_bias_flags", "tile_lists"):
        real = getattr(hstu, name)
        monkeypatch.setattr(hstu, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    real_meta = hstu.KernelMeta.from_layout.__func__
    monkeypatch.setattr(hstu.KernelMeta, "from_layout",
                        classmethod(lambda cls, layout: calls.append("meta") or real_meta(cls, layout)))
    return calls


@pytest.mark.parametrize("kind", list(LAYOUTS))
@pytest.mark.parametrize("bias", [True, False])
def test_a_layout_seeded_with_host_built_schedules_builds_nothing_and_gives_the_same_attention(kind, bias, builds):
    layout = _layout(kind, [40, 9, 25], seed=5)
    q, k, v, tables, _ = _inputs(layout, torch.float32, bias)
    sizes = (tables[0].shape[-1], tables[1].shape[-1]) if bias else (None, None)
    host = _fresh(layout, "cpu")
    keys = hstu.prepare_attention(host, q.shape[-1], q.dtype, *sizes, grads=True)
    prepared = to_device(host.prepared(keys), DEVICE)

    def run(seeded: bool):
        target = _fresh(layout, DEVICE)
        target.seed(prepared if seeded else None)
        builds.clear()
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, *tables)]
        out = hstu.hstu_attention(*leaves[:3], target, *(leaves[3:] or [None, None]), 0.05)
        out.sum().backward()
        return out.detach(), [t.grad for t in leaves], list(builds), set(target._cache)

    out, grads, built, cache = run(seeded=True)
    assert built == [], f"the seeded layout still built {built}"
    assert cache == set(keys)  # nothing was added beside what the host built
    want, want_grads, built_fresh, _ = run(seeded=False)
    assert built_fresh, "the unseeded layout built nothing: the check above cannot fail"
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, **ATOMIC_ORDER)


@pytest.mark.parametrize("kind", list(LAYOUTS))
@pytest.mark.parametrize("head_dim", [16, 128])  # at 128 no band kernel: its schedule is the forward's
@pytest.mark.parametrize("bias", [True, False])
def test_a_prepared_layout_moves_each_tensor_once_and_not_the_unpadded_fields(kind, head_dim, bias):
    """The loader pins and copies a prepared layout every step. Its entries share tensors (the forward
    and dQ lists where their tiles are equal, the extremes where the dK/dV tile is square, placeholder
    schedules), which the copy moves once and keeps shared; and the unpadded per-token fields the
    schedules are built from are not carried: the kernels read their padded rows (with an aligned
    length, the same tensors)."""
    host = _fresh(_layout(kind, [40, 9, 25], seed=5), "cpu")
    keys = hstu.prepare_attention(host, head_dim, torch.float32, *((41, 32) if bias else (None, None)), grads=True)
    assert ("triton_meta",) in host._cache and ("triton_meta",) not in keys  # built on the way, left behind
    prepared = host.prepared(keys)
    moved = []
    copy = map_tensors(prepared, lambda t: moved.append(t) or t.clone())

    def places(p) -> list[int]:  # each place a tensor appears in the entries, as the index of its tensor
        def flat(v) -> list:
            return [v] if isinstance(v, torch.Tensor) else [t for x in v for t in flat(x)]
        first: dict[int, int] = {}
        return [first.setdefault(id(t), len(first)) for t in flat(list(p.entries.values()))]
    assert len(moved) == len(set(places(prepared)))  # one copy per distinct tensor
    assert places(copy) == places(prepared)  # what was shared is shared in the copy
    if bias:
        assert len(places(prepared)) > len(moved), "no tensor appears twice: the test checks no sharing"


def test_a_prepared_layout_of_another_batch_is_refused():
    host = _fresh(_layout("dual_flow", [20, 6], seed=1), "cpu")
    prepared = host.prepared(hstu.prepare_attention(host, 16, torch.float32, 21, 32, grads=True))
    other = _fresh(_layout("dual_flow", [21, 6], seed=1), "cpu")
    with pytest.raises(ValueError, match=r"shape \(2, 40\).*known_layout"):
        other.seed(prepared)
    rule = TokenLayout(host.valid, host.request, host.event, host.fake, host.position, host.timestamp, "causal")
    with pytest.raises(ValueError, match="rule 'dual_flow'.*rule 'causal'"):
        rule.seed(prepared)


def _samples(lengths: list[int], seed: int) -> list[tuple]:
    """Loader samples (:func:`genrec.data.batching.collate`'s input) of a random batch, half of each
    sequence targets."""
    from tests.helpers import make_batch

    batch = make_batch(lengths, seed, all_targets=False)
    out = []
    for i, (s, e) in enumerate(zip(batch.offsets[:-1].tolist(), batch.offsets[1:].tolist(), strict=True)):
        first = int(batch.target_mask[s:e].long().argmax())
        out.append((i, *(getattr(batch, f)[s:e].numpy() for f in ("items", "actions", "labels", "timestamps",
                                                                     "request_ids")), first))
    return out


@pytest.mark.parametrize("name", ["hstu", "dfgr", "dfgr_sparse", "sfgr"])
def test_a_training_step_on_a_loader_prepared_batch_builds_no_schedule_and_matches(name, builds):
    """The model's LayoutPlan, pickled as for a loader worker, run on the host batch; the moved batch's
    training loss and gradients equal those of the same batch without it, and its step builds no
    kernel metadata or schedule."""
    model = make_model(name, torch.float32, d_model=32).to(DEVICE).train()
    for block in model.blocks:
        block.backend = TRITON  # the registry resolves 'triton' only where CUDA is
        with torch.no_grad():
            block.rel_pos.normal_(0, 0.5)
            block.rel_time.normal_(0, 0.5)
    plan = pickle.loads(pickle.dumps(model.layout_plan(torch.float32)))
    host = collate(_samples([23, 5, 41], seed=2))
    host.known_layout = plan(host)
    batch = host.to(DEVICE)
    bare = JaggedBatch(**batch.tensors(), known_max_len=host.max_len, known_max_targets=host.max_targets,
                       known_num_targets=host.num_targets)
    assert bare.known_layout is None

    def step(b: JaggedBatch):
        model.zero_grad()
        builds.clear()
        loss = model(b)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], list(builds)

    loss, grads, built = step(batch)
    assert built == [], f"the step on the prepared batch built {built}"
    want, want_grads, built_bare = step(bare)
    assert built_bare
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    assert len(grads) == len(want_grads)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, **ATOMIC_ORDER)


def _pinned(value) -> set[bool]:
    """Whether the tensors in ``value`` are page-locked: {True}, {False} or both."""
    flags = []
    map_tensors(value, lambda t: flags.append(t.is_pinned()) or t)
    return set(flags)


def test_the_trainer_with_a_loader_worker_hands_each_step_a_layout_the_step_does_not_build(
        tmp_path, shared_data, monkeypatch, builds):
    """End to end: ``genrec train`` on the triton backend with ``data.num_workers=1`` (on the CPU the
    interpreter stands in for the GPU): the worker builds each batch's layout, the step builds none,
    and the losses are those of the same steps with the layout built in the step (no workers); on a
    GPU the batches come pinned."""
    import math

    from genrec.config import load
    from genrec.ops import dispatch
    from genrec.train.trainer import Trainer

    monkeypatch.setattr(dispatch, "triton_available", lambda: None)
    losses = {}
    for workers in (1, 0):
        trainer = Trainer(load(None, [
            f"data.data_dir={shared_data}", "data.max_len=12", "data.batch_size=4", f"data.num_workers={workers}",
            "model=hstu", "model_args.d_model=32", "model_args.num_heads=2", "model_args.dropout=0",
            "model_args.attention_backend=triton", f"train.device={DEVICE}", "train.bf16=false",
            "train.progress=false", "train.tensorboard=false", f"train.out_dir={tmp_path / str(workers)}"]))
        state = trainer.start("overwrite")
        batches = iter(trainer.train_loader)
        losses[workers] = []
        for _ in range(2):
            batch = next(batches)
            assert (batch.known_layout is not None) == (workers > 0)
            # on a GPU the loader pins the batch and its layout (so their copies do not wait for the GPU)
            assert _pinned((batch.tensors(), batch.known_layout)) == {DEVICE == "cuda"}
            builds.clear()
            losses[workers].append(trainer.train_step(batch, state)["loss"])
            assert (builds == []) == (workers > 0), builds
            assert math.isfinite(losses[workers][-1])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
