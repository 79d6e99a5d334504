"""Load test of ``genrec serve``: requests/s, candidates/s and latency percentiles over loopback HTTP,
beside the in-process scoring time of the same work, for HSTU and DFGR.

The server is this script started again as a subprocess (``--server``) over a synthetic catalogue and
synthetic users with ``N``-event histories (random weights from a fixed seed; speed does not depend on
training). Each row is one (model, mode, N, M, concurrency): ``concurrency`` clients send ``/rank``
requests for ``M`` candidates of random users until ``--requests`` were sent or ``--seconds`` passed.
Modes: ``cold`` (no KV cache kept: every request encodes the history and scores its candidates, HSTU's
M-FALCON serving), ``cached`` (the users' caches are warm: candidates only, DFGR's serving).

In-process rows time the engine's handler on the same jobs without HTTP, in batches of the size the
service forms at that concurrency (``min(concurrency, max_batch)``), so ``service_over_inprocess`` is
the share of throughput the HTTP layer and batching keep. After each load phase a few responses are
checked against the model's evaluation pass (``served_vs_offline_max_abs_diff``). ``events`` rows
time ``/events`` work in-process: extending a cache by k events vs re-encoding the whole history.

    python benchmarks/serving.py                      # CPU, small shapes -> results/serving_cpu.{json,md}
    python benchmarks/serving.py --device cuda [--cuda-graphs]  # GPU: N = 1024, 4096; M = 64, 512
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h11
import httpx
import numpy as np
import torch

import report
from genrec.data.batching import collate
from genrec.data.info import DatasetInfo
from genrec.models import build_model
from genrec.serve.engine import Catalogue, Engine, RankJob
from genrec.serve.graphs import BucketedGraphs
from genrec.serve.store import History, UserStore

ROOT = Path(__file__).resolve().parent.parent
NUM_ITEMS = 2000
ACTIONS = [1.0, 2.0, 3.0, 4.0, 5.0]


# ------------------------------------------------------------------------------------- the model side
def synthetic_history(user: str, n: int) -> History:
    """``n`` events of ``user`` (requests of 1-3 events), the same in every process."""
    rng = np.random.default_rng(int(user.removeprefix("u")))
    times = 1_600_000_000 + np.cumsum(rng.integers(0, 3, n) * rng.integers(1, 5000, n))
    return History.build(rng.integers(1, NUM_ITEMS + 1, n), rng.integers(0, 5, n), rng.integers(0, 2, n), times, 0)


def synthetic_engine(name: str, n: int, args, cache_bytes: int) -> Engine:
    torch.manual_seed(0)
    info = DatasetInfo(NUM_ITEMS, len(ACTIONS), args.users, np.zeros((NUM_ITEMS + 1, 1), np.float32), ACTIONS)
    model_args = {"d_model": args.d, "num_layers": args.layers, "num_heads": args.heads, "dropout": 0.0,
                  "attention_backend": args.backend}
    device = torch.device(args.device)
    model = build_model(name, model_args, info, n).to(device).eval()
    catalogue = Catalogue([str(i) for i in range(1, NUM_ITEMS + 1)], ACTIONS, 3.0, 0)
    store = UserStore(cache_bytes, lambda user: synthetic_history(user, n) if user.startswith("u") else None)
    graphs = BucketedGraphs(model, args.max_batch, n, args.max_candidates) if args.cuda_graphs else None
    return Engine(model, catalogue, store, device, max_history=n, model_name=name, graphs=graphs)


def candidates_for(k: int, m: int) -> list[str]:
    rng = np.random.default_rng(10_000 + k)
    return [str(i) for i in rng.integers(1, NUM_ITEMS + 1, m)]


def serve(args) -> None:
    """The ``--server`` subprocess: one model behind the real app, until SIGTERM."""
    import uvicorn

    from genrec.serve.app import Limits, build_app

    torch.set_num_threads(args.server_threads)
    cache_bytes = 0 if args.mode == "cold" else 1 << 40
    engine = synthetic_engine(args.model, args.n, args, cache_bytes)
    app = build_app(engine, Limits(max_candidates=args.max_candidates, max_history=args.n), None, args.max_batch,
                    args.max_wait_us)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# ------------------------------------------------------------------------------------------ the client
def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Connection:
    """One keep-alive HTTP/1.1 connection of the load generator: h11 (the HTTP/1.1 state machine
    under httpx and uvicorn) over asyncio streams. Not httpx's AsyncClient: its connection pool scans
    every connection on each request, and at concurrency 64 the client spent ~5-10 ms of CPU per
    request (shared pool or not), so the load it could send, not the server, capped the rows."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def post(self, path: str, payload: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        conn = h11.Connection(h11.CLIENT)
        body = json.dumps(payload).encode()
        headers = [("Host", f"127.0.0.1:{self.port}"), ("Content-Type", "application/json"),
                   ("Content-Length", str(len(body)))]
        self.writer.write(conn.send(h11.Request(method="POST", target=path, headers=headers)) +
                          conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        status, chunks = 0, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self.reader.read(1 << 16))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection")

    async def close(self) -> None:
        """Closes the connection; one the server reset is closed too (``wait_closed`` re-raises the
        reset, which would end the whole load run, not count as one error)."""
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = None


