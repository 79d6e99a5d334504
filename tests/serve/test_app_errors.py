"""Refusals the routes never see (body parsing, routing) answer in the service's documented shape
``{"error", "field"}``, not FastAPI's default ``{"detail"}``."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from genrec.serve.app import Limits, build_app
from genrec.serve.engine import Catalogue, Engine
from genrec.serve.store import UserStore
from tests.models.test_generative import INFO, make_model

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client() -> TestClient:
    catalogue = Catalogue([str(i) for i in range(1, INFO.num_items + 1)], INFO.rating_values, 3.0, 0)
    engine = Engine(make_model("hstu", torch.float32), catalogue, UserStore(0), torch.device("cpu"), 32)
    return TestClient(build_app(engine, Limits(max_body_bytes=1 << 20)))


@pytest.mark.parametrize("method, path, body, status, field", [
    ("POST", "/rank", b'{"user": "1", "candidates": ["\xff"]}', 400, "body"),  # not UTF-8
    ("POST", "/rank", b"[" * 100_000 + b"]" * 100_000, 400, "body"),  # past the parser's recursion limit
    ("GET", "/no-such-route", None, 404, "path"),
    ("POST", "/no-such-route", b"{}", 404, "path"),
    ("GET", "/rank", None, 405, "method"),
    ("DELETE", "/events", None, 405, "method"),
])
def test_parse_routing_and_method_errors_use_the_error_shape(client, method, path, body, status, field):
    reply = client.request(method, path, content=body, headers=JSON)
    assert reply.status_code == status
    assert reply.json().keys() == {"error", "field"} and reply.json()["field"] == field and reply.json()["error"]
    if status == 405:  # HTTP asks a 405 to name the methods the route takes
        assert reply.headers["allow"] == "POST"
