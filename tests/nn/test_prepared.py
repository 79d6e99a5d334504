"""LayoutPlan without the fused backend: which models have one, and where it refuses to run.
(Its schedules and the steps that read them: tests/ops/triton/test_prepared.py.)"""

from __future__ import annotations

import pytest
import torch

from genrec.models import MODELS
from genrec.nn.prepared import AttentionSpec, LayoutPlan
from genrec.ops.dispatch import REFERENCE
from tests.helpers import make_batch
from tests.models.test_generative import INFO


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_model_on_the_reference_backend_asks_the_loader_to_prepare_anything(name):
    """The reference backend's cache is dense [B, L, L] tensors, not worth shipping from a worker:
    the trainer's loader then collates as before."""
    from genrec.models import build_model

    model = build_model(name, {"d_model": 16, "num_heads": 2} if "num_heads" in _fields(name) else {}, INFO, 32)
    assert model.layout_plan(torch.float32) is None


def _fields(name: str) -> set[str]:
    from dataclasses import fields

    return {f.name for f in fields(MODELS[name][1])}


def test_a_plan_builds_on_the_host_only():
    spec = AttentionSpec(REFERENCE, 16, 21, 32)
    plan = LayoutPlan(lambda batch: None, (spec,), torch.float32)
    with pytest.raises(ValueError, match="on the host.*meta"):
        plan(make_batch([3, 2], seed=0).to("meta"))
    assert LayoutPlan.of(lambda batch: None, [None, None], torch.float32) is None
