"""``genrec export``: the AOTInductor package, loaded back, gives the eager model's scores for shapes
other than the traced example (dynamic batch, history and candidate counts), and its Triton config
names the torch_aoti platform and every input."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from genrec.serve.export import INPUTS, CandidateScoring, ExportShapes, example_inputs, export, triton_config
from genrec.serve.scoring import Scorer
from genrec.serve.store import History
from tests.models.test_generative import INFO, make_model


def test_exported_package_scores_equal_eager_scores(tmp_path):
    model = make_model("dfgr", torch.float32, num_layers=1, d_model=8, num_heads=1)  # smallest: compile time
    start = time.perf_counter()
    package = export(model, tmp_path / "dfgr" / "1" / "model.pt2", INFO.num_items,
                     ExportShapes(max_batch=4, max_history=32, max_candidates=8))
    print(f"export took {time.perf_counter() - start:.1f} s")
    loaded = torch._inductor.aoti_load_package(str(package))
    scorer = Scorer(model, torch.device("cpu"), 3.0)
    for shapes in (ExportShapes(batch=3, history=20, candidates=7), ExportShapes(batch=1, history=3, candidates=1)):
        inputs = example_inputs(shapes, INFO.num_items, torch.device("cpu"))
        got = loaded(*inputs)  # [B, M]
        with torch.no_grad():
            assert torch.allclose(got, CandidateScoring(model)(*inputs), atol=1e-6)
        items, actions, times, requests, lengths, candidates, when = (t.numpy() for t in inputs)
        histories = [History(items[b, :n], actions[b, :n], np.zeros(n, np.float32), times[b, :n], requests[b, :n])
                     for b, n in enumerate(lengths)]
        served = scorer.score(histories, list(candidates), list(when))  # the service's eager path
        np.testing.assert_allclose(got.numpy(), np.stack([s[:, 0] for s in served]), rtol=0, atol=1e-5)


def test_triton_config_names_the_platform_and_every_input():
    config = triton_config("dfgr", torch.device("cpu"))
    assert 'platform: "torch_aoti"' in config and 'name: "dfgr"' in config and "KIND_CPU" in config
    assert all(f'name: "{name}"' in config for name in INPUTS) and 'name: "probabilities"' in config


def test_export_refuses_models_without_a_kv_cache():
    with pytest.raises(ValueError, match="KV-cache rankers"):
        CandidateScoring(make_model("genrank", torch.float32))
