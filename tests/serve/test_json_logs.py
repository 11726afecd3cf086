"""`imgrec serve` with IMGREC_LOG_FORMAT=json as a real process: every line of its output, its
own and uvicorn's, is one JSON object; access lines carry the route, status, duration, request
id and trace id, the trace the same request id; API keys and the collector's credentials appear
in neither the log nor the exported spans."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
from helpers.apps import upload
from helpers.daemons import Daemon, free_port, http_status, venv_binary, wait_until
from helpers.otlp import OtlpReceiver

KEY = "sk-live-7f3e9a01c4d2b8e6"
WRONG_KEY = "sk-live-0000wrong1111key"
COLLECTOR_SECRET = "collector-secret-5b2d"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_json_lines_with_ids_and_no_secrets(served_model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    port = free_port()
    with OtlpReceiver() as receiver:
        env = {**os.environ, "IMGREC_MODEL_DIR": str(served_model_dir), "IMGREC_DEVICE": "cpu",
               "IMGREC_PORT": str(port), "IMGREC_EMBED_STORE": str(tmp_path / "e.sqlite3"),
               "IMGREC_LOG_FORMAT": "json", "IMGREC_LOG_LEVEL": "debug",
               "IMGREC_ACCESS_LOG": "true", "IMGREC_API_KEYS_FILE": str(keys),
               "IMGREC_DRAIN_DELAY_S": "0",
               "OTEL_TRACES_EXPORTER": "otlp",
               "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
               "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer {COLLECTOR_SECRET}",
               "OTEL_BSP_SCHEDULE_DELAY": "20"}
        d = Daemon("imgrec", [venv_binary("imgrec"), "serve"], tmp_path, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: http_status(url + "/readyz") == 200, 90, "/readyz", d)
            ok = httpx.post(url + "/predict", files=upload(1), timeout=30, headers={
                "authorization": f"Bearer {KEY}", "x-request-id": "req-ok",
                "traceparent": TRACEPARENT})
            refused = httpx.post(url + "/predict", files=upload(2), timeout=30, headers={
                "authorization": f"Bearer {WRONG_KEY}", "x-request-id": "req-refused"})
            bad = httpx.post(url + f"/predict?api_key={KEY}", content=b"not multipart",
                             timeout=30, headers={"authorization": f"Bearer {KEY}"})
        finally:
            d.stop()
        spans = receiver.wait_for(lambda s: any(x.attributes.get("imgrec.request_id")
                                                == "req-ok" for x in s))
        exported = b"".join(receiver.raw)
    assert (ok.status_code, refused.status_code, bad.status_code) == (200, 401, 400)
    assert ok.headers["x-request-id"] == "req-ok"
    assert d.proc.returncode == 0
    text = d.log_path.read_text()
    log = [json.loads(line) for line in text.splitlines() if line.strip()]  # all of it parses
    for line in log:
        assert {"time", "level", "logger", "message", "request_id", "trace_id"} <= set(line)
    loggers = {line["logger"] for line in log}
    assert "uvicorn.error" in loggers and "imgrec.service" in loggers  # uvicorn's own too
    access = {line["request_id"]: line for line in log if line["logger"] == "imgrec.access"}
    assert access["req-ok"]["route"] == "/predict" and access["req-ok"]["status"] == 200
    assert access["req-ok"]["trace_id"] == TRACE_ID  # the client's trace, continued
    assert access["req-refused"]["status"] == 401
    assert access[bad.headers["x-request-id"]]["status"] == 400
    assert all(a["duration_ms"] > 0 for a in access.values())
    server = next(s for s in spans if s.attributes.get("imgrec.request_id") == "req-ok")
    assert server.trace_id == TRACE_ID
    for secret in (KEY, WRONG_KEY, COLLECTOR_SECRET):
        assert secret not in text
        assert secret.encode() not in exported
