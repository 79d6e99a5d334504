"""GPU speed of genrec's generative rankers and fused attention kernels, in one run (issue 6).

Three parts, each a table in the result file:

* ``kernel``: our Triton HSTU attention (causal, without and with the relative position/time bias:
  ``_rab`` with one table slot per distance, the models' table (``max_len + 1`` slots),
  ``_rab256`` with HSTUBlock's default 256 slots, distances past it sharing the last), the
  dual-flow attention of DFGR (``dual_flow_rab``: with the models' table), and ALiBi softmax
  attention through ``flex_attention``, each forward and forward+backward, beside PyTorch's causal
  ``scaled_dot_product_attention`` through each of its backends (flash, cuDNN, memory-efficient;
  one that cannot run is a row with its error), the HSTU authors' Triton kernel when
  ``--anchor-path`` names a checkout of meta-recsys/generative-recommenders (imported from there,
  never copied), and a bf16 matrix product, all in the same run. bf16, 4 heads, head dim 128,
  ``--kernel-tokens`` tokens per batch in equal-length sequences (the HSTU authors' benchmark
  shapes). TFLOP/s count the pairs the mask allows (4·Dh FLOPs per pair forward, 2.5x that
  backward); ``vs_sdpa`` is a time over the *fastest* SDPA backend's on the same N
  (``sdpa_fastest`` names it; all causal over N tokens; the dual-flow row's N tokens are N/2 real
  + N/2 fake). ``--kernel-profile`` adds to each genrec row its four kernels' times under
  torch.profiler (5 more forward + backward calls): ``attention_fwd_ms``, ``attention_dkdv_ms``,
  ``attention_dq_ms`` and the bias gradients' ``bias_grad_ms`` (at head dims up to 64 two kernels,
  the band kernel's time added in), what the bias target is made of.
* ``train``: one optimizer step (fused AdamW, bf16 autocast, clipped gradients) of HSTU, GenRank
  and DFGR (d=512, 8 heads, 4 layers, backend ``triton``) on synthetic equal-length sequences;
  events/s, peak memory and MFU (model FLOPs per second over the matmul peak of the same run).
  ``dfgr_sparse`` is DFGR with the fake flow of the target events only (``fake_flow="targets"``:
  N + T tokens, not 2N); each model
  runs per ``--train-target-shares`` (``target_share`` 1: every event a target; 0.1: the last 10 %
  of each sequence, the temporal setting of issue 14 item 5b). Each step takes a host batch as
  :meth:`genrec.train.trainer.Trainer.queue_step` does: in pinned memory, its times checked on the
  host, its layout's kernel metadata and schedules built on the host by the model's plan as the
  trainer's loader workers do (``data.num_workers`` >= 1; :mod:`genrec.nn.prepared`,
  :func:`prepared`), moved to the GPU, the forward run without reading the time span back; the
  steps are queued back to back in windows of ``--train-steps`` and each window timed together,
  as the trainer runs them; ``step_ms`` is the median over ``--train-windows`` windows of their
  mean (``step_ms_windows`` each: a short compiled step the host only just keeps up with varies
  with the host from window to window). ``layout`` rows measure what a step pays
  for its layout (token layout, kernel metadata, tile schedules, bias spans), all on one batch:
  ``step_ms`` with the layout built in the step, ``step_ms_layout_reused`` with it built once and
  reused (:func:`layouts_reused`: the step without that work), ``layout_in_step_ms`` their
  difference and ``in_step_share`` its share of the step; ``step_ms_prepared`` the trainer's step on
  the loader-built layout and ``prepared_in_step_share`` its difference to the reused one over it,
  what issue 14's target bounds (differences of timed medians, so a share near 0 can come out below it);
  ``prepare_host_ms`` the plan's host time per batch (a loader worker's, beside the step:
  ``prepare_share_of_step``). ``layout_ms`` times the build (events, token layout, metadata, the
  three tile schedules) standalone and synchronised, with the timestamp check's read-back the step
  skips but without the bias's span tables and split flags: ``standalone_share_of_step``, quoted
  beside the target without one. ``--train-compile`` times the models ``torch.compile``'d (``genrec
  train``'s ``train.compile``): train rows of mode ``compiled``, no layout rows; the ratio rows pair
  them with each other, and the training targets read them where they cover every eager shape.
  ``--train-cuda-graphs`` (with ``--train-compile``) replays those steps as CUDA graphs (``genrec
  train``'s ``train.cuda_graphs``): rows of mode ``compiled, CUDA graphs``, paired with each other
  and counted among the compiled rows by the targets. Their ``peak_mem_gb`` leaves out the graphs'
  memory pool, allocated while they were recorded in the warm-up steps before the counter's reset.
  ``--train-no-bias`` times the models without the relative bias (``model_args.relative_bias:
  false``): train and layout rows of mode ``no bias`` (``compiled, no bias`` with both), paired with
  each other; the training targets take the worst over the biased rows and these (issue 14: "bias
  on and off"). ``--train-profile`` adds to each train row where its step's GPU time goes (3 more
  steps under torch.profiler): all CUDA kernels (``kernels_ms``), the fused attention's
  (``attention_ms``) and each of its four kernels, the bias gradients' (``bias_grad_ms``, both
  their kernels where the band kernel runs) among them, the matrix products' (``matmul_ms``), the
  optimizer's and the clipping's passes over every parameter (``optimizer_ms``), the costliest
  kernels by name (``kernels_top_ms``, JSON only), and ``host_over_kernels``: ``host_ms`` over
  ``kernels_ms``. Every train row has ``host_ms``, the host's time to issue one step with the GPU
  idle (:func:`_host_ms`): a short compiled step can take the host longer to issue than the GPU to
  run, and its ``step_ms`` then times the host. ``--train-host-profile`` adds where that host time
  goes (3 more steps under torch.profiler): the CUDA launch calls' time and count
  (``host_launch_ms``, ``host_launches``) and the costliest events by their own host time
  (``host_top_ms``).
* ``infer``: per-request latency of scoring M candidates after an N-event history, one request at a
  time: ``cold`` runs the history once (KV cache) then the candidates in micro-batches of at most
  512 (M-FALCON); ``cached`` scores against a history cache built earlier. Each eagerly and replayed
  as CUDA graphs (``_graph``, :mod:`genrec.serve.graphs`). p50/p99 over requests.
* ``ratio``: DFGR over HSTU throughput per shape and mode, beside ``flop_ratio``: HSTU's FLOPs over
  DFGR's for the same work (linear layers 10·d² per token, attention 4·d per pair the mask allows,
  counted on the benchmark's own layouts; training 3x / 3.5x that). It is the ratio both would show
  at equal efficiency: DFGR saves attention pairs, not linear-layer work.

    python benchmarks/speed.py [--parts kernel,train,infer] [--ns 256,512,...,8192]

Writes ``benchmarks/results/speed_<device>.{json,md}`` with the ``targets`` of issue 14 computed
from its rows (unmet ones stay unmet; a target without rows is ``null`` with the reason). Needs a
CUDA device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import report
from genrec.data.batching import JaggedBatch
from genrec.data.info import DatasetInfo
from genrec.flops import layout_flops
from genrec.models import MODELS, build_model, dfgr, genrank, hstu, sfgr
from genrec.nn.events import Events, dual_flow_layout, item_action_layout, target_dual_flow_layout
from genrec.nn.kv_cache import in_micro_batches
from genrec.ops.layout import TokenLayout, host_checked, times_within_limit
from genrec.train.trainer import compile_options

ROOT = Path(__file__).resolve().parent.parent
NUM_ITEMS = 100_000
FIRST_EVENT_S = 1_000_000_000  # 2001: synthetic histories of up to ~17k events stay below 2^31 s


def bench_ms(fn, warmup_ms: int = 100, rep_ms: int = 400) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def matmul_peak_tflops() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / bench_ms(lambda: a @ b) / 1e9


# ---------------------------------------------------------------------------------------- kernels
def _kernel_layout(batch: int, n: int, rule: str) -> tuple[TokenLayout, int]:
    """Equal-length sequences of n tokens, one event per request, and the number of allowed pairs
    per sequence. ``dual_flow``: n/2 real then n/2 fake tokens."""
    dev = "cuda"
    if rule == "dual_flow":
        e = torch.arange(n // 2, device=dev).repeat(2).expand(batch, n)
        fake = (torch.arange(n, device=dev) >= n // 2).expand(batch, n)
        half = n // 2
        pairs = half * (half + 1) // 2 + half * (half - 1) // 2 + half
    else:
        e = torch.arange(n, device=dev).expand(batch, n)
        fake = torch.zeros(batch, n, dtype=torch.bool, device=dev)
        pairs = n * (n + 1) // 2
    layout = TokenLayout(valid=torch.ones(batch, n, dtype=torch.bool, device=dev), request=e, event=e, fake=fake,
                         position=e, timestamp=e * 3600, rule=rule)
    return layout, pairs


SDPA_BACKENDS = ("flash", "cudnn", "efficient")


def _sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    choice = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def attention(q, k, v):
        with sdpa_kernel(choice):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attention


def anchor_attention(path: str):
    """The HSTU authors' fused Triton attention (``triton_hstu_mha``) from a checkout of
    meta-recsys/generative-recommenders at ``path``, as a function of ``[B, H, N, Dh]`` q, k, v (their
    kernel takes jagged ``[B·N, H, Dh]`` tensors and sequence offsets: converted before timing)."""
    sys.path.insert(0, str(Path(path).resolve()))
    from generative_recommenders.ops.triton.triton_hstu_attention import triton_hstu_mha

    def prepare(t: torch.Tensor) -> torch.Tensor:
        return t.detach().transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]).contiguous()  # [B·N, H, Dh]

    def attention(q, k, v):  # the longest length and offsets of the batch: set per shape
        return triton_hstu_mha(attention.n, 1.0 / math.sqrt(q.shape[-1]), q, k, v, attention.offsets)
    return attention, prepare


def _kernel_variants(backend, batch: int, n: int, rel_pos, rel_time, rel_pos256, slopes) -> dict:
    """name -> (attention function of q, k, v; allowed pairs per sequence)."""
    causal, causal_pairs = _kernel_layout(batch, n, "causal")
    dual, dual_pairs = _kernel_layout(batch, n, "dual_flow")
    variants = {f"sdpa_{name}_causal": (_sdpa(name), causal_pairs) for name in SDPA_BACKENDS}
    return variants | {
        "hstu_causal": (lambda q, k, v: backend.hstu_attention(q, k, v, causal, None, None, 1.0 / n), causal_pairs),
        "hstu_causal_rab": (lambda q, k, v: backend.hstu_attention(q, k, v, causal, rel_pos, rel_time, 1.0 / n),
                            causal_pairs),
        "hstu_causal_rab256": (lambda q, k, v: backend.hstu_attention(q, k, v, causal, rel_pos256, rel_time,
                                                                      1.0 / n), causal_pairs),
        "dual_flow": (lambda q, k, v: backend.hstu_attention(q, k, v, dual, None, None, 1.0 / n), dual_pairs),
        "dual_flow_rab": (lambda q, k, v: backend.hstu_attention(q, k, v, dual, rel_pos, rel_time, 1.0 / n),
                          dual_pairs),
        "flex_alibi_causal": (lambda q, k, v: backend.softmax_attention(q, k, v, causal, slopes), causal_pairs),
    }


def _time_variant(fn, leaves, do) -> tuple[float, float]:
    fwd_ms = bench_ms(lambda: fn(*leaves))
    both_ms = bench_ms(lambda: torch.autograd.grad(fn(*leaves), leaves, do))
    return fwd_ms, both_ms


GENREC_KERNELS = ("hstu_", "dual_flow")  # kernel rows of genrec's fused attention (--kernel-profile splits them)


def _kernel_split(fn, leaves, do, steps: int = 5) -> dict[str, float]:
    """:func:`_profiled` forward + backward calls of a genrec kernel row (after :func:`_time_variant`
    warmed it up): its four kernels' times, the bias-gradient kernel's (``bias_grad_ms``) among them."""
    def run():
        for _ in range(steps):
            torch.autograd.grad(fn(*leaves), leaves, do)
        torch.cuda.synchronize()

    return _profiled(run, steps)


def kernel_rows(ns: list[int], tokens: int, heads: int, dim: int, peak: float, backend,
                anchor_path: str | None = None, only: set[str] | None = None, profile: bool = False) -> list[dict]:
    from genrec.ops.reference.attention import alibi_slopes

    anchor = anchor_attention(anchor_path) if anchor_path else None
    rows = []
    for n in ns:
        batch = max(tokens // n, 1)
        gen = torch.Generator(device="cuda").manual_seed(n)
        q, k, v, do = (torch.randn(batch, n, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                       .transpose(1, 2) for _ in range(4))  # [B, H, N, Dh] views of [B, N, H, Dh], as in the models
        rel_pos = (torch.randn(heads, n + 1, device="cuda") * 0.1).requires_grad_()
        rel_pos256 = (torch.randn(heads, 256, device="cuda") * 0.1).requires_grad_()
        rel_time = (torch.randn(heads, 32, device="cuda") * 0.1).requires_grad_()
        slopes = alibi_slopes(heads).cuda()

        variants = _kernel_variants(backend, batch, n, rel_pos, rel_time, rel_pos256, slopes)
        if anchor:
            fn, prepare = anchor
            fn.n, fn.offsets = n, torch.arange(batch + 1, device="cuda") * n
            variants["authors_triton_causal"] = (fn, variants["hstu_causal"][1])
        part = []
        for name, (fn, pairs) in variants.items():
            if only and name not in only:
                continue
            base = (q, k, v, do)
            if name == "authors_triton_causal":
                base = tuple(anchor[1](t) for t in base)
            leaves = [t.detach().requires_grad_() for t in base[:3]]
            fwd_flops = 4 * dim * pairs * batch * heads
            row = {"bench": "kernel", "kernel": name, "n": n, "batch": batch, "heads": heads, "dh": dim}
            try:
                fwd_ms, both_ms = _time_variant(fn, leaves, base[3])
            except RuntimeError as err:  # an SDPA backend that does not take these shapes here
                if not name.startswith("sdpa"):
                    raise
                part.append(row | {"error": str(err).splitlines()[0][:200]})
                print(f"kernel {name:22s} N={n:5d} cannot run: {part[-1]['error']}", flush=True)
                continue
            part.append(row | {"fwd_ms": fwd_ms, "fwd_tflops": fwd_flops / fwd_ms / 1e9, "fwd_bwd_ms": both_ms,
                               "fwd_bwd_tflops": 3.5 * fwd_flops / both_ms / 1e9,
                               "fwd_frac_of_matmul_peak": fwd_flops / fwd_ms / 1e9 / peak})
            if profile and name.startswith(GENREC_KERNELS):
                part[-1] |= _kernel_split(fn, leaves, base[3])
            print(f"kernel {name:22s} N={n:5d} fwd {fwd_ms:7.3f} ms fwd+bwd {both_ms:7.3f} ms", flush=True)
        rows += part
    return rows


def _versus_fastest_sdpa(rows: list[dict]) -> list[dict]:
    """Each kernel row's times over the fastest SDPA backend's at its N (forward and forward+backward
    separately), naming that backend."""
    out = []
    for r in rows:
        sdpa = [s for s in rows if s["bench"] == "kernel" and s["n"] == r["n"] and s["kernel"].startswith("sdpa")
                and "fwd_ms" in s]
        if r["bench"] != "kernel" or "fwd_ms" not in r or not sdpa:
            out.append(r)
            continue
        fwd, both = min(sdpa, key=lambda s: s["fwd_ms"]), min(sdpa, key=lambda s: s["fwd_bwd_ms"])
        out.append(r | {"fwd_vs_sdpa": r["fwd_ms"] / fwd["fwd_ms"],
                        "fwd_bwd_vs_sdpa": r["fwd_bwd_ms"] / both["fwd_bwd_ms"],
                        "sdpa_fastest_fwd": fwd["kernel"], "sdpa_fastest_fwd_bwd": both["kernel"]})
    return out


# ------------------------------------------------------------------------------------ models
def synthetic_batch(batch: int, n: int, seed: int, device: str = "cuda", target_share: float = 1.0) -> JaggedBatch:
    """``batch`` sequences of ``n`` events: requests of 1-3 events, minutes to days apart; the last
    ``ceil(target_share · n)`` events of each are targets."""
    rng = np.random.default_rng(seed)
    total = batch * n
    new_request = rng.random(total) < 0.5
    new_request[:: n] = True
    request = np.concatenate([np.cumsum(r) - 1 for r in new_request.reshape(batch, n)])
    gaps = np.where(new_request, rng.integers(60, 86_400 * 3, total), 0).reshape(batch, n)
    actions = rng.integers(0, 5, total)
    last = np.arange(n) >= n - math.ceil(target_share * n)  # [n] the target events of a sequence
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return JaggedBatch(offsets=t(np.arange(batch + 1) * n), items=t(rng.integers(1, NUM_ITEMS + 1, total)),
                       known_max_len=n, actions=t(actions), labels=t((actions >= 3).astype(np.float32)),
                       timestamps=t((FIRST_EVENT_S + np.cumsum(gaps, axis=1)).ravel()),
                       request_ids=t(request), target_mask=t(np.tile(last, batch)), users=t(np.arange(batch)))


INFO = DatasetInfo(num_items=NUM_ITEMS, num_actions=5, num_users=1, item_genres=np.zeros((1, 1), np.float32),
                   rating_values=[1.0, 2.0, 3.0, 4.0, 5.0])


VARIANTS = {"dfgr_sparse": ("dfgr", {"fake_flow": "targets"})}  # row name -> registry model and its arguments


def make_model(name: str, n: int, args, relative_bias: bool = True) -> torch.nn.Module:
    """The model (a registry name or one of :data:`VARIANTS`) on the triton backend, its blocks
    holding ``args.backend`` (the kernels' tiles of ``--tiles``); ``relative_bias`` False turns the
    bias off where the model has one (GenRank has none)."""
    name, preset = VARIANTS.get(name, (name, {}))
    model_args = {"d_model": args.d, "num_heads": args.heads, "num_layers": args.layers, "dropout": 0.0,
                  "attention_backend": "triton", **preset}
    if "relative_bias" in MODELS[name][1].__dataclass_fields__:
        model_args["relative_bias"] = relative_bias
    model = build_model(name, model_args, INFO, n).cuda()
    for block in model.blocks:
        block.backend = args.backend
    return model


# the training layouts of the models whose loader builds their kernels' layout (genrec.nn.prepared)
TRAIN_LAYOUTS = {"hstu": item_action_layout, "dfgr": dual_flow_layout,
                 "dfgr_sparse": lambda ev: target_dual_flow_layout(ev)[0], "sfgr": sfgr.training_layout}
# per model: its training layout, where its last block starts its outputs (the blocks' outputs_from)
# and its blocks' FLOP model (genrec.flops.layout_flops)
TRAIN_FLOPS = {"hstu": (TRAIN_LAYOUTS["hstu"], hstu.last_outputs_from, "hstu"),
               "dfgr": (TRAIN_LAYOUTS["dfgr"], dfgr.last_outputs_from, "dfgr"),
               "dfgr_sparse": (TRAIN_LAYOUTS["dfgr_sparse"], dfgr.last_outputs_from, "dfgr"),
               "genrank": (genrank.training_layout, genrank.last_outputs_from, "genrank"),
               "sfgr": (TRAIN_LAYOUTS["sfgr"], sfgr.last_outputs_from, "sfgr")}


def train_gflop_per_event(name: str, n: int, args, target_share: float = 1.0) -> float:
    """Training FLOPs per event (forward + backward: 3x linear, 3.5x attention) on one sequence, the
    last block's counted for the tokens it computes (GenRank: its candidates), valid tokens only
    (padding, and GenRank's candidates of events that are not targets, count as waste)."""
    layout, outputs_from, flop_model = TRAIN_FLOPS[name]
    batch = synthetic_batch(1, n, 0, device="cpu", target_share=target_share)
    linear, attention = layout_flops(layout(Events.from_batch(batch)), args.d, args.layers,
                                     outputs_from=outputs_from(batch), model=flop_model)
    return (3 * linear + 3.5 * attention) / n / 1e9


def infer_gflop_per_request(model, ev: Events, m: int, micro: int, cached: bool, args) -> float:
    """Forward FLOPs of one request: the history (unless cached) and ceil(M / micro) micro-batches."""
    with torch.no_grad():
        cache = model.kv_serving.encode_events(ev, micro)
        chunk = model.candidate_tokens(torch.ones(1, micro, dtype=torch.long, device="cuda"), cache,
                                       ev.timestamp[:, -1])[1]  # the layout of one micro-batch
    history = cache.layout
    total = 0.0 if cached else sum(layout_flops(history, args.d, args.layers))
    total += -(-m // micro) * sum(layout_flops(chunk, args.d, args.layers, q_offset=history.shape[1]))
    return total / 1e9


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: JaggedBatch, graphs: bool) -> None:
    """One step on a host batch as :meth:`genrec.train.trainer.Trainer.queue_step` takes it on a GPU:
    the batch in pinned memory (the trainer's loaders pin it), its times checked on the host
    (:func:`genrec.ops.layout.host_checked`), moved to the GPU, the forward run under bf16 autocast
    without reading the time span back (``graphs``: a new step of the compiled model's CUDA graphs,
    as ``train.cuda_graphs`` marks it), the gradients clipped, a fused AdamW step; nothing read back."""
    times_checked = host_checked(batch.timestamps)
    batch = batch.to("cuda")
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16), times_checked:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = model(batch)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _train_step_windows(model: torch.nn.Module, data: list[JaggedBatch], args) -> list[float]:
    """Milliseconds per step (:func:`_train_step`) in each of ``args.train_windows`` windows of
    ``args.train_steps`` steps on ``data`` in turn, queued back to back and timed to the GPU's end
    of the window's last step, as the trainer's loop runs them (it reads each step's row one step
    late, so the host queues a step while the GPU runs the one before); after 3 warm-up (and
    compile) steps. A row reports their median: a step the host only just keeps up with (short
    steps, compiled) varies from window to window with the host. Resets the peak-memory counter
    after the warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    _queue_steps(model, opt, data, 3, args.train_cuda_graphs)
    torch.cuda.reset_peak_memory_stats()
    windows = []
    for _ in range(args.train_windows):
        start = time.perf_counter()
        _queue_steps(model, opt, data, args.train_steps, args.train_cuda_graphs)
        windows.append((time.perf_counter() - start) / args.train_steps * 1e3)
    return windows


def _queue_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, data: list[JaggedBatch], steps: int,
                 graphs: bool) -> None:
    """``steps`` steps (:func:`_train_step`) on ``data`` in turn, queued back to back; returns once the
    GPU has run the last."""
    for i in range(steps):
        _train_step(model, opt, data[i % len(data)], graphs)
    torch.cuda.synchronize()


ATTENTION_KERNELS = {"_hstu_fwd": "attention_fwd_ms", "_hstu_bwd": "attention_dkdv_ms",
                     "_hstu_bwd_rab": "bias_grad_ms", "_hstu_bwd_rab_bands": "bias_grad_ms",
                     "_hstu_bwd_dq": "attention_dq_ms"}  # Triton kernel -> field (both bias-gradient kernels in one)


OPTIMIZER_KERNEL = "multi_tensor_apply_kernel"  # fused AdamW and clipping's foreach norm and scaling
# cuBLAS's matrix products on sm_90 (nvjet, cutlass / xmma kernels) and inductor's own Triton templates
MATMUL_KERNELS = ("nvjet", "gemm", "cutlass", "xmma", "triton_tem_fused_mm", "triton_tem_fused_addmm")


def kernel_fields(device_ms: dict[str, float], steps: int, top: int = 12) -> dict:
    """Per step: the device's time in kernels and copies (``kernels_ms``), the fused attention's four
    kernels each and together (``attention_ms``), the matrix products' (``matmul_ms``: the linear
    layers, both models' FLOPs but for attention), the passes over every parameter that the
    optimizer step and the gradient clipping make (``optimizer_ms``: a cost HSTU and DFGR share,
    set by the item table's size, not by the tokens), and the ``top`` costliest kernels by name
    (``kernels_top_ms``: what the rest is); ``device_ms``: profiled device milliseconds by kernel
    name over ``steps`` steps. Kernels the profile lacks count 0 (no bias: no bias-gradient
    kernel)."""
    fields = dict.fromkeys(ATTENTION_KERNELS.values(), 0.0)
    for name, ms in device_ms.items():
        if name in ATTENTION_KERNELS:
            fields[ATTENTION_KERNELS[name]] += ms / steps
    per_step = lambda names: sum(device_ms[n] for n in names) / steps  # noqa: E731
    costliest = sorted(device_ms, key=device_ms.get, reverse=True)[:top]
    return {"kernels_ms": per_step(device_ms), "attention_ms": sum(fields.values()), **fields,
            "matmul_ms": per_step(n for n in device_ms if any(k in n for k in MATMUL_KERNELS)),
            "optimizer_ms": per_step(n for n in device_ms if OPTIMIZER_KERNEL in n),
            "kernels_top_ms": {n: device_ms[n] / steps for n in costliest}}


def _profiled(run, steps: int) -> dict[str, float]:
    """:func:`kernel_fields` of ``run()``, which runs ``steps`` steps and waits for the GPU, under
    torch.profiler: where a step's GPU time goes, the fused attention's kernels by name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
    device_ms: dict[str, float] = {}
    for event in prof.key_averages():
        if event.self_device_time_total > 0:
            device_ms[event.key] = device_ms.get(event.key, 0.0) + event.self_device_time_total / 1e3
    return kernel_fields(device_ms, steps)


def _host_ms(model: torch.nn.Module, data: list[JaggedBatch], graphs: bool, steps: int = 5) -> float:
    """The host's milliseconds to issue one step (:func:`_train_step`) with the GPU idle: the queue
    drained before the step, timed until the call returns, before the GPU runs it; the median over
    ``steps`` steps after one warm-up. A step whose ``host_ms`` reaches its CUDA kernels' time
    (``kernels_ms``) is paced by the host, not the GPU: ``step_ms`` then measures the host. A step
    issuing more launches than CUDA's queue holds (about a thousand: an eager step can) waits for
    the GPU within the call, so there ``host_ms`` is an upper bound; a compiled step issues ~300."""
    return statistics.median(_issued_ms(model, _warm_optimizer(model, data, graphs), data, steps, graphs))


def _warm_optimizer(model: torch.nn.Module, data: list[JaggedBatch], graphs: bool) -> torch.optim.Optimizer:
    """A fused AdamW of ``model`` after one step (:func:`_queue_steps`): its state allocated, the
    step's code warm."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    _queue_steps(model, opt, data, 1, graphs)
    return opt


def _issued_ms(model: torch.nn.Module, opt: torch.optim.Optimizer, data: list[JaggedBatch], steps: int,
               graphs: bool) -> list[float]:
    """``steps`` steps (:func:`_train_step`), each issued on an idle GPU: the host's milliseconds from
    the call until it returns, the GPU drained after each."""
    issued = []
    for i in range(steps):
        start = time.perf_counter()
        _train_step(model, opt, data[i % len(data)], graphs)
        issued.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    return issued


LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel")  # CUDA runtime and driver launch calls (and their Ex forms)


def host_fields(cpu_ms: dict[str, float], calls: dict[str, int], steps: int, top: int = 12) -> dict:
    """Per step, where the host's time to issue a step goes: ``host_launch_ms`` in the CUDA launch
    calls and their count (``host_launches``), and ``host_top_ms``, the ``top`` costliest events
    by their own (self) host time; ``cpu_ms`` and ``calls``: profiled self host milliseconds and
    counts by event name over ``steps`` steps."""
    launches = [name for name in cpu_ms if name.startswith(LAUNCH_CALLS)]
    costliest = sorted(cpu_ms, key=cpu_ms.get, reverse=True)[:top]
    return {"host_launch_ms": sum(cpu_ms[n] for n in launches) / steps,
            "host_launches": sum(calls[n] for n in launches) / steps,
            "host_top_ms": {n: cpu_ms[n] / steps for n in costliest}}


def _host_profile(model: torch.nn.Module, data: list[JaggedBatch], graphs: bool, steps: int = 3) -> dict:
    """:func:`host_fields` of ``steps`` steps each issued on an idle GPU (as :func:`_host_ms` times
    them) under torch.profiler, after one warm-up: what the host does while it issues a step."""
    opt = _warm_optimizer(model, data, graphs)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        _issued_ms(model, opt, data, steps, graphs)
    cpu_ms: dict[str, float] = {}
    calls: dict[str, int] = {}
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0 and event.key != "cudaDeviceSynchronize":  # the wait between steps
            cpu_ms[event.key] = cpu_ms.get(event.key, 0.0) + event.self_cpu_time_total / 1e3
            calls[event.key] = calls.get(event.key, 0) + event.count
    return host_fields(cpu_ms, calls, steps)


def _step_kernels(model: torch.nn.Module, data: list[JaggedBatch], graphs: bool, steps: int = 3) -> dict[str, float]:
    """:func:`_profiled` training steps (:func:`_train_step`, after one warm-up)."""
    opt = _warm_optimizer(model, data, graphs)
    return _profiled(lambda: _queue_steps(model, opt, data, steps, graphs), steps)


@contextmanager
def layouts_reused(model: torch.nn.Module) -> Iterator[None]:
    """Under it, every forward of ``model`` hands its blocks the token layout of its first forward
    under it, and with it what that layout caches (:meth:`TokenLayout.cached`: kernel metadata, tile
    schedules, bias spans; built in the first forward's first block). A step then does everything
    but that work, so timing it beside a normal step measures what the layout costs *inside* a step.
    The forward still builds its events and the layout's ``[B, L]`` fields (a few elementwise kernels;
    ``dfgr_sparse``'s target count comes with the batch from the host), then drops the layout. Meant
    for steps on one batch: a layout of another shape is refused."""
    reused: list[TokenLayout] = []

    def reuse_first(block: torch.nn.Module, args: tuple) -> tuple:
        x, layout, *rest = args  # HSTUBlock.forward(x [B, L, D], layout, ...)
        if not reused:
            reused.append(layout)
        elif layout.shape != reused[0].shape:
            raise ValueError(f"layouts_reused: a layout of shape {layout.shape} after {reused[0].shape}; "
                             "reuse is for steps on one batch")
        return (x, reused[0], *rest)

    handles = [block.register_forward_pre_hook(reuse_first) for block in model.blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layout_ms(name: str, batch: JaggedBatch, args, repeats: int = 10) -> float:
    """Median milliseconds of building a training step's layout standalone: events, the token layout,
    the kernels' int32 metadata (with its timestamp check's read-back, which a host-checked step
    skips; for ``dfgr_sparse`` also its target count's, which a step takes from the batch) and the
    three tile schedules of the model's head dim, synchronised after each build. Not the bias's
    span tables and split flags, which the in-step timing (:func:`_layout_row`) includes; inside a
    step the work is asynchronous and overlaps the step's kernels."""
    from genrec.ops.triton.hstu import _schedule

    tiles = args.backend_config.tiles(args.d // args.heads, torch.bfloat16)
    batch = batch.to("cuda")

    def build() -> None:
        layout = TRAIN_LAYOUTS[name](Events.from_batch(batch))
        for tile, transpose in zip(tiles, (False, True, False), strict=True):  # the metadata on the way
            _schedule(layout, tile, 0, transpose)
        torch.cuda.synchronize()

    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        build()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def loaded(batch: JaggedBatch) -> JaggedBatch:
    """``batch`` as the trainer's loaders hand it over: pinned where the steps run on a GPU."""
    return batch.pin_memory() if torch.cuda.is_available() else batch


def train_data(batch: int, n: int, share: float) -> list[JaggedBatch]:
    """Three host batches of the train part (the trainer's loader yields host batches, pinned on a
    GPU), their times within the kernels' limit so that every step skips the device check, as a
    training run's do."""
    data = [loaded(synthetic_batch(batch, n, seed, device="cpu", target_share=share)) for seed in range(3)]
    if not all(times_within_limit(b.timestamps) for b in data):
        raise SystemExit(f"synthetic timestamps of N = {n} reach 2^31 s: the steps would read the span back")
    return data


def train_rows(ns: list[int], args, peak: float) -> list[dict]:
    rows = []
    for n in ns:
        batch = max(args.train_events // n, 1)
        for share in (float(x) for x in args.train_target_shares.split(",")):
            data = train_data(batch, n, share)
            for name in args.train_models.split(","):
                rows += _train_model_rows(name, n, share, data, args, peak)
    return rows


def prepared(model: torch.nn.Module, batch: JaggedBatch) -> tuple[JaggedBatch, float]:
    """``batch`` (a host batch) with its layout built by the model's :class:`~genrec.nn.prepared.LayoutPlan`
    for bf16 steps, as the trainer's loader hands it over, and the milliseconds the plan took on the
    host on one thread (a loader worker's time per batch: the loader runs its workers on one each)."""
    plan = model.layout_plan(torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        layout = plan(batch)
        host_ms = (time.perf_counter() - start) * 1e3
    finally:
        torch.set_num_threads(threads)
    return loaded(dataclasses.replace(batch, known_layout=layout)), host_ms


def _layout_row(model: torch.nn.Module, name: str, n: int, share: float, batch: JaggedBatch, args) -> dict:
    """What building the layout costs a step of ``model`` on ``batch``: the step timed as it is
    (the layout built in it), with its layout reused, and with the layout the loader built on the
    host (the trainer's path: :func:`prepared`), all on this one batch; the standalone build beside them."""
    built = statistics.median(_train_step_windows(model, [batch], args))
    with layouts_reused(model):
        reused = statistics.median(_train_step_windows(model, [batch], args))
    builds = [prepared(model, batch) for _ in range(5)]
    host_ms = statistics.median(ms for _, ms in builds)
    on_host = statistics.median(_train_step_windows(model, [builds[-1][0]], args))
    standalone = layout_ms(name, batch, args)
    return {"bench": "layout", "model": name, "n": n, "target_share": share, "batch": batch.batch_size,
            "step_ms": built, "step_ms_layout_reused": reused, "layout_in_step_ms": built - reused,
            "in_step_share": (built - reused) / built, "step_ms_prepared": on_host,
            "prepared_in_step_share": (on_host - reused) / on_host, "prepare_host_ms": host_ms,
            "prepare_share_of_step": host_ms / on_host, "layout_ms": standalone,
            "standalone_share_of_step": standalone / built}


NO_BIAS = "no bias"  # the mode of train and layout rows of models without the relative bias (--train-no-bias)


def train_mode(args) -> str | None:
    """A train row's mode: ``compiled`` (``--train-compile``) or ``compiled, CUDA graphs``
    (``--train-cuda-graphs``), ``no bias`` (``--train-no-bias``), both, or None (eager, the models'
    bias on)."""
    compiled = "compiled, CUDA graphs" if args.train_cuda_graphs else "compiled"
    return ", ".join(m for m, on in ((compiled, args.train_compile), (NO_BIAS, args.train_no_bias)) if on) or None


def _train_model_rows(name: str, n: int, share: float, data: list[JaggedBatch], args, peak: float) -> list[dict]:
    """The train row of one model on one shape and target share, and its layout row."""
    batch = data[0].batch_size
    torch.manual_seed(0)
    model = make_model(name, n, args, relative_bias=not args.train_no_bias).train()
    planned = [prepared(model, b)[0] if name in TRAIN_LAYOUTS else b for b in data]  # as the trainer's loader
    step_model = (torch.compile(model, options=compile_options(args.train_cuda_graphs)) if args.train_compile
                  else model)  # as the trainer
    windows = _train_step_windows(step_model, planned, args)
    step_ms = statistics.median(windows)
    seconds = step_ms / 1e3
    mode = train_mode(args)
    gflop = train_gflop_per_event(name, n, args, share)
    events_per_s = batch * n / seconds
    rows = [{"bench": "train", "model": name, "n": n, "target_share": share, "batch": batch, "d": args.d,
             "layers": args.layers, "heads": args.heads, "step_ms": step_ms, "step_ms_windows": windows,
             "train_events_per_s": events_per_s,
             "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "gflop_per_event": gflop,
             "tflops": gflop * events_per_s / 1e3, "mfu": gflop * events_per_s / 1e3 / peak,
             "host_ms": _host_ms(step_model, planned, args.train_cuda_graphs), **({"mode": mode} if mode else {})}]
    if args.train_profile:
        rows[-1] |= _step_kernels(step_model, planned, args.train_cuda_graphs)
        rows[-1]["host_over_kernels"] = rows[-1]["host_ms"] / rows[-1]["kernels_ms"]
        print(f"kernels {name} N={n}: {rows[-1]['kernels_ms']:.2f} ms; costliest: "
              + ", ".join(f"{k[:60]} {v:.2f}" for k, v in rows[-1]["kernels_top_ms"].items()), flush=True)
    if args.train_host_profile:
        rows[-1] |= _host_profile(step_model, planned, args.train_cuda_graphs)
        print(f"host {name} N={n}: {rows[-1]['host_launches']:.0f} launches, {rows[-1]['host_launch_ms']:.2f} ms in "
              "them; costliest: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1]["host_top_ms"].items()), flush=True)
    print(f"train {name:11s} N={n:5d} targets {share:4.2f} B={batch:4d} {step_ms:8.2f} ms/step "
          f"{events_per_s:12.0f} events/s mfu {rows[-1]['mfu']:.3f} {mode or ''}",
          flush=True)
    if name in TRAIN_LAYOUTS and not args.train_compile:  # the layout's cost: timed eagerly (mode: no bias or none)
        rows.append(_layout_row(model, name, n, share, data[0], args) | ({"mode": mode} if mode else {}))
        r = rows[-1]
        print(f"layout {name:11s} N={n:5d} in the step {r['layout_in_step_ms']:8.2f} ms = {r['in_step_share']:.3f} "
              f"of it; prepared by the loader {r['prepared_in_step_share']:.3f} (host {r['prepare_host_ms']:.2f} ms); "
              f"standalone {r['layout_ms']:8.2f} ms = {r['standalone_share_of_step']:.3f}", flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def _timed_ms(fn, requests: list[torch.Tensor]) -> list[float]:
    """Milliseconds per request; the first 3 warm up and are dropped."""
    latencies = []
    for i, cands in enumerate(requests):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(cands)
        torch.cuda.synchronize()
        if i >= 3:
            latencies.append((time.perf_counter() - start) * 1e3)
    return latencies


@torch.no_grad()
def _request_latencies(model, history: JaggedBatch, requests: list[torch.Tensor], when: torch.Tensor,
                       micro: int) -> dict[str, list[float]]:
    """Per mode the milliseconds of each request: cold and against a cache, eager and as CUDA graphs."""
    from genrec.serve.graphs import GraphedServing

    ev = Events.from_batch(history)
    graphed = GraphedServing(model, ev, requests[0].shape[1], micro)
    out = {}
    serving = model.kv_serving
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cache = serving.encode_history(history, micro)
        out["cold"] = _timed_ms(lambda cands: in_micro_batches(
            serving.score_cached, serving.encode_history(history, micro), cands, when), requests)
        out["cached"] = _timed_ms(lambda cands: in_micro_batches(serving.score_cached, cache, cands, when), requests)
    out["cold_graph"] = _timed_ms(lambda cands: graphed.cold(ev, cands, when), requests)
    out["cached_graph"] = _timed_ms(lambda cands: graphed.score(cands, when), requests)
    return out


def infer_rows(ns: list[int], ms: list[int], args) -> list[dict]:
    rows = []
    for n in ns:
        history = synthetic_batch(1, n, seed=n)
        when = history.timestamps[-1:] + 3600
        for name in ("hstu", "dfgr"):
            torch.manual_seed(0)
            model = make_model(name, n, args).eval()
            for m in ms:
                micro = min(m, args.micro_batch)
                gen = torch.Generator(device="cuda").manual_seed(m)
                requests = [torch.randint(1, NUM_ITEMS + 1, (1, m), device="cuda", generator=gen)
                            for _ in range(args.requests + 3)]
                ev = Events.from_batch(history)
                for mode, latencies in _request_latencies(model, history, requests, when, micro).items():
                    p50, p99 = float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))
                    rows.append({"bench": "infer", "model": name, "mode": mode, "n": n, "m": m,
                                 "micro_batch": micro, "d": args.d, "layers": args.layers, "heads": args.heads,
                                 "p50_ms": p50, "p99_ms": p99, "infer_candidates_per_s": m / p50 * 1e3,
                                 "gflop_per_request": infer_gflop_per_request(model, ev, m, micro,
                                                                              mode.startswith("cached"), args)})
                    print(f"infer {name:5s} {mode:6s} N={n:5d} M={m:5d} p50 {p50:8.3f} ms p99 {p99:8.3f} ms",
                          flush=True)
            del model
    return rows


def _shape_key(r: dict) -> tuple:
    """What a row measured: part, model or kernel, mode, N, M and target share (rows of files from
    before the share was a setting trained every event as a target)."""
    share = r.get("target_share", 1.0)
    return r["bench"], r.get("model", r.get("kernel")), r.get("mode"), r.get("n"), r.get("m"), share


DFGR_ROWS = ("dfgr", "dfgr_sparse")  # compared with HSTU in the ratio rows


def ratios(rows: list[dict]) -> list[dict]:
    """DFGR (dense and target-only fake flow) over HSTU, per shape: training events/s at the same
    target share and inference candidates/s in the same mode, plus DFGR serving from its cache
    against HSTU cold (M-FALCON); each beside the FLOP ratio."""
    out = []
    by = {_shape_key(r): r for r in rows if r["bench"] in ("train", "infer")}
    pairs = [(key, (key[0], "hstu", *key[2:])) for key in by if key[1] in DFGR_ROWS]
    pairs += [(key, ("infer", "hstu", key[2].replace("cached", "cold"), *key[3:])) for key in by
              if key[1] == "dfgr" and key[2] and key[2].startswith("cached")]
    for ours, theirs in pairs:
        if theirs not in by:
            continue
        r, base = by[ours], by[theirs]
        speed, work = ("train_events_per_s", "gflop_per_event") if r["bench"] == "train" else \
            ("infer_candidates_per_s", "gflop_per_request")
        flop_ratio = base[work] / r[work] if r.get(work) and base.get(work) else None
        mode = ("train" if not ours[2] else f"train, {ours[2]}") if r["bench"] == "train" else (
            ours[2] if ours[2] == theirs[2] else f"{ours[2]} / {theirs[2]}")
        share = {"target_share": ours[5]} if r["bench"] == "train" else {}
        out.append({"bench": "ratio", "part": r["bench"], "model": ours[1], "mode": mode, "n": r["n"],
                    "m": r.get("m") or "", **share, "dfgr_over_hstu": r[speed] / base[speed], "flop_ratio": flop_ratio})
    return out


def write(rows: list[dict], meta: dict, stem: Path) -> None:
    """The JSON (measured rows + DFGR/HSTU ratios) and its Markdown tables."""
    rows = [r for r in rows if "dfgr_over_hstu" not in r]  # ratios are derived, never measured
    order = {"matmul": 0, "kernel": 1, "train": 2, "layout": 3, "infer": 4}
    rows = sorted(rows, key=lambda r: (order[r["bench"]], r["n"]))  # stable: merged runs read in N order
    rows = _versus_fastest_sdpa(rows) + ratios(rows)
    peak = next(r["tflops"] for r in rows if r["bench"] == "matmul")
    tables = [f"bf16 matmul peak (8192³, same run): {peak:.0f} TFLOP/s"]
    columns = {
        "kernel": ["kernel", "n", "batch", "fwd_ms", "fwd_tflops", "fwd_frac_of_matmul_peak", "fwd_bwd_ms",
                   "fwd_bwd_tflops", "fwd_vs_sdpa", "fwd_bwd_vs_sdpa", "sdpa_fastest_fwd_bwd", "attention_fwd_ms",
                   "attention_dkdv_ms", "attention_dq_ms", "bias_grad_ms", "error"],
        "train": ["model", "mode", "n", "target_share", "batch", "step_ms", "train_events_per_s", "tflops", "mfu",
                  "peak_mem_gb", "host_ms", "kernels_ms", "host_over_kernels", "attention_ms", "bias_grad_ms",
                  "matmul_ms", "optimizer_ms"],
        "layout": ["model", "n", "target_share", "batch", "step_ms", "step_ms_layout_reused", "layout_in_step_ms",
                   "in_step_share", "step_ms_prepared", "prepared_in_step_share", "prepare_host_ms",
                   "prepare_share_of_step", "layout_ms", "standalone_share_of_step"],
        "infer": ["model", "mode", "n", "m", "micro_batch", "p50_ms", "p99_ms", "infer_candidates_per_s"],
        "ratio": ["part", "model", "mode", "n", "m", "target_share", "dfgr_over_hstu", "flop_ratio"],
    }
    for bench, cols in columns.items():
        part = [r for r in rows if r["bench"] == bench]
        if part:
            tables.append(f"### {bench}\n\n" + report.markdown_table(part, cols))
    goals = targets(rows)
    tables.append("### targets (issue 14)\n\n" + report.markdown_table(goals, ["name", "value", "op", "target", "met",
                                                                               "rows", "reason"]))
    report.write(stem, rows, "\n\n".join(tables), meta, targets=goals)
    print("\n\n".join(tables))


def _target(name: str, values: list[float], op: str, goal: float, rows: str, missing: str) -> dict:
    """One entry of the targets block: the worst of ``values`` (max for <=, min for >=) against ``goal``."""
    if not values:  # not measured: not met (shared/RESULTS.md)
        return {"name": name, "value": None, "op": op, "target": goal, "met": False, "rows": rows, "reason": missing}
    value = max(values) if op == "<=" else min(values)
    return {"name": name, "value": value, "op": op, "target": goal, "met": value <= goal if op == "<=" else
            value >= goal, "rows": rows}


def _informational(name: str, values: list[float], rows: str, missing: str, worst=max) -> dict:
    """An entry of the targets block that the issue sets no target for (``op``, ``target`` and
    ``met`` null): the worst of ``values`` (``worst``: the largest by default), quoted beside a target
    it explains."""
    return {"name": name, "value": worst(values) if values else None, "op": None, "target": None, "met": None,
            "rows": rows, "reason": "informational, no target" if values else missing}


def _in_step_shares(layout: list[dict], field: str = "prepared_in_step_share") -> tuple[list[float], str]:
    """The layout rows' ``field`` shares, or none (and why) when a row lacks one: rows of earlier
    runs timed less (their layout standalone only, or built in the step only), and a worst case over
    the other rows would not cover their shapes."""
    if not layout:
        return [], "no layout rows"
    untimed = [r for r in layout if field not in r]
    if untimed:
        shapes = sorted({f"{r['model']} at share {r.get('target_share', 1.0)}" for r in untimed})
        return [], (f"{len(untimed)} of {len(layout)} layout rows (of earlier runs) have no {field}: rerun the "
                    f"train part of {', '.join(shapes)}")
    return [r[field] for r in layout], ""


def _training_path(train: list[dict]) -> tuple[list[dict], str, str]:
    """The train ratio rows that the training targets read: the compiled ones (``train.compile``, the
    faster path) where the file has them, else the eager ones; the path's name; and, where the
    compiled rows leave out shapes of the eager ones, why no value (a worst case over fewer shapes)."""
    compiled = [r for r in train if "compiled" in r["mode"]]
    eager = [r for r in train if "compiled" not in r["mode"]]
    if not compiled:
        return eager, "eager", ""
    shapes = [{(r["model"], r["n"], r["target_share"], NO_BIAS in r["mode"]) for r in part}
              for part in (eager, compiled)]
    missing = sorted(shapes[0] - shapes[1])
    if missing:
        return [], "compiled", (f"no compiled ratio rows for {len(missing)} of the eager ones' shapes "
                                f"(first: {missing[0]})")
    return compiled, "compiled", ""


def _flop_shares(train: list[dict]) -> list[float]:
    """Each train ratio row's DFGR / HSTU speed over its FLOP ratio."""
    return [r["dfgr_over_hstu"] / r["flop_ratio"] for r in train]


def _sparse_ratios(train: list[dict]) -> list[float]:
    return [r["dfgr_over_hstu"] for r in train if r["model"] == "dfgr_sparse" and math.isclose(r["target_share"], 0.1)
            and r["n"] >= 1024]


BIAS_ROWS = (("hstu_causal_rab", "hstu_causal"), ("hstu_causal_rab256", "hstu_causal"),
             ("dual_flow_rab", "dual_flow"))  # a kernel row with the relative bias, the row without it


def targets(rows: list[dict]) -> list[dict]:
    """Issue 14's targets, from this file's rows."""
    kern = {(r["kernel"], r["n"]): r for r in rows if r["bench"] == "kernel" and "fwd_bwd_ms" in r}
    ns = sorted({n for _, n in kern if 1024 <= n <= 8192})
    bias = [kern[(v, n)]["fwd_bwd_ms"] / kern[(base, n)]["fwd_bwd_ms"] for n in ns
            for v, base in BIAS_ROWS if (v, n) in kern and (base, n) in kern]
    nobias = [kern[(v, n)]["fwd_bwd_vs_sdpa"] for n in ns for v in ("hstu_causal", "dual_flow")
              if "fwd_bwd_vs_sdpa" in kern.get((v, n), {})]  # rows with an SDPA backend beside them
    every_train = [r for r in rows if r["bench"] == "ratio" and r["part"] == "train" and r["flop_ratio"]]
    train, path, uncovered = _training_path(every_train)
    eager = [r for r in every_train if "compiled" not in r["mode"]]
    layout = [r for r in rows if r["bench"] == "layout"]
    in_step, untimed = _in_step_shares(layout)
    built_in_step, built_untimed = _in_step_shares(layout, "in_step_share")
    worker, worker_untimed = _in_step_shares(layout, "prepare_share_of_step")
    profiled = [r for r in rows if r["bench"] == "train" and "kernels_ms" in r]
    return [
        _target("bias_over_nobias_fwd_bwd_max", bias, "<=", 1.3,
                "kernel rows hstu_causal_rab and hstu_causal_rab256 over hstu_causal, dual_flow_rab over dual_flow "
                "(where timed), N = 1024-8192", "no kernel rows"),
        _target("nobias_over_fastest_sdpa_fwd_bwd_max", nobias, "<=", 1.0,
                "kernel rows hstu_causal and dual_flow over the fastest SDPA backend, N = 1024-8192", "no kernel rows"),
        _target("dfgr_over_hstu_train_sparse_min", _sparse_ratios(train), ">=", 2.0,
                f"ratio rows of the train part, {path} steps: dfgr_sparse (the fake flow of the targets only) over "
                "hstu, targets = the last 10 % of events, N >= 1024, relative bias on and (where timed) off",
                uncovered or "no train rows of dfgr_sparse and hstu with target_share 0.1"),
        _target("dfgr_train_ratio_over_flop_ratio_min", _flop_shares(train), ">=",
                0.95, f"ratio rows of the train part, {path} steps, every DFGR model and target share, relative "
                "bias on (the models' default) and, where timed, off (mode 'no bias')", uncovered or "no train rows"),
        *([_informational("dfgr_over_hstu_train_sparse_min_eager", _sparse_ratios(eager), "the same, eager steps",
                          "no eager train rows of dfgr_sparse and hstu with target_share 0.1", worst=min),
           _informational("dfgr_train_ratio_over_flop_ratio_min_eager",
                          _flop_shares(eager), "the same, eager steps",
                          "no eager train rows", worst=min)] if path == "compiled" else []),
        _informational("bias_grad_share_of_train_kernels_max",
                       [r["bias_grad_ms"] / r["kernels_ms"] for r in profiled],
                       "profiled train rows (--train-profile): the relative bias's gradient kernel over all CUDA "
                       "kernels of the step (what the bias target costs training)", "no profiled train rows"),
        _informational("train_host_over_kernels_max", [r["host_over_kernels"] for r in profiled
                                                        if "host_over_kernels" in r],
                       "profiled train rows: the host's time to issue a step (host_ms, the GPU idle) over the "
                       "step's CUDA kernels; at 1 or more the host, not the GPU, paces the step and step_ms times it",
                       "no profiled train rows with host_ms"),
        _target("layout_share_of_step_max", in_step, "<=", 0.05, "layout rows (HSTU and DFGR): "
                "prepared_in_step_share, the trainer's step (its layout built by the loader on the host) less the "
                "step with the layout reused, over the step", untimed),
        _informational("layout_built_in_step_share_max", built_in_step, "layout rows (HSTU and DFGR): "
                       "in_step_share, the step that builds its own layout less the step with it reused, over the "
                       "step (a loader without the model's plan)", built_untimed),
        _informational("layout_prepare_share_of_step_max", worker, "layout rows (HSTU and DFGR): the plan's host "
                       "time per batch over the trainer's step; at most 1, one loader worker keeps up",
                       worker_untimed),
        _informational("layout_standalone_share_of_step_max", [r["layout_ms"] / r["step_ms"] for r in layout],
                       "layout rows (HSTU and DFGR): the standalone, synchronised build over the step (earlier "
                       "runs' share_of_step)", "no layout rows"),
    ]


def tiles_config(tiles: dict):
    """The kernels' :class:`~genrec.ops.triton.hstu.KernelConfig` for a tiles file of
    benchmarks/tune_hstu_kernel.py: its ``fwd``, ``bwd`` and ``dq`` tiles replace the defaults of the
    family it tuned (``head_dim`` 128, or no ``head_dim``: the ``*_large`` fields; below 128 the
    small ones); ``dq`` None: dQ by atomics in the dK/dV kernel."""
    from genrec.ops.triton.hstu import DEFAULT_CONFIG

    head_dim = tiles.get("head_dim", 128)
    family = "_large" if head_dim >= 128 else ""
    return dataclasses.replace(DEFAULT_CONFIG.with_dq_separate(head_dim, tiles["dq"] is not None), **{
        f"fwd{family}": tuple(tiles["fwd"]), f"bwd{family}": tuple(tiles["bwd"]),
        f"dq{family}": tuple(tiles["dq"] or getattr(DEFAULT_CONFIG, f"dq{family}"))})


def merge(rows: list[dict], meta: dict, earlier: dict, skip: frozenset[str] = frozenset()) -> list[dict]:
    """This run's rows (run 0) and the ``earlier`` result file's measured rows of shapes not measured
    now (:func:`_shape_key`), each renumbered to its run, which ``meta["runs"]`` gains. Kernel rows
    named in ``skip`` are not kept: timings of kernel code this run replaced."""
    measured = {_shape_key(r) for r in rows}
    kept = [r for r in earlier["rows"] if r["bench"] in ("kernel", "train", "layout", "infer")
            and _shape_key(r) not in measured and r.get("kernel") not in skip]
    used = sorted({r["run"] for r in kept})
    meta["runs"] += [earlier["meta"]["runs"][i] for i in used]
    return rows + [{**r, "run": 1 + used.index(r["run"])} for r in kept]


def combine(run: dict, args, skip: frozenset[str], argv: list[str] | None) -> int:
    """The result file of ``run`` (one device call's file, unmerged) merged with ``--merge``'s: what
    a call cut short by its time limit leaves to be joined on any machine."""
    if len(run["meta"]["runs"]) != 1:
        raise SystemExit(f"--rows needs a single-run file; {args.rows} merges {len(run['meta']['runs'])} runs")
    if not args.merge:
        raise SystemExit("--rows goes with --merge")
    meta = {**run["meta"], "runs": list(run["meta"]["runs"])}
    rows = merge(list(run["rows"]), meta, json.loads(Path(args.merge).read_text()), skip)
    meta["command"] = " ".join(["python", "benchmarks/speed.py", *(argv or sys.argv[1:])])  # the device calls: runs
    write(rows, meta, Path(args.out) / f"speed_{meta['device'].replace(' ', '_')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="kernel,train,infer")
    parser.add_argument("--ns", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--train-ns", help="history lengths of the training part (default: --ns)")
    parser.add_argument("--train-models", default="hstu,genrank,dfgr,dfgr_sparse",
                        help="of hstu, genrank, dfgr, dfgr_sparse (DFGR with the fake flow of the target events "
                        "only) and sfgr")
    parser.add_argument("--train-target-shares", default="1,0.1",
                        help="per share, the last ceil(share * N) events of each sequence are targets")
    parser.add_argument("--kernel-ns", default="1024,2048,4096,8192")
    parser.add_argument("--kernel-tokens", type=int, default=131_072)
    parser.add_argument("--kernels", help="only these kernel rows (comma-separated names; default: all)")
    parser.add_argument("--ms", default="64,512,2048")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--train-events", type=int, default=32_768)
    parser.add_argument("--train-steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--train-windows", type=int, default=5, help="timed windows per train or layout row: "
                        "step_ms is their median (step_ms_windows each)")
    parser.add_argument("--train-compile", action="store_true", help="train rows of torch.compile'd models "
                        "(genrec train's train.compile; mode 'compiled', no layout rows)")
    parser.add_argument("--train-cuda-graphs", action="store_true", help="with --train-compile: the compiled steps "
                        "replayed as CUDA graphs (genrec train's train.cuda_graphs; mode 'compiled, CUDA graphs')")
    parser.add_argument("--train-no-bias", action="store_true", help="train (and layout) rows of the models "
                        "without the relative bias (model_args.relative_bias false; mode 'no bias')")
    parser.add_argument("--train-host-profile", action="store_true", help="profile the host's side of 3 more "
                        "steps per train row, each issued on an idle GPU: its CUDA launch calls (host_launch_ms, "
                        "host_launches) and costliest events (host_top_ms), where a host-bound step's time goes")
    parser.add_argument("--train-profile", action="store_true", help="profile 3 more steps per train row: its "
                        "CUDA kernels' time, the fused attention's by kernel, the matrix products' and the optimizer's "
                        "(kernels_ms, attention_ms, bias_grad_ms, matmul_ms, optimizer_ms) and the costliest kernels "
                        "(kernels_top_ms)")
    parser.add_argument("--kernel-profile", action="store_true", help="profile 5 more forward + backward calls "
                        "of each genrec kernel row: its four kernels' times (attention_fwd/dkdv/dq_ms, bias_grad_ms)")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=512)
    parser.add_argument("--tiles", help="JSON of HSTU kernel tiles from benchmarks/tune_hstu_kernel.py")
    parser.add_argument("--anchor-path", help="a checkout of meta-recsys/generative-recommenders: time the HSTU "
                        "authors' Triton attention beside ours (imported from there, never copied)")
    parser.add_argument("--anchor-commit", default="an unrecorded commit", help="that checkout's commit, for meta")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tables", metavar="JSON", help="only rewrite the ratios and tables of a result file")
    parser.add_argument("--rows", metavar="JSON", help="measure nothing: this run's rows are that single-run result "
                        "file's (a device call that wrote it), to --merge with another (no GPU needed)")
    parser.add_argument("--merge-skip", default="", help="kernel rows (comma-separated names) not kept from --merge: "
                        "timed with kernel code the new rows replace")
    parser.add_argument("--merge", metavar="JSON", help="keep that result file's rows of shapes not measured now, "
                        "each naming its run in meta.runs (one device call is limited in time: run the parts in "
                        "turn, the kernel part last, as the tables quote this run's matmul peak)")
    args = parser.parse_args(argv)
    if args.train_cuda_graphs and not args.train_compile:
        parser.error("--train-cuda-graphs replays the compiled steps: add --train-compile")
    unknown = sorted(set(args.train_models.split(",")) - set(TRAIN_FLOPS))
    if unknown:
        parser.error(f"--train-models: no training FLOP count for {', '.join(unknown)} "
                     f"(known: {', '.join(TRAIN_FLOPS)})")
    if args.tables:
        data = json.loads(Path(args.tables).read_text())
        write(data["rows"], data["meta"], Path(args.tables).with_suffix(""))
        return 0
    skip = frozenset(filter(None, args.merge_skip.split(",")))
    if args.rows:
        return combine(json.loads(Path(args.rows).read_text()), args, skip, argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/speed.py measures GPU kernels and needs a CUDA device")
    from genrec.ops.triton.backend import triton_backend
    from genrec.ops.triton.hstu import DEFAULT_CONFIG

    config = tiles_config(json.loads(Path(args.tiles).read_text())) if args.tiles else DEFAULT_CONFIG
    args.backend, args.backend_config = triton_backend(config), config
    parts = args.parts.split(",")
    ns = [int(x) for x in args.ns.split(",")]
    peak = matmul_peak_tflops()  # measured first, in the same run as everything it is compared with
    print(f"bf16 matmul peak: {peak:.0f} TFLOP/s", flush=True)
    rows: list[dict] = [{"bench": "matmul", "n": 8192, "tflops": peak}]
    if "kernel" in parts:
        rows += kernel_rows([int(x) for x in args.kernel_ns.split(",")], args.kernel_tokens, 4, 128, peak, args.backend,
                            args.anchor_path, set(args.kernels.split(",")) if args.kernels else None,
                            args.kernel_profile)
    if "train" in parts:
        rows += train_rows([int(x) for x in args.train_ns.split(",")] if args.train_ns else ns, args, peak)
    if "infer" in parts:
        rows += infer_rows(ns, [int(x) for x in args.ms.split(",")], args)
    meta = report.meta(["python", "benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])])
    meta["runs"] = [{k: meta[k] for k in ("command", "git_commit", "date")}]  # rows name theirs by index
    rows = [{**r, "run": 0} for r in rows]
    if args.merge:
        rows = merge(rows, meta, json.loads(Path(args.merge).read_text()), skip)
    meta["hstu_tiles"] = {"fwd": {"small": config.fwd, "large": config.fwd_large, "fp32_large": config.fwd_fp32_large},
                          "bwd": {"small": config.bwd, "large": config.bwd_large, "fp32_large": config.bwd_fp32_large},
                          "dq": {"small": config.dq, "large": config.dq_large, "fp32_large": config.dq_fp32_large},
                          "dq_separate": {"small": config.dq_separate_small, "large": config.dq_separate}}
    if args.anchor_path:
        meta["anchor"] = f"triton_hstu_mha of meta-recsys/generative-recommenders at {args.anchor_commit}"
    meta["shapes"] = {"kernel_heads": 4, "kernel_dh": 128, "kernel_tokens": args.kernel_tokens, "d": args.d,
                      "heads": args.heads, "layers": args.layers, "train_events": args.train_events}
    write(rows, meta, Path(args.out) / f"speed_{torch.cuda.get_device_name().replace(' ', '_')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
