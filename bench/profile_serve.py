"""Where the server's CPU goes under load: per-thread CPU, machine idle share and a py-spy profile.

Starts `imgrec serve` from a source tree (default: this one) on the shipped model, drives it with
wrk at one concurrency over distinct PNG uploads (bench/serve.py's bodies and runner), and
meanwhile:

* reads each server thread's CPU from /proc (inference, event loop, decode, finish...);
* reads the machine's idle share from /proc/stat over the run;
* samples the server with py-spy (``--native`` off: Python frames, GIL-holding or not) and
  prints the functions with the most samples, by own time and by inclusive time.

Asserts nothing; prints figures. py-spy must be installed (``pip install py-spy``) and allowed
to ptrace (root here).

    python bench/profile_serve.py --seconds 15 --concurrency 64
    python bench/profile_serve.py --tree /tmp/imgrec-before --top 25
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ab_trees import serve  # noqa: E402
from bench.serve import TICK, make_bodies, wrk  # noqa: E402


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per thread id."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def machine_idle() -> tuple[int, int]:
    """(idle + iowait jiffies, all jiffies) of the whole machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


ROLES = (("Runner.run", "event loop"), ("_forward", "inference"), ("_prepare_job", "decode"),
         ("_store_batch", "finish (store write)"), ("AnnIndexer", "ANN indexer"))


def thread_role(frames: list[str]) -> str:
    """What a sampled thread was doing, named by the first distinctive frame of its stack."""
    for frame in frames:
        for marker, role in ROLES:
            if marker in frame:
                return role
    return "other"


def _frame(text: str) -> str:
    """py-spy's ``fn (file.py:line)`` without the line: a function, not a line, per entry."""
    return text.rsplit(":", 1)[0] + ")" if text.endswith(")") and ":" in text else text


def read_stacks(raw: Path) -> list[tuple[int | None, list[str], int]]:
    """py-spy's raw (collapsed) stacks: (thread id, frames root first, samples)."""
    out: list[tuple[int | None, list[str], int]] = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        tid, name = None, ""
        head = re.match(r"(?:process \d+:\S*;)?thread \((0x[0-9a-fA-F]+|\d+)\)(?::? ?(.*))?",
                        frames[0]) if frames else None
        if head is not None:
            tid = int(head.group(1), 0)
            name = head.group(2) or ""
            frames = frames[1:] or [name]
        out.append((tid, [_frame(f) for f in frames], int(count)))
    return out


def roles_of(stacks: list[tuple[int | None, list[str], int]]) -> dict[int, str]:
    """Each sampled thread's role, by the role most of its samples show."""
    votes: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for tid, frames, n in stacks:
        if tid is not None:
            votes[tid][thread_role(frames)] += n
    return {tid: c.most_common(1)[0][0] for tid, c in votes.items()}


def summarise(stacks: list[tuple[int | None, list[str], int]], top: int) -> str:
    """The top functions by own and by inclusive samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for _, frames, n in stacks:
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples (threads on the CPU or waiting for the GIL)", "",
             "| own % | function |", "|---|---|"]
    lines += [f"| {100 * n / total:.1f} | `{f}` |" for f, n in own.most_common(top)]
    lines += ["", "| inclusive % | function |", "|---|---|"]
    lines += [f"| {100 * n / total:.1f} | `{f}` |" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def thread_table(before: dict[int, float], after: dict[int, float], wall: float,
                 roles: dict[int, str]) -> str:
    """CPU per thread role as a share of one core over the run (from /proc, not samples)."""
    by_role: collections.Counter[str] = collections.Counter()
    for tid, cpu in after.items():
        by_role[roles.get(tid, "unsampled")] += (cpu - before.get(tid, 0.0)) / wall
    lines = ["| thread | CPU, share of one core |", "|---|---|"]
    lines += [f"| {role} | {100 * share:.0f}% |" for role, share in by_role.most_common()
              if share >= 0.005]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default=str(ROOT), help="the source tree to serve")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--role", action="append", default=[],
                   help="also print the top functions of this thread role alone (event loop, "
                        "inference, decode...)")
    p.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    p.add_argument("--no-profile", action="store_true", help="threads and idle share only")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment of the server")
    args = p.parse_args()
    tree = Path(args.tree).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="imgrec-profile-"))
    bodies = tmp / "png28"
    make_bodies(bodies, 2000, "png28")
    extra = dict(kv.split("=", 1) for kv in args.env)
    proc, port = serve(tree, tree / "models" / "fashion-mnist", tmp, extra)
    spy = None
    try:
        wrk(port, 4, 2, bodies, 2000, proc.pid, "warm-up")
        before_threads, before_idle = thread_cpu(proc.pid), machine_idle()
        if not args.no_profile:
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--format", "raw",
                                    "--rate", str(args.rate), "--duration",
                                    str(max(1, int(args.seconds) - 2)), "--threads",
                                    "--nonblocking", *(["--gil"] if args.gil else []),
                                    "-o", str(tmp / "raw.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started = time.monotonic()
        run = wrk(port, args.concurrency, args.seconds, bodies, 2000, proc.pid, tree.name)
        wall = time.monotonic() - started
        after_threads, after_idle = thread_cpu(proc.pid), machine_idle()
        if spy is not None:
            spy.wait(60)
    finally:
        proc.terminate()
        proc.wait(60)
    idle = (after_idle[0] - before_idle[0]) / max(1, after_idle[1] - before_idle[1])
    print(f"tree {tree}, c={args.concurrency}, {run.rps:.0f} req/s, p50 {run.p50_ms:.2f} ms, "
          f"p99 {run.p99_ms:.2f} ms, server CPU {run.cpu_ms_per_req:.3f} ms/req, "
          f"wrk {run.loadgen_cpu_ms_per_req:.3f} ms/req, machine idle {100 * idle:.1f}%, "
          f"errors {run.errors}, load {os.getloadavg()[0]:.2f}")
    stacks = read_stacks(tmp / "raw.txt") if (tmp / "raw.txt").exists() else []
    print("\n" + thread_table(before_threads, after_threads, wall, roles_of(stacks)))
    if stacks:
        print("\n" + summarise(stacks, args.top))
        roles = roles_of(stacks)
        for role in args.role:
            print(f"\n### {role} alone\n" + summarise(
                [s for s in stacks if s[0] is not None and roles.get(s[0]) == role], args.top))
    elif spy is not None:
        print("py-spy wrote nothing:", spy.stderr.read().decode() if spy.stderr else "")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
