"""Per-epoch throughput: events/s, MFU from genrec.flops against a known peak, and peak memory."""

from __future__ import annotations

import pytest
import torch

from genrec.flops import flops
from genrec.models.hstu import HSTUConfig
from genrec.train import throughput
from genrec.train.strategy import Strategy
from tests.helpers import make_batch


def test_epoch_meter_counts_events_and_flops_against_the_peak(monkeypatch):
    monkeypatch.setattr(throughput, "peak_tflops", lambda device: 1e-6)  # 1 MFLOP/s, so MFU is visible
    meter = throughput.EpochMeter("hstu", HSTUConfig(d_model=8, num_layers=2), torch.device("cpu"))
    batches = [make_batch([5, 3], 0), make_batch([7], 1)]
    for b in batches:
        meter.add(b)
    row = meter.row(Strategy())
    seconds = 15 / row["train_events_per_s"]
    assert row["train_events_per_s_per_process"] == row["train_events_per_s"]
    expected = sum(flops("hstu", n, 8, 2)["total"] for n in (5, 3, 7)) / seconds / 1e6
    assert row["mfu"] == pytest.approx(expected, rel=1e-9)
    assert row["peak_mem_gb"] > 0


def test_mfu_is_left_out_where_no_peak_or_no_flop_model_is_known():
    assert throughput.peak_tflops(torch.device("cpu")) is None
    cpu = throughput.EpochMeter("hstu", HSTUConfig(), torch.device("cpu")).row(Strategy())
    assert "mfu" not in cpu and {"train_events_per_s", "peak_mem_gb"} <= cpu.keys()
    assert throughput.EpochMeter("sasrec", None, torch.device("cpu")).peak is None


def test_known_gpu_peaks_match_the_longest_name_first():
    names = [name for name, _ in throughput.PEAK_BF16_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100")
