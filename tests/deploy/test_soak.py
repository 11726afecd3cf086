"""bench/soak.py, briefly: it starts a server, sends every accepted format and the bad uploads,
and writes its figures and plot (the long run is a benchmark, not a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.serving.upload_checks import ALLOWED_FORMATS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_soak_smoke(served_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration-s", "4", "--concurrency",
         "4", "--sample-s", "1", "--warmup-s", "1", "--variants", "1",
         "--model-dir", str(served_model_dir), "--out-dir", str(out)],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads((out / "soak.json").read_text())
    assert figures["requests"] > 0 and figures["samples"]
    assert figures["unexpected"] == {}, figures["answers"]
    answered = {name.split(" -> ")[0]: name.split(" -> ")[1] for name in figures["answers"]}
    # every format the server accepts was sent, at least at one size, and answered 200
    for fmt in ALLOWED_FORMATS:
        assert any(kind.startswith(fmt + " ") and status == "200"
                   for kind, status in answered.items()), (fmt, answered)
    if "bad: pixel bomb header" in answered:
        assert answered["bad: pixel bomb header"] == "413"
    assert all(status.startswith("4") for kind, status in answered.items()
               if kind.startswith("bad"))
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drift = figures["drift"]
    assert drift["fds_last"] > 0 and drift["rss_mb_last"] > 0
