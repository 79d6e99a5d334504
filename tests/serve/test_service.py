"""``genrec serve`` as a client sees it: a real server process on a free loopback port, real HTTP.

Scores served over HTTP equal the offline scores of the same history and candidates (fp32, 1e-5):
the in-process model's cold scoring and its training/evaluation pass; after ``/events`` appends
(incremental KV cache == full re-encode), after the user's cache was evicted, and after a restart
that reloads the Parquet snapshot. Bad requests get a 4xx JSON error naming the field.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from genrec.cli import load_run, main
from genrec.data.batching import collate
from tests.conftest import REPO, write_ml1m

MAX_LEN = 24


def write_tiny_ml1m(root: Path, users: int = 16, items: int = 60, seed: int = 0) -> Path:
    """MovieLens-1M files with ``users`` random users of 25-40 events (some sharing a timestamp)."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, users + 1):
        t = 978_300_000 + int(rng.integers(0, 1000))
        for _ in range(int(rng.integers(25, 40))):
            t += int(rng.choice([0, 0, 30, 600, 86_400]))
            lines.append(f"{user}::{int(rng.integers(1, items + 1))}::{int(rng.integers(1, 6))}::{t}")
    movies = "".join(f"{i}::Movie {i} (2000)::Drama\n" for i in range(1, items + 1))
    write_ml1m(root / "ml-1m" / "ml-1m", ratings="\n".join(lines) + "\n", movies=movies, users=None)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny trained HSTU, DFGR and UniGRF (retrieves and ranks) run (2 steps each: weights that are
    not the initial ones)."""
    root = tmp_path_factory.mktemp("serve")
    data = write_tiny_ml1m(root / "data")
    out = {}
    for name in ("hstu", "dfgr", "unigrf"):
        out[name] = root / name
        assert main(["train", "--out-dir", str(out[name]), "--set", "data.dataset=ml-1m", f"data.data_dir={data}",
                     f"data.max_len={MAX_LEN}", f"model={name}", "model_args.d_model=16", "model_args.dropout=0",
                     "train.epochs=1", "train.max_steps=2", "train.progress=false", "train.tensorboard=false"]) == 0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``genrec serve`` in a subprocess; ``stop()`` sends SIGTERM (a graceful shutdown) and waits."""

    def __init__(self, run: Path, *args: str, token: str | None = None):
        self.port = free_port()
        env = os.environ | {"PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "genrec.cli", "serve", "--checkpoint", str(run), "--port", str(self.port), *args]
        if token:
            cmd += ["--token", token]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=headers, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.stop()}")
            time.sleep(0.2)

    def post(self, path: str, body) -> httpx.Response:
        return self.client.post(path, json=body)

    def stop(self) -> str:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


def metric(server: Server, name: str) -> float:
    for line in server.client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


class Offline:
    """The same run loaded in this process: the offline scores of a history and candidates."""

    def __init__(self, run: Path):
        self.trainer, _ = load_run(str(run), [])
        self.model = self.trainer.model.eval()
        self.device = next(self.model.parameters()).device  # the run's train.device, as the service's
        seq = self.trainer.seq
        self.item = {raw: i for i, raw in enumerate(seq.item_raw, start=1)}
        self.action = {v: i for i, v in enumerate(seq.rating_values)}

    def history(self, events: list[dict]) -> tuple:
        times = np.array([e["time"] for e in events])
        new_request = np.diff(times, prepend=times[0] - 1) > 0
        items = np.array([self.item[e["item"]] for e in events])
        actions = np.array([self.action[e["action"]] for e in events])
        labels = np.array([float(e["action"] > 3.0) for e in events], np.float32)
        return 0, items, actions, labels, times, np.cumsum(new_request) - 1

    @torch.no_grad()
    def cold(self, events: list[dict], candidates: list[str], when: int) -> np.ndarray:
        """P(label) by the model's cold serving call (whole history re-encoded)."""
        batch = collate([(*self.history(events), len(events))]).to(self.device)
        cands = torch.tensor([[self.item[c] for c in candidates]], device=self.device)
        when = torch.tensor([when], device=self.device)
        return torch.sigmoid(self.model.score(batch, cands, when))[0, :, 0].cpu().numpy()

    @torch.no_grad()
    def evaluation_pass(self, events: list[dict], candidate: str, when: int) -> float:
        """P(label) of ``candidate`` as the target event of a new request after ``events``, read from the
        training/evaluation pass (``rank_logits``), with an action that the target must not see."""
        user, items, actions, labels, times, requests = self.history(events)
        sample = (user, np.append(items, self.item[candidate]), np.append(actions, 4), np.append(labels, 1.0),
                  np.append(times, when), np.append(requests, requests[-1] + 1), len(events))
        return float(torch.sigmoid(self.model.rank_logits(collate([sample]).to(self.device)))[0])