async def load(port: int, body, concurrency: int, total: int, seconds: float) -> dict:
    """``concurrency`` clients, one connection each, send ``body(k)`` until ``total`` requests or
    ``seconds`` elapse."""
    latencies, errors, sent = [], [], 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal sent
        conn = Connection(port)
        try:
            while sent < total and time.perf_counter() < deadline:
                k = sent
                sent += 1
                start = time.perf_counter()
                try:
                    status, reply = await asyncio.wait_for(conn.post("/rank", body(k)), 60)
                except (OSError, TimeoutError, h11.ProtocolError) as err:
                    status, reply = 0, repr(err).encode()
                    await conn.close()
                    conn = Connection(port)
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors.append(f"{status}: {reply[:200].decode(errors='replace')}")
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    return {"requests": len(latencies), "seconds": wall, "requests_per_s": len(latencies) / wall,
            "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99),
            "errors": len(errors), "error_samples": errors[:3]}


class Server:
    def __init__(self, args, model: str, mode: str, n: int, m: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, __file__, "--server", "--model", model, "--mode", mode, "--n", str(n), "--m", str(m),
               "--port", str(self.port), *args.passthrough]
        paths = [str(ROOT / "src"), str(ROOT / "benchmarks"), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(paths)}
        self.proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server {model}/{mode} did not start")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def offline_diff(port: int, engine: Engine, users: list[str], m: int, checked: int = 4) -> float:
    """Largest |served - offline| over ``users`` and their first ``checked`` candidates; offline = the
    model's evaluation pass (``rank_logits``) with the candidate as the target event of a new request
    at the request time, in this process."""
    worst = 0.0
    for k, user in enumerate(users):
        cands = candidates_for(k, m)
        served = httpx.post(f"http://127.0.0.1:{port}/rank", json={"user": user, "candidates": cands}).json()
        user_index, items, actions, labels, times, requests, _ = synthetic_history(user, engine.max_history).sample()
        for j, item in enumerate(cands[:checked]):
            target = (user_index, np.append(items, int(item)), np.append(actions, 0), np.append(labels, 0.0),
                      np.append(times, times[-1]), np.append(requests, requests[-1] + 1), len(items))
            with torch.no_grad():
                want = torch.sigmoid(engine.model.rank_logits(collate([target]).to(engine.device)).float())
            worst = max(worst, abs(served["scores"]["rating>3"][j] - float(want[0])))
    return worst


