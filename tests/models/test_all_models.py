"""Every registered model trains a step under bf16 autocast (the GPU training path), checked on CPU."""

from __future__ import annotations

import pytest
import torch

from genrec.models import MODELS, build_model
from tests.helpers import make_batch
from tests.models.test_generative import INFO


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_step_under_bf16_autocast(name):
    torch.manual_seed(0)
    model = build_model(name, {"d_model": 16}, INFO, 32)
    batch = make_batch([6, 1, 11], seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
