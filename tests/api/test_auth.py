"""API keys (IMGREC_API_KEYS_FILE): 401s, open routes, one store namespace per key, the OpenAPI
description, and SIGHUP reloads of a real `imgrec serve`."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from helpers.apps import image_id, running, upload
from helpers.daemons import LOOPBACK, start_replica, wait_until
from helpers.settings import make_settings

from app.api.auth import KeyFileError, KeyRing, namespace_of_key, parse_keys
from app.main import create_app
from app.serving.service import Service

KEY_A = "alice-0123456789abcdef-AAAA"
KEY_B = "bob-fedcba9876543210-BBBBBB"
WRONG = "mallory-000000000000000000"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_app(model_dir: Path, tmp_path: Path, keys: str | None) -> FastAPI:
    keys_file = None
    if keys is not None:
        keys_file = tmp_path / "keys"
        keys_file.write_text(keys)
    return create_app(make_settings(model_dir, tmp_path, embed_store="memory",
                                    api_keys_file=keys_file))


# -- the keys file -----------------------------------------------------------------------------
def test_keys_file_format() -> None:
    text = f"# imgrec keys\n\n{KEY_A}\n   {KEY_B}   # bob, since May\n\n# {WRONG}\n"
    assert parse_keys(text) == [KEY_A, KEY_B]


@pytest.mark.parametrize(("text", "problem"), [
    ("", "no keys"),
    ("# only a comment\n\n", "no keys"),
    (f"{KEY_A}\nsecret with spaces-0123456789\n", "line 2: not a bearer token"),
    (f"{KEY_A}\n\nshort\n", "line 3: a key must have at least 16"),
])
def test_bad_keys_file_is_refused_without_echoing_it(text: str, problem: str) -> None:
    with pytest.raises(KeyFileError, match=problem) as e:
        parse_keys(text)
    for word in ("secret", "short", KEY_A):
        assert word not in str(e.value)


def test_bad_keys_file_stops_start_up(served_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no keys"):
        make_app(served_model_dir, tmp_path, "# nothing yet\n")
    with pytest.raises(KeyFileError, match="cannot read"):
        create_app(make_settings(served_model_dir, tmp_path, api_keys_file=tmp_path / "missing"))


def test_reload_keeps_the_old_keys_when_the_new_file_is_bad(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="imgrec.auth")
    path = tmp_path / "keys"
    path.write_text(KEY_A + "\n")
    ring = KeyRing(path)
    path.write_text(f"{KEY_B}\nnot a key at all\n")
    assert ring.reload() is False
    assert ring.check(f"Bearer {KEY_A}") == namespace_of_key(KEY_A)
    path.unlink()
    assert ring.reload() is False
    assert ring.check(f"Bearer {KEY_A}") == namespace_of_key(KEY_A)
    path.write_text(KEY_B + "\n")
    assert ring.reload() is True
    assert ring.check(f"bearer  {KEY_B} ") == namespace_of_key(KEY_B)
    logged = caplog.text
    assert "not reloaded" in logged and "line 2" in logged
    for secret in (KEY_A, KEY_B, "not a key at all"):
        assert secret not in logged


# -- the HTTP side -------------------------------------------------------------------------------
@pytest.fixture()
def keyed_app(served_model_dir: Path, tmp_path: Path) -> Iterator[FastAPI]:
    yield make_app(served_model_dir, tmp_path, f"{KEY_A}\n{KEY_B}\n")


async def test_protected_routes_answer_401(keyed_app: FastAPI,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(keyed_app) as c:
        requests = [("POST", "/predict", upload(1)), ("POST", "/embed", upload(1)),
                    ("GET", f"/embed?id={image_id(1)}", None),
                    ("POST", "/a-route-added-later", None)]
        for method, path, files in requests:
            for headers, error in [({}, None), (bearer(WRONG), "invalid_token"),
                                   ({"Authorization": f"Basic {WRONG}"}, None),
                                   ({"Authorization": "Bearer"}, None)]:
                r = await c.request(method, path, files=files, headers=headers)
                assert r.status_code == 401, (method, path, r.text)
                assert r.json()["error"]["code"] == "unauthorized"
                challenge = r.headers["www-authenticate"]
                assert challenge.startswith('Bearer realm="imgrec"')
                assert ('error="invalid_token"' in challenge) == (error is not None)
                assert WRONG not in r.text and WRONG not in str(r.headers)
        r = await c.post("/predict", files=upload(1), headers=bearer(KEY_A))
        assert r.status_code == 200, r.text
        metrics = (await c.get("/metrics")).text
    assert 'imgrec_rejections_total{reason="unauthorized"} 16.0' in metrics
    assert 'imgrec_requests_total{route="POST /predict",status="401"} 4.0' in metrics
    for secret in (KEY_A, KEY_B, WRONG):
        assert secret not in caplog.text


async def test_open_routes_need_no_key(keyed_app: FastAPI) -> None:
    async with running(keyed_app) as c:
        for path in ("/healthz", "/readyz", "/metrics", "/model", "/openapi.json", "/docs"):
            r = await c.get(path)
            assert r.status_code == 200, (path, r.text)


async def test_each_key_is_its_own_namespace(keyed_app: FastAPI) -> None:
    async with running(keyed_app) as c:
        r = await c.post("/embed", files=upload(5), headers=bearer(KEY_A))
        assert r.status_code == 200 and r.headers["x-imgrec-stored"] == "true"
        vector = r.json()["results"][0]["embedding"]
        assert (await c.get("/embed", params={"id": image_id(5)},
                            headers=bearer(KEY_A))).json()["results"][0]["embedding"] == vector
        # B cannot read A's vector, nor tell it from an image nobody sent
        theirs = await c.get("/embed", params={"id": image_id(5)}, headers=bearer(KEY_B))
        nobodys = await c.get("/embed", params={"id": image_id(6)}, headers=bearer(KEY_B))
        assert theirs.status_code == nobodys.status_code == 404
        assert (theirs.json()["error"]["message"].replace(image_id(5), "ID")
                == nobodys.json()["error"]["message"].replace(image_id(6), "ID"))
        # /predict stores into the caller's namespace too; B's copy is B's own
        r = await c.post("/predict", files=upload(5), headers=bearer(KEY_B))
        assert r.status_code == 200 and r.headers["x-imgrec-stored"] == "true"
        assert (await c.get("/embed", params={"id": image_id(5)},
                            headers=bearer(KEY_B))).status_code == 200
        # nothing went to the keyless namespace, and the namespaces are the documented ids
        service: Service = keyed_app.state.service
        assert service.store is not None
        assert service.store.get_many(service.store_key(None), [image_id(5)]) == {}
        for key in (KEY_A, KEY_B):
            ns = hashlib.sha256(key.encode()).hexdigest()[:16]
            assert image_id(5) in service.store.get_many(service.store_key(ns), [image_id(5)])


async def test_without_a_keys_file_nothing_changes(served_model_dir: Path, tmp_path: Path) -> None:
    app = make_app(served_model_dir, tmp_path, None)
    async with running(app) as c:
        r = await c.post("/embed", files=upload(9), headers=bearer(WRONG))  # header ignored
        assert r.status_code == 200, r.text
        assert (await c.get("/embed", params={"id": image_id(9)})).status_code == 200
        service: Service = app.state.service
        assert service.predictor is not None and service.store is not None
        # the same store key as before namespaces existed: existing stores stay valid
        assert service.store_key(None) == service.predictor.model_key
        assert image_id(9) in service.store.get_many(service.predictor.model_key, [image_id(9)])
        schema = (await c.get("/openapi.json")).json()
    assert "securitySchemes" not in schema.get("components", {})
    assert "401" not in schema["paths"]["/predict"]["post"]["responses"]


async def test_openapi_describes_the_keys(keyed_app: FastAPI) -> None:
    async with running(keyed_app) as c:
        schema = (await c.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer",
        "description": "one of the keys in IMGREC_API_KEYS_FILE"}
    paths = schema["paths"]
    for path, method in [("/predict", "post"), ("/embed", "post"), ("/embed", "get")]:
        op = paths[path][method]
        assert op["security"] == [{"apiKey": []}]
        assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
    for path in ("/healthz", "/readyz", "/metrics", "/model"):
        assert "security" not in paths[path]["get"]
        assert "401" not in paths[path]["get"]["responses"]
    assert "X-Imgrec-Stored" in paths["/predict"]["post"]["responses"]["200"]["headers"]


@pytest.mark.slow
def test_sighup_reloads_the_keys_of_a_running_server(served_model_dir: Path,
                                                     tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# clients\n{KEY_A}\n")
    daemon, port = start_replica("imgrec", tmp_path, served_model_dir,
                                 {"IMGREC_API_KEYS_FILE": str(keys),
                                  "IMGREC_EMBED_STORE": "memory",
                                  "IMGREC_WARMUP_BATCHES": "1"})
    base = f"http://{LOOPBACK}:{port}"

    def status(key: str) -> int:
        return httpx.post(base + "/predict", files=upload(3), headers=bearer(key),
                          timeout=30).status_code

    try:
        assert (status(KEY_A), status(KEY_B)) == (200, 401)
        keys.write_text(f"{KEY_B}  # A's key revoked\n")
        os.kill(daemon.pid, signal.SIGHUP)
        wait_until(lambda: status(KEY_B) == 200, 20, "the new key to be accepted", daemon)
        assert status(KEY_A) == 401
        # a bad file: the keys stay as they were, and the log says why
        keys.write_text(f"{KEY_A}\n{WRONG} and more\n")
        os.kill(daemon.pid, signal.SIGHUP)
        wait_until(lambda: "not reloaded" in daemon.tail(), 20, "the refused reload", daemon)
        assert (status(KEY_A), status(KEY_B)) == (401, 200)
        assert daemon.alive()
    finally:
        daemon.stop()
    log = daemon.log_path.read_text(errors="replace")
    assert "line 2" in log
    for secret in (KEY_A, KEY_B, WRONG):
        assert secret not in log