def ranked(server: Server, body: dict) -> np.ndarray:
    response = server.post("/rank", body)
    assert response.status_code == 200, response.text
    return np.array(response.json()["scores"]["rating>3"])


@pytest.mark.parametrize("name", ["hstu", "dfgr"])
def test_served_scores_equal_offline_scores_after_appends_eviction_and_restart(runs, name, tmp_path):
    offline = Offline(runs[name])
    state = tmp_path / "users.parquet"
    # room for about two users' caches: ranking the 16 dataset users must evict
    one_user = 2 * offline.model.cfg.num_layers * (2 if name == "hstu" else 1) * MAX_LEN * 16 * 4  # K+V, fp32
    args = ["--state-file", str(state), "--cache-bytes", str(2 * one_user), "--max-wait-us", "2000"]
    server = Server(runs[name], *args)
    try:
        cands = ["5", "17", "3", "42", "17"]
        history = server.client.get("/users/1/history").json()["events"]
        assert len(history) == MAX_LEN  # the dataset user's latest max_len events
        when = history[-1]["time"] + 60
        served = ranked(server, {"user": "1", "candidates": cands, "request_time": when})
        np.testing.assert_allclose(served, offline.cold(history, cands, when), rtol=0, atol=1e-5)
        assert abs(served[1] - offline.evaluation_pass(history, cands[1], when)) <= 1e-5
        inline = ranked(server, {"history": history, "candidates": cands, "request_time": when})
        np.testing.assert_allclose(inline, served, rtol=0, atol=1e-5)

        # a new user grows by appends: the KV cache is extended, never re-encoded
        events = [{"item": str(i), "action": float(1 + i % 5), "time": 1_000_000_000 + 40 * (i // 2)}
                  for i in range(1, 13)]
        for sent, chunk in ((5, events[:5]), (6, events[5:6]), (12, events[6:12])):
            reply = server.post("/events", {"user": "new", "events": chunk}).json()
            assert reply["mode"] in ("new", "incremental"), reply
            if reply["mode"] == "new":
                ranked(server, {"user": "new", "candidates": cands})  # encode now, so later appends extend it
            held = server.client.get("/users/new/history").json()
            assert held["cached"] and held["events"] == events[:sent]
            when = held["events"][-1]["time"] + 5
            np.testing.assert_allclose(ranked(server, {"user": "new", "candidates": cands, "request_time": when}),
                                       offline.cold(held["events"], cands, when), rtol=0, atol=1e-5)
        assert metric(server, "genrec_history_reencodes_total") == 0  # nothing re-encoded on append

        # every dataset user once: caches beyond the budget are evicted, user 1's among them
        for user in range(2, 17):
            ranked(server, {"user": str(user), "candidates": cands})
        assert metric(server, "genrec_cache_evictions_total") > 0
        assert metric(server, "genrec_cache_bytes") <= 2 * one_user
        misses = metric(server, "genrec_cache_misses_total")
        after_eviction = ranked(server, {"user": "1", "candidates": cands, "request_time": history[-1]["time"] + 60})
        assert metric(server, "genrec_cache_misses_total") == misses + 1  # re-encoded from the host history
        np.testing.assert_allclose(after_eviction, served, rtol=0, atol=1e-5)
        before_restart = ranked(server, {"user": "new", "candidates": cands, "request_time": when})
    finally:
        server.stop()
    assert state.is_file()
    server = Server(runs[name], *args)
    try:
        assert server.client.get("/users/new/history").json()["events"] == held["events"]
        np.testing.assert_allclose(ranked(server, {"user": "new", "candidates": cands, "request_time": when}),
                                   before_restart, rtol=0, atol=1e-5)
    finally:
        server.stop()


def together(server: Server, path: str, good: list[dict], invalid: dict, unknown_user: dict):
    """``good`` bodies with an ``invalid`` one (4th) and one of an ``unknown_user`` (7th) posted to
    ``path`` at once: the bodies, their replies (checked: only the two bad ones fail, 422 and 404) and
    how many batches the service scored them in."""
    bodies = good[:3] + [invalid] + good[3:5] + [unknown_user] + good[5:]
    kind = path.strip("/")
    batches = metric(server, f'genrec_batch_size_count{{kind="{kind}"}}')
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda b: server.post(path, b), bodies))
    assert [r.status_code for r in replies] == [200] * 3 + [422] + [200] * 2 + [404] + [200] * (len(good) - 5)
    return bodies, replies, metric(server, f'genrec_batch_size_count{{kind="{kind}"}}') - batches


