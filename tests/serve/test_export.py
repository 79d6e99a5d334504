"""``genrec export``: the AOTInductor package, loaded back in a fresh process, gives the eager model's
and the service's scores for shapes other than the traced example (dynamic batch, history and
candidate counts); a package that does not load is a clear error; its Triton config names the
torch_aoti platform and every input."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch

from genrec.serve.export import (
    INPUTS,
    CandidateScoring,
    ExportShapes,
    PackageError,
    example_inputs,
    exit_reason,
    export,
    package_scores,
    triton_config,
)
from genrec.serve.scoring import Scorer
from genrec.serve.store import History
from tests.models.test_generative import INFO, make_model


def test_exported_package_scores_equal_eager_scores(tmp_path):
    model = make_model("dfgr", torch.float32, num_layers=1, d_model=8, num_heads=1)  # smallest: compile time
    start = time.perf_counter()
    package = export(model, str(tmp_path / "dfgr" / "1" / "model.pt2"), INFO.num_items,  # a str path too
                     ExportShapes(max_batch=4, max_history=32, max_candidates=8))
    print(f"export (with its own fresh-process check) took {time.perf_counter() - start:.1f} s")
    scorer = Scorer(model, torch.device("cpu"), 3.0)
    shapes = (ExportShapes(batch=3, history=20, candidates=7), ExportShapes(batch=1, history=3, candidates=1))
    cases = [example_inputs(s, INFO.num_items, torch.device("cpu")) for s in shapes]
    for inputs, got in zip(cases, package_scores(package, cases, torch.device("cpu")), strict=True):  # [B, M]
        assert got.shape == inputs[5].shape
        with torch.no_grad():
            assert torch.allclose(got, CandidateScoring(model)(*inputs), atol=1e-6)
        items, actions, times, requests, lengths, candidates, when = (t.numpy() for t in inputs)
        histories = [History(items[b, :n], actions[b, :n], np.zeros(n, np.float32), times[b, :n], requests[b, :n])
                     for b, n in enumerate(lengths)]
        served = scorer.score(histories, list(candidates), list(when))  # the service's eager path
        np.testing.assert_allclose(got.numpy(), np.stack([s[:, 0] for s in served]), rtol=0, atol=1e-5)


def test_a_package_that_does_not_load_is_an_error_naming_the_cause(tmp_path):
    broken = tmp_path / "model.pt2"
    broken.write_bytes(b"not a zip archive")
    inputs = example_inputs(ExportShapes(), INFO.num_items, torch.device("cpu"))
    expected = (r"model\.pt2: loading and scoring it in a fresh process failed: exit code 1, "
                rf"torch {re.escape(torch.__version__)}: .*")
    with pytest.raises(PackageError, match=expected):
        package_scores(broken, [inputs], torch.device("cpu"))


def test_a_crashed_check_process_names_its_signal():
    assert exit_reason(-11) == "killed by SIGSEGV" and exit_reason(-9) == "killed by SIGKILL"
    assert exit_reason(1) == "exit code 1" and exit_reason(-200) == "killed by signal 200"


def test_triton_config_names_the_platform_and_every_input():
    config = triton_config("dfgr", torch.device("cpu"))
    assert 'platform: "torch_aoti"' in config and 'name: "dfgr"' in config and "KIND_CPU" in config
    assert all(f'name: "{name}"' in config for name in INPUTS) and 'name: "probabilities"' in config


def test_export_refuses_models_without_a_kv_cache():
    with pytest.raises(ValueError, match="KV-cache rankers"):
        CandidateScoring(make_model("genrank", torch.float32))
