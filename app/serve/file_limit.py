"""The connection cap and the process's open-file limit: every connection is a file descriptor.

Unset (``IMGREC_MAX_CONNECTIONS=0``), the cap comes from the open-file limit: the soft
RLIMIT_NOFILE is raised until at least ``MIN_DEFAULT_CONNECTIONS`` fit (as far as the hard limit
allows), and the cap is what the soft limit leaves after the reserve. Set, the cap is the
operator's, and the soft limit is raised to fit it where the hard limit allows. Either way the
reserve is kept free: the listen backlog accepted at shutdown (``http_server``), the embedding
store, the model's files, libraries' own descriptors. So a flood runs into the cap, which closes
the slowest connections first, and never into EMFILE, which would fail accept() for everyone.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("imgrec.server")

MIN_DEFAULT_CONNECTIONS = 10_000
RESERVED_FILES = 256  # the store, the model's files, logs, libraries (gRPC, ONNX Runtime...)


@dataclass(frozen=True, slots=True)
class FilePlan:
    """The cap and the soft limit that makes room for it."""

    max_connections: int
    soft_limit: int  # the soft RLIMIT_NOFILE to run with (the current one when enough)
    hard_limit: int | None  # None: unlimited
    configured: bool  # IMGREC_MAX_CONNECTIONS was set
    wanted_soft: int  # the soft limit the cap and the reserve need

    @property
    def short(self) -> bool:
        """The hard limit does not allow the files the plan wants."""
        return self.soft_limit < self.wanted_soft


def plan_files(max_connections: int, soft: int, hard: int, backlog: int) -> FilePlan:
    """The cap for ``max_connections`` (0 = from the limit) under the (soft, hard) RLIMIT_NOFILE.

    Pure, for tests; ``apply_file_plan`` reads and sets the real limit."""
    reserve = backlog + RESERVED_FILES
    unlimited_hard = hard == resource.RLIM_INFINITY
    wanted = (max_connections or MIN_DEFAULT_CONNECTIONS) + reserve
    if soft == resource.RLIM_INFINITY:  # nothing to raise; an unlimited soft limit is rare
        soft = wanted
    target = max(soft, wanted if unlimited_hard else min(wanted, hard))
    cap = max_connections or max(target - reserve, target // 2)
    return FilePlan(cap, target, None if unlimited_hard else hard, max_connections > 0, wanted)


def apply_file_plan(max_connections: int, backlog: int) -> FilePlan:
    """Raise the soft open-file limit as the plan says, and log the cap in one line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    plan = plan_files(max_connections, soft, hard, backlog)
    if plan.soft_limit != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (plan.soft_limit, hard))
    source = "IMGREC_MAX_CONNECTIONS" if plan.configured else "from the open-file limit"
    hard_text = "unlimited" if plan.hard_limit is None else str(plan.hard_limit)
    log.info("connection cap %d (%s; open files: soft limit %d, hard %s, %d kept for the "
             "backlog and the process's own files)", plan.max_connections, source,
             plan.soft_limit, hard_text, backlog + RESERVED_FILES)
    if plan.short and plan.configured:
        log.warning("IMGREC_MAX_CONNECTIONS=%d needs %d open files, the hard limit is %s: a "
                    "flood can run into EMFILE before the cap; raise the limit (ulimit -n, "
                    "LimitNOFILE, docker --ulimit nofile=...) or lower the cap",
                    plan.max_connections, plan.wanted_soft, hard_text)
    elif plan.short:
        log.warning("connection cap only %d: the hard open-file limit %s allows no more (the "
                    "default wants %d open files); raise it (ulimit -n, LimitNOFILE, docker "
                    "--ulimit nofile=...)", plan.max_connections, hard_text, plan.wanted_soft)
    return plan
