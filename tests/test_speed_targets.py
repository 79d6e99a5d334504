"""benchmarks/speed.py on CPU: its DFGR/HSTU ratio rows and issue 14's targets computed from train
and layout rows (the GPU part itself needs a CUDA device), ``--tables`` rewriting a committed result
file without changing a measured number, the host batches of the train part, and
:func:`layouts_reused` on a small CPU model."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from genrec.models import build_model
from genrec.ops.reference import attention as reference_attention

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
speed = pytest.importorskip("speed")


def _train(model: str, n: int, share: float, events_per_s: float, gflop: float) -> dict:
    return {"bench": "train", "model": model, "n": n, "target_share": share, "batch": 32_768 // n,
            "train_events_per_s": events_per_s, "gflop_per_event": gflop}


def _goal(rows: list[dict], name: str) -> dict:
    return next(t for t in speed.targets(rows + speed.ratios(rows)) if t["name"] == name)


def test_the_sparse_target_is_the_worst_sparse_dfgr_over_hstu_at_a_tenth_of_targets_from_n_1024():
    rows = []
    for n, sparse_speed in ((512, 1.0), (1024, 250.0), (2048, 300.0)):
        for share in (1.0, 0.1):
            rows += [_train("hstu", n, share, 100.0, 2.0), _train("dfgr", n, share, 120.0, 1.5),
                     _train("dfgr_sparse", n, share, sparse_speed if share < 1 else 110.0, 1.0)]
    sparse = [r for r in speed.ratios(rows) if r["model"] == "dfgr_sparse" and r["target_share"] == 0.1]
    assert {r["n"]: r["dfgr_over_hstu"] for r in sparse} == {512: 0.01, 1024: 2.5, 2048: 3.0}
    goal = _goal(rows, "dfgr_over_hstu_train_sparse_min")
    assert goal["value"] == 2.5 and goal["met"] is True  # N = 512 and every-target rows left out
    rows[-1]["train_events_per_s"] = 150.0  # dfgr_sparse, N = 2048, share 0.1 -> 1.5x HSTU
    assert _goal(rows, "dfgr_over_hstu_train_sparse_min") | {"rows": ""} == {
        "name": "dfgr_over_hstu_train_sparse_min", "value": 1.5, "op": ">=", "target": 2.0, "met": False, "rows": ""}


def test_the_training_targets_read_the_compiled_rows_where_the_file_has_them_for_every_eager_shape():
    """``--train-compile`` rows (genrec train's train.compile) pair with each other, never with eager
    ones; the targets read them when they cover every eager shape, the eager values stay beside them."""
    eager = [_train("hstu", 1024, 0.1, 100.0, 2.0), _train("dfgr_sparse", 1024, 0.1, 180.0, 0.9),
             _train("hstu", 2048, 0.1, 80.0, 2.0), _train("dfgr_sparse", 2048, 0.1, 168.0, 0.9)]
    compiled = [r | {"mode": "compiled", "train_events_per_s": r["train_events_per_s"] * f}
                for r, f in zip(eager, (1.2, 1.4, 1.2, 1.3), strict=True)]
    ratios = speed.ratios(eager + compiled)
    assert sorted((r["mode"], r["n"], round(r["dfgr_over_hstu"], 4)) for r in ratios) == [
        ("train", 1024, 1.8), ("train", 2048, 2.1), ("train, compiled", 1024, 2.1), ("train, compiled", 2048, 2.275)]
    goal = _goal(eager + compiled, "dfgr_over_hstu_train_sparse_min")
    assert goal["value"] == pytest.approx(2.1) and goal["met"] is True and "compiled steps" in goal["rows"]
    assert _goal(eager + compiled, "dfgr_over_hstu_train_sparse_min_eager")["value"] == pytest.approx(1.8)
    flop = _goal(eager + compiled, "dfgr_train_ratio_over_flop_ratio_min")
    assert flop["value"] == pytest.approx(2.1 / (2.0 / 0.9))
    partial = _goal(eager + compiled[:2], "dfgr_over_hstu_train_sparse_min")  # N = 2048 compiled missing
    assert partial["value"] is None and partial["met"] is False and "1 of the eager ones" in partial["reason"]
    only_eager = _goal(eager, "dfgr_over_hstu_train_sparse_min")
    assert only_eager["value"] == pytest.approx(1.8) and "eager steps" in only_eager["rows"]
    assert not any(t["name"].endswith("_eager") for t in speed.targets(eager + speed.ratios(eager)))


def test_rows_without_the_relative_bias_pair_with_each_other_and_count_in_the_training_targets():
    """``--train-no-bias`` rows (mode 'no bias', with ``--train-compile`` 'compiled, no bias') are
    DFGR over HSTU without the bias, never against a biased row, and the training targets take the
    worst over both; compiled rows must cover the eager shapes of both."""
    import argparse

    assert [speed.train_mode(argparse.Namespace(train_compile=c, train_no_bias=b, train_cuda_graphs=g)) for c, b, g in
            ((False, False, False), (True, False, False), (False, True, False), (True, True, False),
             (True, False, True), (True, True, True))] == [
        None, "compiled", "no bias", "compiled, no bias", "compiled, CUDA graphs", "compiled, CUDA graphs, no bias"]
    biased = [_train("hstu", 1024, 1.0, 100.0, 2.0), _train("dfgr", 1024, 1.0, 140.0, 1.5)]
    plain = [r | {"mode": "no bias", "train_events_per_s": s}
             for r, s in zip(biased, (200.0, 220.0), strict=True)]
    ratios = speed.ratios(biased + plain)
    assert sorted((r["mode"], round(r["dfgr_over_hstu"], 4)) for r in ratios) == [
        ("train", 1.4), ("train, no bias", 1.1)]
    flop = _goal(biased + plain, "dfgr_train_ratio_over_flop_ratio_min")
    assert flop["value"] == pytest.approx(1.1 / (2.0 / 1.5)) and "off (mode 'no bias')" in flop["rows"]
    compiled = [r | {"mode": "compiled"} for r in biased]  # the biased shape only: not every eager one
    partial = _goal(biased + plain + compiled, "dfgr_train_ratio_over_flop_ratio_min")
    assert partial["value"] is None and "1 of the eager ones" in partial["reason"]
    both = compiled + [r | {"mode": "compiled, no bias"} for r in plain]
    assert _goal(biased + plain + both, "dfgr_train_ratio_over_flop_ratio_min")["value"] == pytest.approx(0.825)


def test_a_profiled_steps_kernels_are_grouped_by_the_fused_attentions_kernel_names():
    """``--train-profile``: per-step times from the profiler's device times over 3 steps, the four
    attention kernels by their Triton names (a model without the bias has no bias-gradient kernel),
    cuBLAS's matrix products, the costliest kernels,
    and the informational bias-gradient share over the profiled train rows only."""
    device_ms = {"_hstu_fwd": 3.0, "_hstu_bwd": 6.0, "_hstu_bwd_rab": 12.0, "_hstu_bwd_dq": 4.5,
                 "nvjet_sm90_tst_256x128": 3.0,
                 "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::": 1.5}
    fields = speed.kernel_fields(device_ms, steps=3, top=2)
    assert fields == {"kernels_ms": 10.0, "attention_ms": 8.5, "attention_fwd_ms": 1.0, "attention_dkdv_ms": 2.0,
                      "bias_grad_ms": 4.0, "attention_dq_ms": 1.5, "matmul_ms": 1.0, "optimizer_ms": 0.5,
                      "kernels_top_ms": {"_hstu_bwd_rab": 4.0, "_hstu_bwd": 2.0}}
    assert speed.kernel_fields({"_hstu_fwd": 3.0, "other": 3.0}, steps=3)["bias_grad_ms"] == 0.0
    banded = speed.kernel_fields(device_ms | {"_hstu_bwd_rab_bands": 6.0}, steps=3)  # head dim <= 64: two kernels
    assert banded["bias_grad_ms"] == 6.0 and banded["attention_ms"] == 10.5 and banded["kernels_ms"] == 12.0
    rows = [_train("hstu", 1024, 1.0, 100.0, 2.0) | fields, _train("dfgr", 1024, 1.0, 150.0, 1.5)]
    share = _goal(rows, "bias_grad_share_of_train_kernels_max")
    assert share["value"] == pytest.approx(0.4) and share["met"] is None
    assert _goal(rows[1:], "bias_grad_share_of_train_kernels_max")["value"] is None


def test_the_host_bound_share_is_the_largest_host_time_over_kernel_time_of_the_profiled_rows():
    """``host_over_kernels`` (the host's time to issue a step over its CUDA kernels' time): quoted as
    the worst, largest, profiled row's, no target; rows of earlier runs without ``host_ms`` leave it
    null."""
    rows = [_train("hstu", 1024, 0.1, 100.0, 2.0) | {"kernels_ms": 15.6, "bias_grad_ms": 0.0, "host_ms": 9.0,
                                                      "host_over_kernels": 9 / 15.6},
            _train("dfgr_sparse", 1024, 0.1, 150.0, 1.0) | {"kernels_ms": 8.7, "bias_grad_ms": 0.0, "host_ms": 13.0,
                                                             "host_over_kernels": 13 / 8.7},
            _train("dfgr", 1024, 1.0, 150.0, 1.5) | {"kernels_ms": 15.0, "bias_grad_ms": 0.0}]
    goal = _goal(rows, "train_host_over_kernels_max")
    assert goal["value"] == pytest.approx(13 / 8.7) and goal["met"] is None and goal["op"] is None
    assert _goal(rows[2:], "train_host_over_kernels_max")["value"] is None


def test_a_host_profile_sums_the_launch_calls_and_lists_the_costliest_events_per_step():
    """``--train-host-profile``: the CUDA runtime's and driver's launch calls (their Ex forms too)
    summed per step, their count per step, and the costliest events by their own host time."""
    cpu_ms = {"cuLaunchKernelEx": 6.0, "cudaLaunchKernel": 3.0, "Torch-Compiled Region: 0/0": 4.5,
              "genrec::hstu_attention_fwd": 1.5, "aten::copy_": 0.3}
    calls = {"cuLaunchKernelEx": 600, "cudaLaunchKernel": 300, "Torch-Compiled Region: 0/0": 3,
             "genrec::hstu_attention_fwd": 12, "aten::copy_": 60}
    fields = speed.host_fields(cpu_ms, calls, steps=3, top=2)
    assert fields == {"host_launch_ms": 3.0, "host_launches": 300.0,
                      "host_top_ms": {"cuLaunchKernelEx": 2.0, "Torch-Compiled Region: 0/0": 1.5}}


def test_every_model_the_train_part_can_run_has_a_flop_count_and_others_are_refused():
    """Every train row reports its MFU: each model of ``TRAIN_FLOPS`` has a positive FLOP count per
    event at both target shares, and a model without one is a usage error, not a row without MFU."""
    args = argparse.Namespace(d=64, layers=2)
    for name in speed.TRAIN_FLOPS:
        assert all(speed.train_gflop_per_event(name, 256, args, share) > 0 for share in (1.0, 0.1)), name
    with pytest.raises(SystemExit):
        speed.main(["--parts", "train", "--train-models", "hstu,sasrec"])


def test_a_target_without_rows_is_null_and_not_met():
    rows = [_train("hstu", 1024, 1.0, 100.0, 2.0), _train("dfgr", 1024, 1.0, 150.0, 1.5)]
    goal = _goal(rows, "dfgr_over_hstu_train_sparse_min")
    assert goal["value"] is None and goal["met"] is False and "target_share 0.1" in goal["reason"]


def test_rewriting_the_tables_of_a_committed_file_keeps_every_measured_number(tmp_path):
    committed = REPO / "benchmarks" / "results" / "speed_NVIDIA_H200.json"
    copy = tmp_path / committed.name
    shutil.copy(committed, copy)
    assert speed.main(["--tables", str(copy)]) == 0
    before, after = json.loads(committed.read_text()), json.loads(copy.read_text())
    assert after["meta"] == before["meta"]

    def measured(blob: dict) -> list[dict]:
        return sorted((r for r in blob["rows"] if r["bench"] != "ratio"), key=speed._shape_key)

    assert measured(after) == measured(before)

    def ratios(blob: dict) -> dict:
        return {(r["part"], r["mode"], r["n"], r["m"]): r["dfgr_over_hstu"] for r in blob["rows"]
                if r["bench"] == "ratio"}

    assert ratios(after) == ratios(before)
    # the committed targets block is what this speed.py computes from the committed rows
    assert after["targets"] == before["targets"]

def test_merging_new_train_rows_replaces_the_every_target_rows_and_keeps_the_rest():
    """The next GPU run's train part merged into the committed file: its HSTU and DFGR rows at
    target share 1 replace the earlier (share-less) ones of the same N; kernel rows stay, each
    naming its run."""
    earlier = json.loads((REPO / "benchmarks" / "results" / "speed_NVIDIA_H200.json").read_text())
    new = [{**_train(m, n, share, 1.0, 1.0), "run": 0} for n in (1024, 8192) for share in (1.0, 0.1)
           for m in ("hstu", "dfgr", "dfgr_sparse")]
    meta = {"runs": [{"command": "now"}]}
    rows = speed.merge(new, meta, earlier)
    old_train = [r for r in earlier["rows"] if r["bench"] == "train"]
    kept_train = [r for r in rows if r["bench"] == "train" and r["run"] != 0]
    assert sorted((r["model"], r["n"]) for r in kept_train) == sorted(
        (r["model"], r["n"]) for r in old_train if r["n"] not in (1024, 8192))
    kernels = [r for r in earlier["rows"] if r["bench"] == "kernel"]
    assert [r for r in rows if r["bench"] == "kernel"] == [{**r, "run": 1 + r["run"]} for r in kernels]
    assert all(meta["runs"][r["run"]] for r in rows) and meta["runs"][0] == {"command": "now"}


def _kernel(name: str, n: int, fwd_bwd_ms: float) -> dict:
    return {"bench": "kernel", "kernel": name, "n": n, "fwd_ms": fwd_bwd_ms / 3, "fwd_bwd_ms": fwd_bwd_ms, "run": 0}


def test_the_bias_target_reads_each_kernel_with_the_bias_over_the_same_kernel_without_it():
    """The causal rows over the causal kernel, the dual-flow row over the dual-flow kernel (half the
    pairs at one N: over the causal kernel it would look cheap)."""
    rows = [_kernel("hstu_causal", 1024, 2.0), _kernel("hstu_causal_rab", 1024, 5.0),
            _kernel("hstu_causal_rab256", 1024, 4.0), _kernel("dual_flow", 1024, 1.0)]
    assert _goal(rows, "bias_over_nobias_fwd_bwd_max")["value"] == 2.5
    assert _goal(rows + [_kernel("dual_flow_rab", 1024, 3.0)], "bias_over_nobias_fwd_bwd_max")["value"] == 3.0


def test_combining_a_cut_device_call_drops_the_kernel_rows_its_new_code_replaced(tmp_path):
    """``--rows A --merge B --merge-skip K``: A's rows, plus B's rows of other shapes except kernel
    rows named in K (timed with the kernel code A's run replaced); the targets come from the result,
    and kernel rows without an SDPA row at their N do not enter the SDPA target."""
    def blob(rows: list[dict], commits: list[str]) -> dict:
        runs = [{"command": f"run at {c}", "git_commit": c, "date": "d"} for c in commits]
        return {"meta": {"device": "Some GPU", "torch": "2.11", "date": "d", "git_commit": commits[0], "runs": runs,
                         "command": runs[0]["command"]}, "rows": rows}

    new = blob([{"bench": "matmul", "n": 8192, "tflops": 1.0, "run": 0}, _kernel("sdpa_cudnn_causal", 1024, 1.0),
                _kernel("hstu_causal", 1024, 2.0), _kernel("hstu_causal_rab", 1024, 5.0)], ["new"])
    old = blob([_kernel("hstu_causal", 2048, 4.0), _kernel("hstu_causal_rab", 2048, 40.0),
                _kernel("sdpa_flash_causal", 2048, 3.0), _kernel("hstu_causal", 4096, 8.0),
                {**_train("hstu", 1024, 1.0, 100.0, 2.0), "run": 0}], ["old"])
    (tmp_path / "new.json").write_text(json.dumps(new))
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert speed.main(["--rows", str(tmp_path / "new.json"), "--merge", str(tmp_path / "old.json"),
                       "--merge-skip", "hstu_causal,hstu_causal_rab", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "speed_Some_GPU.json").read_text())
    kernels = {(r["kernel"], r["n"]): out["meta"]["runs"][r["run"]]["git_commit"] for r in out["rows"]
               if r["bench"] == "kernel"}
    assert kernels == {("sdpa_cudnn_causal", 1024): "new", ("hstu_causal", 1024): "new",
                       ("hstu_causal_rab", 1024): "new", ("sdpa_flash_causal", 2048): "old"}
    assert [r["model"] for r in out["rows"] if r["bench"] == "train"] == ["hstu"]
    goals = {t["name"]: t for t in out["targets"]}
    assert goals["bias_over_nobias_fwd_bwd_max"]["value"] == 2.5  # 5 / 2 at N = 1024; the old 10x left out
    assert goals["nobias_over_fastest_sdpa_fwd_bwd_max"]["value"] == 2.0
    with pytest.raises(SystemExit, match="single-run"):
        speed.main(["--rows", str(tmp_path / "speed_Some_GPU.json"), "--merge", str(tmp_path / "old.json")])


def _layout(model: str, n: int, share: float, step_ms: float, reused_ms: float, layout_ms: float,
            prepared_ms: float | None = None, host_ms: float = 5.0) -> dict:
    """A layout row; ``prepared_ms`` (default: the reused step's) is the step on the loader-built layout."""
    prepared_ms = reused_ms if prepared_ms is None else prepared_ms
    return {"bench": "layout", "model": model, "n": n, "target_share": share, "step_ms": step_ms,
            "step_ms_layout_reused": reused_ms, "layout_in_step_ms": step_ms - reused_ms,
            "in_step_share": (step_ms - reused_ms) / step_ms, "step_ms_prepared": prepared_ms,
            "prepared_in_step_share": (prepared_ms - reused_ms) / prepared_ms, "prepare_host_ms": host_ms,
            "prepare_share_of_step": host_ms / prepared_ms, "layout_ms": layout_ms,
            "standalone_share_of_step": layout_ms / step_ms}


def test_the_layout_target_is_the_trainers_prepared_step_and_the_other_shares_are_informational():
    rows = [_layout("hstu", 1024, 1.0, 100.0, 90.0, 6.0, prepared_ms=92.0),
            _layout("dfgr", 1024, 1.0, 50.0, 48.5, 6.0, prepared_ms=50.0, host_ms=10.0)]
    goal = _goal(rows, "layout_share_of_step_max")
    assert goal["value"] == pytest.approx(0.03) and goal["met"] is True  # DFGR: 1.5 ms of 50
    built = _goal(rows, "layout_built_in_step_share_max")
    assert built["value"] == pytest.approx(0.1) and built["met"] is None  # HSTU building its own: 10 of 100
    assert _goal(rows, "layout_prepare_share_of_step_max")["value"] == pytest.approx(0.2)  # 10 ms of DFGR's 50
    standalone = _goal(rows, "layout_standalone_share_of_step_max")
    assert standalone["value"] == pytest.approx(0.12) and standalone["met"] is None and standalone["target"] is None
    rows[0]["prepared_in_step_share"] = 0.06
    assert _goal(rows, "layout_share_of_step_max")["met"] is False


def test_a_layout_row_of_an_earlier_run_leaves_the_layout_target_null_and_unmet():
    """A row timed before the loader-built layouts (the step building its own only) beside new ones:
    no worst case over the new rows alone, which would not cover its shape."""
    old = _layout("dfgr_sparse", 2048, 0.1, 50.0, 45.0, 7.0)
    for name in ("step_ms_prepared", "prepared_in_step_share", "prepare_host_ms", "prepare_share_of_step"):
        del old[name]
    rows = [_layout("hstu", 1024, 1.0, 100.0, 99.0, 6.0), old]
    goal = _goal(rows, "layout_share_of_step_max")
    assert goal["value"] is None and goal["met"] is False
    assert "1 of 2 layout rows" in goal["reason"] and "dfgr_sparse at share 0.1" in goal["reason"]
    assert _goal(rows, "layout_built_in_step_share_max")["value"] == pytest.approx(0.1)
    assert _goal(rows, "layout_standalone_share_of_step_max")["value"] == pytest.approx(0.14)


def test_train_batches_are_host_batches_whose_steps_skip_the_device_check():
    from genrec.ops.layout import times_within_limit

    data = speed.train_data(4, 8192, 1.0)  # the longest history of the committed runs
    assert len(data) == 3 and all(b.timestamps.device.type == "cpu" and times_within_limit(b.timestamps)
                                  for b in data)
    assert int(data[0].timestamps.min()) >= speed.FIRST_EVENT_S
    assert all(b.offsets.is_pinned() == torch.cuda.is_available() for b in data)  # as the trainer's loaders


def _cpu_model(name: str) -> torch.nn.Module:
    """A small model of the train part on the reference backend, whose attention caches its dense
    mask on the layout (:meth:`TokenLayout.cached`): a built mask is a built layout."""
    registry, preset = speed.VARIANTS.get(name, (name, {}))
    torch.manual_seed(0)
    return build_model(registry, {"d_model": 16, "num_heads": 2, "num_layers": 2, "dropout": 0.0, **preset},
                       speed.INFO, 16)


@pytest.fixture
def masks_built(monkeypatch) -> list[int]:
    """How many dense masks the reference attention has built."""
    built = []

    def counted(layout):
        built.append(1)
        return build_mask(layout)

    build_mask = reference_attention.build_mask
    monkeypatch.setattr(reference_attention, "build_mask", counted)
    return built


@pytest.mark.parametrize("name", sorted(speed.TRAIN_LAYOUTS))
def test_under_layouts_reused_a_second_forward_builds_no_layout(name, masks_built):
    model, batch = _cpu_model(name), speed.synthetic_batch(2, 16, 0, device="cpu", target_share=0.5)
    model(batch)
    assert len(masks_built) == 1  # once per forward, shared by both layers
    with speed.layouts_reused(model):
        model(batch)
        model(batch)
    assert len(masks_built) == 2  # the first forward under it built, the second reused
    model(batch)
    assert len(masks_built) == 3  # and after it each forward builds its own again


@pytest.mark.parametrize("name", sorted(speed.TRAIN_LAYOUTS))
def test_a_reused_layout_gives_the_same_loss(name):
    model, batch = _cpu_model(name), speed.synthetic_batch(2, 16, 0, device="cpu", target_share=0.5)
    built = model(batch)["loss"]
    with speed.layouts_reused(model):
        model(batch)
        reused = model(batch)["loss"]
    torch.testing.assert_close(reused, built)


def test_layouts_reused_refuses_a_batch_of_another_shape():
    model = _cpu_model("hstu")
    with speed.layouts_reused(model):
        model(speed.synthetic_batch(2, 16, 0, device="cpu"))
        with pytest.raises(ValueError, match="steps on one batch"):
            model(speed.synthetic_batch(2, 8, 0, device="cpu"))


def test_a_tiles_file_sets_the_family_it_tuned():
    """``speed.py --tiles``: a file of the head-dim-64 sweep replaces the small tiles only, one of the
    head-dim-128 sweep (older files carry no ``head_dim``) the large ones; ``dq`` None turns the
    separate dQ kernel off. The committed sweep results read back as they were written."""
    pytest.importorskip("triton")  # the kernels' module imports Triton
    from genrec.ops.triton.hstu import DEFAULT_CONFIG

    small = speed.tiles_config({"fwd": [64, 32, 4, 3], "bwd": [64, 64, 4, 3], "dq": [64, 64, 4, 3], "head_dim": 64})
    assert (small.fwd, small.bwd, small.dq) == ((64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 3))
    assert small.tiles(128) == DEFAULT_CONFIG.tiles(128) and small.separates_dq(64) and small.separates_dq(128)
    large = speed.tiles_config({"fwd": [128, 64, 8, 3], "bwd": [128, 128, 8, 2], "dq": None})
    assert large.tiles(128)[:2] == ((128, 64, 8, 3), (128, 128, 8, 2)) and not large.separates_dq(128)
    assert large.separates_dq(64) == DEFAULT_CONFIG.separates_dq(64)
    assert large.tiles(64) == DEFAULT_CONFIG.tiles(64) and large.dq_large == DEFAULT_CONFIG.dq_large
    for prefix, family in (("hstu_tiles", 128), ("hstu_tiles_d64", 64)):
        tiles = json.loads((REPO / "benchmarks" / "results" / f"{prefix}_NVIDIA_H100_80GB_HBM3.json").read_text())
        config = speed.tiles_config(tiles)
        assert config.tiles(family)[0] == tuple(tiles["fwd"]) and config.tiles(family)[1] == tuple(tiles["bwd"])
