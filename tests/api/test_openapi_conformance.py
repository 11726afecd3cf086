"""schemathesis against /openapi.json of a live `imgrec serve`: the document says exactly what
the server accepts and answers.

Every route in the schema is tested, with all of schemathesis's checks (5xx, undocumented status
codes, content types and headers, response bodies against their schemas, schema-valid requests
that are refused, schema-invalid ones that are accepted, ``Allow`` on 405, ...) over its
examples, coverage, fuzzing (positive and negative data) and stateful phases, with a fixed seed
and a bounded number of examples per operation. tests/api/schemathesis_hooks.py teaches it to make
real images for the upload parts' image media types.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.daemons import Daemon, free_port, http_status, venv_binary, wait_until

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261201
MAX_EXAMPLES = 20  # per operation and phase: about a minute on two shared cores


def schemathesis_argv(url: str, report_dir: Path) -> list[str]:
    return [venv_binary("schemathesis"), "run", f"{url}/openapi.json",
            "--checks", "all", "--mode", "all",
            "--phases", "examples,coverage,fuzzing,stateful",
            "--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES),
            "--workers", "1", "--generation-database", "none", "--request-timeout", "30",
            "--no-color", "--report", "json", "--report-dir", str(report_dir)]


@pytest.fixture(scope="module")
def live_server(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[str, Daemon]]:
    tmp = tmp_path_factory.mktemp("schemathesis-server")
    port = free_port()
    env = {**os.environ, "IMGREC_MODEL_DIR": str(served_model_dir), "IMGREC_DEVICE": "cpu",
           "IMGREC_PORT": str(port), "IMGREC_EMBED_STORE": str(tmp / "e.sqlite3"),
           "IMGREC_LOG_LEVEL": "warning"}
    d = Daemon("imgrec", [venv_binary("imgrec"), "serve"], tmp, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(url + "/readyz") == 200, 90, "imgrec serve /readyz", d)
        yield url, d
    finally:
        d.stop()


@pytest.mark.slow
def test_schemathesis_finds_no_failures(live_server: tuple[str, Daemon], tmp_path: Path) -> None:
    url, daemon = live_server
    schema = httpx.get(url + "/openapi.json", timeout=10).json()
    operations = sum(1 for item in schema["paths"].values() for method in item
                     if method in {"get", "put", "post", "delete", "patch", "head", "options"})
    hooks = ROOT / "tests" / "api" / "schemathesis_hooks.py"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(hooks),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(schemathesis_argv(url, tmp_path), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
    output = proc.stdout[-12000:] + proc.stderr[-4000:]
    reports = list(tmp_path.glob("json-*.json"))
    assert reports, f"schemathesis wrote no report (exit {proc.returncode}):\n{output}"
    report = json.loads(reports[0].read_text())
    assert report["failures"] == [] and report["errors"] == [], output
    assert proc.returncode == 0, output
    assert report["complete"] and report["seed"] == SEED
    # every operation of the document was tested, each with many generated requests
    assert report["operations"]["tested"] == report["operations"]["total"] == operations, output
    assert report["test_cases"]["generated"] >= 10 * operations, output
    for phase in ("coverage", "fuzzing", "stateful"):
        assert report["phases"][phase]["status"] == "success", (phase, output)
    # and the server came through it healthy
    assert daemon.alive() and http_status(url + "/readyz") == 200
    assert "Traceback" not in daemon.tail(200_000), daemon.tail()
