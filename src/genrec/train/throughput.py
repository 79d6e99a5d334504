"""Per-epoch throughput of a training run: events/s (all processes and per process), model FLOPs
utilisation where both the model's FLOPs (:mod:`genrec.flops`) and the device's peak are known, and
peak memory.

MFU = the model's analytic training FLOPs per second / the device's dense bf16 peak. The FLOPs are
:func:`genrec.flops.flops` per sequence (every event a target, one event per request: an upper
bound of the work, so MFU is optimistic where requests hold several events). Peak memory is the
CUDA allocator's peak over the epoch on GPU; on CPU the process's peak resident set so far (Linux
cannot reset it per epoch).
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from genrec import flops as flops_lib
from genrec.data.batching import JaggedBatch

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched on the
# device name in this order (PCIe before the SXM default of the same chip).
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("A100", 312.0)]


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where it is not in :data:`PEAK_BF16_TFLOPS` (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class EpochMeter:
    """Counts one epoch's events and FLOPs on this process, timed from :meth:`start` (data loading
    included) to :meth:`row`, which reduces over processes through ``strategy`` (``sum``, ``max``)."""

    def __init__(self, model_name: str, model_cfg, device: torch.device):
        self.device = device
        self.flop_model = model_name if model_name in flops_lib.LINEAR_PER_TOKEN else None
        self.d, self.layers = getattr(model_cfg, "d_model", None), getattr(model_cfg, "num_layers", None)
        self.peak = peak_tflops(device) if self.flop_model and self.d and self.layers else None
        self.start()

    def start(self) -> None:
        self.events, self.flops = 0, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()

    def add(self, batch: JaggedBatch) -> None:
        self.events += batch.num_events
        if self.peak is not None:
            self.flops += sum(flops_lib.flops(self.flop_model, int(n), self.d, self.layers)["total"]
                              for n in batch.lengths.tolist())

    def row(self, strategy) -> dict[str, float]:
        """``train_events_per_s`` (all processes), ``train_events_per_s_per_process``, ``peak_mem_gb``
        (the largest process), and ``mfu`` where the peak is known, over the slowest process's time."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = strategy.max(time.perf_counter() - self.t0)
        events = strategy.sum(float(self.events))
        row = {"train_events_per_s": events / seconds if seconds else float("nan"),
               "train_events_per_s_per_process": events / seconds / strategy.world_size if seconds else float("nan"),
               "peak_mem_gb": strategy.max(peak_memory_gb(self.device))}
        if self.peak is not None:
            row["mfu"] = strategy.sum(self.flops) / seconds / (self.peak * 1e12 * strategy.world_size)
        return row