# ------------------------------------------------------------------------------------------ in process
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def inprocess(engine: Engine, mode: str, m: int, batch: int, users: list[str], seconds: float, total: int) -> dict:
    """The engine's /rank handler on batches of ``batch`` jobs (validated as the service would)."""
    def jobs(k0: int) -> list[RankJob]:
        return [RankJob(users[(k0 + j) % len(users)], engine.catalogue.items(candidates_for(k0 + j, m), "c"), None,
                        None) for j in range(batch)]

    # warm-up: every user once, as the service rows' warm-up does, so that cached rows time cache hits only
    for k0 in range(0, max(len(users), batch), batch):
        engine.rank(jobs(k0))
    per_call, done, k = [], 0, 0
    deadline = time.perf_counter() + seconds
    while done < total and time.perf_counter() < deadline:
        work = jobs(k)
        k += batch
        sync(engine.device)
        start = time.perf_counter()
        results = engine.rank(work)
        sync(engine.device)
        per_call.append(time.perf_counter() - start)
        done += batch
        assert all(isinstance(r, dict) for r in results), results
    ms = [x * 1000 for x in per_call]
    return {"requests": done, "seconds": sum(per_call), "requests_per_s": done / sum(per_call),
            "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99)}


def events_rows(engine: Engine, name: str, n: int, ks: list[int], repeats: int) -> list[dict]:
    """Extending a user's cache by k events vs re-encoding the whole history of n events."""
    rows = []
    full = synthetic_history("u0", n)
    for k in ks:
        prefix = History(full.items[:n - k], full.actions[:n - k], full.labels[:n - k], full.timestamps[:n - k],
                         full.request_ids[:n - k])
        cache = engine.scorer.encode([prefix])[0]
        extend, encode = [], []
        for _ in range(repeats):
            sync(engine.device)
            start = time.perf_counter()
            engine.scorer.extend(cache, full, k)
            sync(engine.device)
            extend.append(time.perf_counter() - start)
            start = time.perf_counter()
            engine.scorer.encode([full])
            sync(engine.device)
            encode.append(time.perf_counter() - start)
        rows.append({"kind": "events", "model": name, "n": n, "k": k,
                     "extend_ms": 1000 * statistics.median(extend), "reencode_ms": 1000 * statistics.median(encode),
                     "reencode_over_extend": statistics.median(encode) / statistics.median(extend)})
    return rows


# ------------------------------------------------------------------------------------------ targets
def targets(rows: list[dict], args) -> list[dict]:
    service = [r for r in rows if r["kind"] == "service"]
    local = {(r["model"], r["mode"], r["n"], r["m"], r["concurrency"]): r for r in rows if r["kind"] == "inprocess"}
    out = [{"name": "errors_total", "value": sum(r["errors"] for r in service), "op": "==", "target": 0,
            "rows": "every service row"}]
    out.append({"name": "served_vs_offline_max_abs_diff", "value": max(r["served_vs_offline_max_abs_diff"]
                                                                       for r in service),
                "op": "<=", "target": 1e-5, "rows": "every service row (4 candidates of 8 users after each load phase, "
                        "against rank_logits)"})
    big = [r for r in service if r["n"] >= 1024 and r["m"] == 64] or service
    shape_note = "N >= 1024, M = 64" if big is not service else (
        f"no row at N >= 1024, M = 64 (the target's shapes): computed at N, M = "
        f"{sorted({(r['n'], r['m']) for r in service})}")
    ratios = []
    for r in big:
        if r["model"] == "dfgr" and r["mode"] == "cached":
            hstu = [h for h in big if h["model"] == "hstu" and h["mode"] == "cold" and
                    (h["n"], h["m"], h["concurrency"]) == (r["n"], r["m"], r["concurrency"])]
            ratios += [r["requests_per_s"] / h["requests_per_s"] for h in hstu]
    out.append({"name": "dfgr_cached_over_hstu_requests_per_s_min", "value": min(ratios) if ratios else None,
                "op": ">=", "target": 4.0,
                "rows": f"service rows, DFGR cached / HSTU cold at equal N, M, concurrency; {shape_note}"})
    keep = [r["requests_per_s"] / local[key]["requests_per_s"] for r in service
            if r["concurrency"] == 64 and (key := (r["model"], r["mode"], r["n"], r["m"], 64)) in local]
    out.append({"name": "service_over_inprocess_throughput_min", "value": min(keep) if keep else None, "op": ">=",
                "target": 0.8, "rows": "service vs in-process rows at concurrency 64 (in-process batches of "
                f"min(64, max_batch = {args.max_batch}))"})
    overhead = [r["p50_ms"] - local[key]["p50_ms"] for r in service
                if r["concurrency"] == 1 and (key := (r["model"], r["mode"], r["n"], r["m"], 1)) in local]
    out.append({"name": "http_overhead_p50_ms_max", "value": max(overhead) if overhead else None, "op": "<=",
                "target": 1.0, "rows": "service p50 - in-process p50 at concurrency 1, every model, mode, shape"})
    ops = {"==": lambda a, b: a == b, "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}
    for t in out:
        t["met"] = t["value"] is not None and bool(ops[t["op"]](t["value"], t["target"]))
    return out


def markdown(rows: list[dict], target_rows: list[dict]) -> str:
    service = [r for r in rows if r["kind"] == "service"]
    local = {(r["model"], r["mode"], r["n"], r["m"], r["concurrency"]): r for r in rows if r["kind"] == "inprocess"}
    for r in service:
        ip = local.get((r["model"], r["mode"], r["n"], r["m"], r["concurrency"]))
        r["inprocess_requests_per_s"] = ip["requests_per_s"] if ip else float("nan")
        r["service_over_inprocess"] = r["requests_per_s"] / ip["requests_per_s"] if ip else float("nan")
    cols = ["model", "mode", "n", "m", "concurrency", "requests", "requests_per_s", "candidates_per_s", "p50_ms",
            "p95_ms", "p99_ms", "errors", "inprocess_requests_per_s", "service_over_inprocess"]
    text = report.markdown_table(service, cols)
    text += "\n" + report.markdown_table([r for r in rows if r["kind"] == "events"],
                                         ["model", "n", "k", "extend_ms", "reencode_ms", "reencode_over_extend"])
    text += "\n| target | value | op | target | met | rows |\n|---|---|---|---|---|---|\n"
    for t in target_rows:
        value = "n/a" if t["value"] is None else f"{t['value']:.4g}"
        text += f"| {t['name']} | {value} | {t['op']} | {t['target']} | {t['met']} | {t['rows']} |\n"
    for r in service:
        del r["inprocess_requests_per_s"], r["service_over_inprocess"]
    return text


# ------------------------------------------------------------------------------------------ main
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", default=None, help="NxM,... (default CPU 128x32; CUDA 1024x64,1024x512,"
                   "4096x64,4096x512)")
    p.add_argument("--models", default="hstu,dfgr")
    p.add_argument("--modes", default="cold,cached")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--requests", type=int, default=10_000, help="most requests per row")
    p.add_argument("--seconds", type=float, default=8.0, help="most seconds per row")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--backend", default=None, help="attention backend (default: triton on CUDA, else reference)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-us", type=int, default=500)
    p.add_argument("--cuda-graphs", action="store_true", help="cold scoring replayed as CUDA graphs (CUDA only)")
    p.add_argument("--server-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--note", default=None, help="appended to meta.device (e.g. shared machine)")
    p.add_argument("--out", default=None)
    # server subprocess
    p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--m", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.backend = args.backend or ("triton" if args.device == "cuda" else "reference")
    if args.cuda_graphs and args.device != "cuda":
        p.error("--cuda-graphs needs --device cuda")
    args.max_candidates = 1024
    args.passthrough = [f"--device={args.device}", f"--users={args.users}", f"--d={args.d}",
                        f"--layers={args.layers}", f"--heads={args.heads}", f"--backend={args.backend}",
                        f"--max-batch={args.max_batch}", f"--max-wait-us={args.max_wait_us}",
                        f"--server-threads={args.server_threads}"] + (["--cuda-graphs"] if args.cuda_graphs else [])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.server:
        serve(args)
        return 0
    shapes = args.shapes or ("1024x64,1024x512,4096x64,4096x512" if args.device == "cuda" else "128x32")
    shapes = [tuple(int(x) for x in s.split("x")) for s in shapes.split(",")]
    torch.set_num_threads(args.server_threads)
    users = [f"u{i}" for i in range(args.users)]
    device = "cpu" if args.device == "cpu" else torch.cuda.get_device_name()
    meta = report.meta(device=device + (f" ({args.note})" if args.note else ""))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"serving_{args.device}"

    def write(rows: list[dict], partial: bool) -> list[dict]:
        """The file so far: rewritten after every server, so a run cut short keeps its rows
        (marked ``"partial": true``, its targets computed from those rows only)."""
        target_rows = targets(rows, args)
        report.write(out, rows, markdown(rows, target_rows), meta, targets=target_rows,
                     extra={"partial": True} if partial else None)
        return target_rows

    rows = []
    for n, m in shapes:
        for name in args.models.split(","):
            for mode in args.modes.split(","):
                engine = synthetic_engine(name, n, args, 0 if mode == "cold" else 1 << 40)
                server = Server(args, name, mode, n, m)
                try:
                    for c in (int(x) for x in args.concurrency.split(",")):
                        def body(k: int, m=m) -> dict:
                            return {"user": users[k % len(users)], "candidates": candidates_for(k, m)}

                        if mode == "cached":  # warm every user's cache first
                            asyncio.run(load(server.port, body, min(c, 8), len(users), 60))
                        # untimed: the batch shapes this concurrency forms compile (Triton, CUDA graphs) first
                        asyncio.run(load(server.port, body, c, 4 * c, 60))
                        got = asyncio.run(load(server.port, body, c, args.requests, args.seconds))
                        row = {"kind": "service", "model": name, "mode": mode, "n": n, "m": m, "concurrency": c,
                               "d": args.d, "layers": args.layers, "heads": args.heads, "backend": args.backend,
                               "cuda_graphs": args.cuda_graphs,
                               "max_batch": args.max_batch, "max_wait_us": args.max_wait_us, **got,
                               "candidates_per_s": got["requests_per_s"] * m,
                               "served_vs_offline_max_abs_diff": offline_diff(server.port, engine, users[:8], m)}
                        rows.append(row)
                        local = inprocess(engine, mode, m, min(c, args.max_batch), users, args.seconds, args.requests)
                        rows.append({"kind": "inprocess", "model": name, "mode": mode, "n": n, "m": m,
                                     "concurrency": c, "batch": min(c, args.max_batch), **local,
                                     "candidates_per_s": local["requests_per_s"] * m})
                        print(json.dumps({k: row[k] for k in ("model", "mode", "n", "m", "concurrency",
                                                              "requests_per_s", "p50_ms", "errors")}
                                         | {"inprocess_requests_per_s": local["requests_per_s"]}), flush=True)
                finally:
                    server.stop()
                if mode == "cached":
                    rows += events_rows(engine, name, n, [1, max(1, n // 8)], repeats=5)
                write(rows, partial=True)
    target_rows = write(rows, partial=False)
    for t in target_rows:
        print(f"{t['name']}: {t['value']} {t['op']} {t['target']} -> {'met' if t['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