def test_concurrent_requests_are_batched_and_a_bad_one_fails_alone(runs):
    server = Server(runs["dfgr"], "--max-wait-us", "50000", "--max-batch", "16")
    try:
        alone = {u: ranked(server, {"user": str(u), "candidates": ["1", "2", str(u)]}) for u in range(1, 9)}
        bodies, replies, batches = together(server, "/rank", [{"user": str(u), "candidates": ["1", "2", str(u)]}
                                                              for u in range(1, 9)],
                                            {"user": "1", "candidates": ["1", "no-such-item"]},
                                            {"user": "nobody", "candidates": ["1"]})
        assert replies[3].json()["field"] == "candidates[1]" and replies[6].json()["field"] == "user"
        for body, reply in zip(bodies, replies, strict=True):
            if reply.status_code == 200:
                np.testing.assert_allclose(reply.json()["scores"]["rating>3"], alone[int(body["user"])], atol=1e-5)
        assert batches < 9  # 9 scoring jobs (the unknown item never reaches a batch) in fewer calls than jobs
        timed = metric(server, 'genrec_batch_seconds_count{kind="rank"}')  # every batch's handler time
        assert timed == metric(server, 'genrec_batch_size_count{kind="rank"}')
        assert metric(server, 'genrec_batch_seconds_sum{kind="rank"}') > 0
    finally:
        server.stop()


def test_concurrent_recommend_requests_are_batched_and_a_bad_one_fails_alone(runs):
    server = Server(runs["unigrf"], "--max-wait-us", "50000", "--max-batch", "16")
    try:
        alone = {}
        for u in range(1, 9):
            reply = server.post("/recommend", {"user": str(u), "k": 5})
            assert reply.status_code == 200, reply.text
            alone[u] = reply.json()
        bodies, replies, batches = together(server, "/recommend", [{"user": str(u), "k": 5} for u in range(1, 9)],
                                            {"user": "1", "k": 0}, {"user": "nobody", "k": 5})
        assert replies[3].json()["field"] == "k" and replies[6].json()["field"] == "user"
        for body, reply in zip(bodies, replies, strict=True):
            if reply.status_code == 200:
                got, want = reply.json(), alone[int(body["user"])]
                assert got["user"] == body["user"] and got["items"] == want["items"] and len(got["items"]) == 5
                np.testing.assert_allclose(got["scores"], want["scores"], rtol=0, atol=1e-5)
                np.testing.assert_allclose(got["probabilities"]["rating>3"], want["probabilities"]["rating>3"],
                                           rtol=0, atol=1e-5)
        assert batches < 9  # 9 jobs (k = 0 never reaches a batch) in fewer calls than jobs
    finally:
        server.stop()


def test_bad_requests_get_a_4xx_json_error_naming_the_field(runs):
    server = Server(runs["hstu"], "--max-candidates", "8", "--max-body-bytes", "4096", token="s3cret")
    try:
        ev = {"item": "5", "action": 4.0, "time": 1_000}
        cases = [
            ({"user": "1", "candidates": []}, 422, "candidates"),
            ({"user": "1", "candidates": ["1"] * 9}, 422, "candidates"),
            ({"user": "1", "candidates": ["1", "nope"]}, 422, "candidates[1]"),
            ({"user": "1", "candidates": [1.5]}, 422, "candidates[0]"),
            ({"user": "1", "candidates": "1"}, 422, "candidates"),
            ({"user": "ghost", "candidates": ["1"]}, 404, "user"),
            ({"candidates": ["1"]}, 422, "user"),
            ({"user": "1", "candidates": ["1"], "request_time": 5}, 422, "request_time"),
            ({"user": "1", "candidates": ["1"], "request_time": "soon"}, 422, "request_time"),
            ({"user": "1", "candidates": ["1"], "history": [ev, ev | {"time": 999}]}, 422, "history[1].time"),
            ({"user": "1", "candidates": ["1"], "history": [ev | {"time": 2**31}]}, 422, "history[0].time"),
            ({"user": "1", "candidates": ["1"], "history": [ev | {"time": -1}]}, 422, "history[0].time"),
            ({"user": "1", "candidates": ["1"], "history": [ev | {"time": 2**70}]}, 422, "history[0].time"),
            ({"user": "1", "candidates": ["1"], "request_time": 2**31}, 422, "request_time"),
            ({"user": "1", "candidates": ["1"], "history": [ev | {"action": 3.7}]}, 422, "history[0].action"),
            ({"user": "1", "candidates": ["1"], "history": [ev | {"action": "4"}]}, 422, "history[0].action"),
            ({"user": "1", "candidates": ["1"], "history": [ev | {"action": True}]}, 422, "history[0].action"),
            ({"user": "1", "candidates": ["1"], "history": [ev | {"item": "nope"}]}, 422, "history[0].item"),
            ({"user": "1", "candidates": ["1"], "history": [{"item": "5", "time": 1}]}, 422, "history[0].action"),
            ({"user": "1", "candidates": ["1"], "history": []}, 422, "history"),
            ({"user": "1", "candidates": ["1"], "limit": 3}, 422, "limit"),
        ]
        for body, status, field in cases:
            reply = server.post("/rank", body)
            assert (reply.status_code, reply.json().get("field")) == (status, field), (body, reply.text)
            assert reply.json()["error"]
        before = server.client.get("/users/1/history").json()["events"]
        late = {"user": "1", "events": [ev | {"time": before[-1]["time"] - 1}]}
        assert (server.post("/events", late).status_code, server.post("/events", late).json()["field"]) == (
            422, "events[0].time")
        assert server.client.get("/users/1/history").json()["events"] == before  # refused: nothing stored
        assert server.post("/recommend", {"user": "1"}).status_code == 400  # HSTU ranks, does not retrieve
        raw = server.client.post("/rank", content=b"{not json", headers={"Content-Type": "application/json"})
        assert (raw.status_code, raw.json()["field"]) == (400, "body")
        form = server.client.post("/rank", content=b"user=1", headers={"Content-Type": "text/plain"})
        assert (form.status_code, form.json()["field"]) == (415, "content-type")
        big = server.post("/rank", {"user": "1", "candidates": ["1"], "pad": "x" * 5000})
        assert (big.status_code, big.json()["field"]) == (413, "body")
        anonymous = httpx.post(f"http://127.0.0.1:{server.port}/rank", json={"user": "1", "candidates": ["1"]})
        assert (anonymous.status_code, anonymous.json()["field"]) == (401, "authorization")
        assert httpx.get(f"http://127.0.0.1:{server.port}/metrics").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{server.port}/openapi.json").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{server.port}/healthz").status_code == 200  # the one open route
        assert "/rank" in server.client.get("/openapi.json").json()["paths"]
        assert ranked(server, {"user": "1", "candidates": ["1", "2"]}).shape == (2,)  # still serving
    finally:
        server.stop()


