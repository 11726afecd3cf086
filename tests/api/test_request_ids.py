"""X-Request-ID: on every response (the client's when well formed, else a new one), and on
every log line written while the request is served, in JSON lines that parse."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers.apps import running, upload

from app.main import create_app
from app.serve.logs import handler
from app.serving.request_context import request_id, well_formed
from app.serving.service import Service

KEYS = {"time", "level", "logger", "message", "request_id", "trace_id"}


@pytest.fixture()
def json_log() -> Iterator[io.StringIO]:
    """What the process's JSON handler (app/serve/logs.py) writes, at debug level."""
    buf = io.StringIO()
    out = handler("json", buf)
    root = logging.getLogger()
    level = root.level
    root.addHandler(out)
    root.setLevel(logging.DEBUG)
    try:
        yield buf
    finally:
        root.removeHandler(out)
        root.setLevel(level)


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    out = [json.loads(line) for line in buf.getvalue().splitlines()]  # each line parses
    for line in out:
        assert set(line) >= KEYS, line
    return out


@pytest.mark.parametrize("sent", ["abc", "0af7651916cd43dd8448eb211c80319c", "svc.client-42_7",
                                  "x" * 128, "01J9Z3K6Q8X4M2A7B5C1D0E9F8"])
def test_a_well_formed_id_is_kept(sent: str) -> None:
    assert request_id(sent) == sent


@pytest.mark.parametrize("sent", [None, "", "x" * 129, "has space", 'quote"', "new\nline",
                                  "ünïcode", "a,b", "{json}"])
def test_anything_else_gets_a_new_id(sent: str | None) -> None:
    new = request_id(sent)
    assert new != sent and well_formed(new) and len(new) == 32
    assert request_id(sent) != new  # a new one each time


async def test_every_response_carries_the_id(tiny_settings: Callable[..., Any]) -> None:
    async with running(create_app(tiny_settings())) as c:
        calls = [("POST", "/predict", {"files": upload(1)}, 200),  # the fast path
                 ("POST", "/predict?top_k=0", {"files": upload(1)}, 422),  # its refusal
                 ("GET", "/healthz", {}, 200),
                 ("GET", "/embed?id=nothex", {}, 422),  # FastAPI's validation
                 ("GET", "/no/such/route", {}, 404),
                 ("GET", "/v2/models/nope", {}, 404),  # the OIP skin
                 ("POST", "/v2/models/test-fashion-small/infer", {"content": b"{"}, 400)]
        for method, path, kwargs, status in calls:
            r = await c.request(method, path, headers={"X-Request-ID": "mine-1"}, **kwargs)
            assert (r.status_code, r.headers["x-request-id"]) == (status, "mine-1"), path
            fresh = await c.request(method, path, headers={"X-Request-ID": "bad id"}, **kwargs)
            assert fresh.status_code == status and well_formed(fresh.headers["x-request-id"])
            assert fresh.headers["x-request-id"] != "bad id"
            assert len(fresh.headers.get_list("x-request-id")) == 1


async def test_every_log_line_about_a_request_carries_its_id(
        tiny_settings: Callable[..., Any], json_log: io.StringIO,
        monkeypatch: pytest.MonkeyPatch) -> None:
    original = Service._forward
    broken = []

    def forward(self: Service, jobs: list[Any]) -> Any:
        if broken:
            raise RuntimeError("the engine broke")
        return original(self, jobs)

    monkeypatch.setattr(Service, "_forward", forward)  # before the batcher takes it
    async with running(create_app(tiny_settings(access_log=True))) as c:
        ok = await c.post("/predict", files=upload(1), headers={"X-Request-ID": "good-1"})
        broken.append(True)
        failed = await c.post("/predict", files=upload(2), headers={"X-Request-ID": "bad-1"})
    assert (ok.status_code, failed.status_code) == (200, 500)
    log = lines(json_log)
    (error,) = [x for x in log if x["logger"] == "imgrec.service" and x["level"] == "error"]
    assert error["request_id"] == "bad-1" and "the engine broke" in error["exception"]
    access = {x["request_id"]: x for x in log if x["logger"] == "imgrec.access"}
    assert access["good-1"]["route"] == "/predict" and access["good-1"]["status"] == 200
    assert access["bad-1"]["status"] == 500 and access["bad-1"]["method"] == "POST"
    assert access["good-1"]["duration_ms"] > 0
    assert access["good-1"]["trace_id"] is None  # tracing is off
    # lines outside a request carry none (the start-up, the shutdown)
    ready = next(x for x in log if x["message"].startswith("ready:"))
    assert ready["request_id"] is None
