"""The connection cap follows the open-file limit unless IMGREC_MAX_CONNECTIONS sets it."""

from __future__ import annotations

import os
import re
import resource
import sys
from pathlib import Path

import pytest
from helpers.daemons import Daemon, free_port, venv_binary, wait_until

from app.serve.file_limit import MIN_DEFAULT_CONNECTIONS, RESERVED_FILES, plan_files

BACKLOG = 2048
RESERVE = BACKLOG + RESERVED_FILES
INF = resource.RLIM_INFINITY


@pytest.mark.parametrize(("configured", "soft", "hard", "cap", "new_soft", "short"), [
    # the usual 1024 soft limit is raised until 10,000 connections fit beside the reserve
    (0, 1024, 524288, MIN_DEFAULT_CONNECTIONS, MIN_DEFAULT_CONNECTIONS + RESERVE, False),
    (0, 1024, INF, MIN_DEFAULT_CONNECTIONS, MIN_DEFAULT_CONNECTIONS + RESERVE, False),
    # a higher soft limit is kept, and the cap is all it leaves (docker's 1048576)
    (0, 1048576, 1048576, 1048576 - RESERVE, 1048576, False),
    (0, 20000, 20000, 20000 - RESERVE, 20000, False),
    # a hard limit below 10,000 + reserve: as far as it allows, half kept for the reserve
    (0, 1024, 4096, 2048, 4096, True),
    (0, 1024, 8192, 8192 - RESERVE, 8192, True),
    # the operator's cap wins; the soft limit is raised to fit it where the hard one allows
    (500, 1024, 524288, 500, 500 + RESERVE, False),
    (500, 65536, 524288, 500, 65536, False),  # never lowered
    (50_000, 1024, 524288, 50_000, 50_000 + RESERVE, False),
    (50_000, 1024, 8192, 50_000, 8192, True),
])
def test_the_cap_comes_from_the_open_file_limit(configured: int, soft: int, hard: int, cap: int,
                                                new_soft: int, short: bool) -> None:
    plan = plan_files(configured, soft, hard, BACKLOG)
    assert (plan.max_connections, plan.soft_limit, plan.short) == (cap, new_soft, short)
    assert plan.soft_limit <= hard or hard == INF


def test_imgrec_serve_raises_its_soft_limit_and_logs_the_cap(tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    """A real `imgrec serve` started with soft 1024 / hard 20000 runs with the soft limit the
    default cap needs, and says the cap in its log."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MIN_DEFAULT_CONNECTIONS + RESERVE
    if hard != INF and hard < want:
        pytest.skip(f"the hard open-file limit here ({hard}) is below {want}")
    launcher = ("import os, resource, sys; "
                "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, int(sys.argv[1]))); "
                "os.execv(sys.argv[2], sys.argv[2:])")
    port = free_port()
    d = Daemon("imgrec", [sys.executable, "-c", launcher, str(want + 1000),
                          venv_binary("imgrec"), "serve"], tmp_path,
               env={**os.environ, "IMGREC_MODEL_DIR": str(tiny_model_dir),
                    "IMGREC_DEVICE": "cpu", "IMGREC_EMBED_STORE": "memory",
                    "IMGREC_PORT": str(port), "IMGREC_GRPC_PORT": "0"}, cwd=tmp_path)
    try:
        wait_until(lambda: "connection cap" in d.tail(), 120, "the cap's log line", d)
        limits = Path(f"/proc/{d.pid}/limits").read_text()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert row.split()[3:5] == [str(want), str(want + 1000)], row
        line = next(x for x in d.tail().splitlines() if "connection cap" in x)
        assert re.search(rf"connection cap {MIN_DEFAULT_CONNECTIONS} \(from the open-file "
                         rf"limit; open files: soft limit {want}, hard {want + 1000}", line), line
    finally:
        d.kill()
        d.stop()
