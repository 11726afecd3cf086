"""What a training run records about itself: the exact command, the code, the machine, and a
JSON-lines log of its epochs (nanoGPT's rule: the command that produced a result sits next to
the result)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from app.training.runtime import Runtime


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent, check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def hardware(rt: Runtime) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(rt.device), "world_size": rt.world, "torch": torch.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if rt.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(rt.device)
    return info


def command_line() -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        prefix = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', '?')} "
        return prefix + shlex.join(["-m", "app.training", *sys.argv[1:]])
    args = sys.argv[1:]
    if args[:1] == ["train"]:  # run as `imgrec train ...` rather than `python -m app.training`
        args = args[1:]
    return shlex.join(["imgrec", "train", *args])


class JsonlLog:
    """One JSON object per line, each with its time; ``path=None`` (ranks other than 0) writes
    nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        record = {"time": datetime.now(UTC).isoformat(timespec="seconds"), **record}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