def test_cuda_graphs_are_refused_without_a_cuda_device(runs, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert main(["serve", "--checkpoint", str(runs["dfgr"]), "--device", "cpu", "--cuda-graphs"]) == 2
    assert "CUDA graphs need HSTU or DFGR on a CUDA device" in capsys.readouterr().err


def test_appends_answered_before_a_sigkill_are_served_after_the_restart(runs, tmp_path):
    """With ``--snapshot-every 2`` the first two appends go into a periodic snapshot and the third is
    only in the next generation's journal when the process is killed; the restart serves all three."""
    state = tmp_path / "users.parquet"
    server = Server(runs["hstu"], "--state-file", str(state), "--snapshot-every", "2")
    event = {"item": "5", "action": 4.0, "time": 1_000_000_000}
    try:
        for user in ("new", "1", "2"):
            assert server.post("/events", {"user": user, "events": [event]}).status_code == 200
        deadline = time.monotonic() + 30  # the periodic snapshot is written on the writer thread
        while 'genrec_snapshots_total{reason="periodic"} 1.0' not in server.client.get("/metrics").text:
            assert time.monotonic() < deadline, "the periodic snapshot was not written within 30 s"
            time.sleep(0.05)
    finally:
        server.client.close()
        server.proc.kill()  # SIGKILL: no shutdown hook, no snapshot
        server.proc.communicate(timeout=30)
    server = Server(runs["hstu"], "--state-file", str(state))
    try:
        assert server.client.get("/users/new/history").json()["events"] == [event]
        for user in ("1", "2"):
            assert server.client.get(f"/users/{user}/history").json()["events"][-1] == event
    finally:
        server.stop()


def test_served_recommendations_equal_offline_genrec_recommend(runs):
    """/recommend's engine against ``genrec recommend`` for every dataset user (each has more events
    than max_len): the same items (every rated one left out), retrieval scores and P(like)."""
    from genrec.serve.engine import RecommendJob, build_engine
    from genrec.serve.recommend import recommend

    trainer = Offline(runs["unigrf"]).trainer
    d, seq = trainer.cfg.data, trainer.seq
    engine = build_engine(trainer.model, seq, d.prep.label_threshold, d.prep.request_window_s, d.max_len,
                          trainer.device, 1 << 26)
    k = 40  # of 60 items: users rated 20-35 distinct ones, so the lists reach items they rated
    served = engine.recommend([RecommendJob(raw, None, k, False) for raw in seq.user_raw])
    for user, raw in enumerate(seq.user_raw):
        offline = recommend(trainer.model, seq, user, k, d.max_len, trainer.device)
        assert served[user]["items"] == [r.item for r in offline], raw
        np.testing.assert_allclose(served[user]["scores"], [r.score for r in offline], rtol=0, atol=1e-5)
        np.testing.assert_allclose(served[user]["probabilities"]["rating>3"], [r.p_like for r in offline],
                                   rtol=0, atol=1e-6)
