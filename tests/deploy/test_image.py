"""The serve-only image, built from the Dockerfile unchanged and run as a user would run it.

No Docker here: buildah builds the Dockerfile (deploy/images.py) on a stand-in for
python:3.11-slim-bookworm (deploy/standin-base.sh: Debian's python3.11 on a debootstrapped
bookworm, cached outside the repository, see docs/deploy.md for how it differs). The container
then runs its own CMD as its own USER with its own ENV; only the address and the ports are set,
as `docker run -p` would publish them (chroot isolation shares this machine's network, and
tests listen on loopback only). What compose files run is then checked against what ran here.

Marked `image` and `slow`; bounded: the base in BASE_TIMEOUT_S (debootstrap, on a machine
without the cache), the build in BUILD_TIMEOUT_S. Without buildah or root it skips, in CI it
fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from helpers.daemons import LOOPBACK, free_port, http_status, in_ci, require_binary
from helpers.images import png_bytes
from test_docker_static import compose_config, compose_seconds, volumes

REPO = Path(__file__).resolve().parents[2]
BASE_TIMEOUT_S = 360
BUILD_TIMEOUT_S = 300
TAG = "imgrec:cpu"
IMAGE_UID = 10001

pytestmark = [pytest.mark.image, pytest.mark.slow]


def load_images() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_images", REPO / "deploy" / "images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


images = load_images()


@dataclass
class Run:
    """What one run of the image showed (filled by the `ran` fixture, read by the tests)."""
    config: dict[str, Any]
    port: int
    uid: int = -1
    ready_s: float = -1.0
    healthcheck_rc: int = -1
    compose_healthcheck_rc: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    bodies: dict[str, Any] = field(default_factory=dict)
    store: dict[str, Any] = field(default_factory=dict)
    drain: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    stopped_healthcheck_rc: int = -1
    log: str = ""


def require_tools() -> None:
    require_binary("buildah")
    require_binary("debootstrap")
    if os.geteuid() != 0:
        message = "building an image here needs root (debootstrap, chroot)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_tools()
    log = tmp_path_factory.mktemp("image") / "build.log"
    images.CACHE.mkdir(parents=True, exist_ok=True)
    try:
        start = time.monotonic()
        images.ensure_base(log, timeout=BASE_TIMEOUT_S)
        base_s = time.monotonic() - start
        build_s = images.build("cpu", TAG, log, timeout=BUILD_TIMEOUT_S)
    except (subprocess.SubprocessError, RuntimeError) as e:
        pytest.fail(f"{e}\n{log.read_text()[-4000:]}")
    print(f"\nimage: base {base_s:.1f} s, build {build_s:.1f} s: {images.report(TAG, build_s)}")
    info: dict[str, Any] = images.inspect(TAG)
    return info


def pid_of_cmd(root_pid: int, argv_tail: str) -> int:
    """The descendant of root_pid whose command line ends with argv_tail (the CMD itself)."""
    children = {root_pid}
    for _ in range(10):
        found = set(children)
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid in children:
                    found.add(int(proc.name))
        children = found
    for pid in sorted(children - {root_pid}):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        if cmdline.endswith(argv_tail) and "buildah" not in cmdline:
            return pid
    raise AssertionError(f"no process running {argv_tail!r} under {root_pid}")


def real_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def in_container(ctr: str, argv: list[str], port: int) -> int:
    """A command run in the container as Docker's health check runs it (same user, same env)."""
    r = subprocess.run(images.run_argv(ctr, argv, {"IMGREC_PORT": str(port)}),
                       capture_output=True, timeout=60)
    return r.returncode


def compose_healthchecks() -> dict[str, list[str]]:
    """Each compose file's api health check command, with the port the test serves on."""
    out = {}
    for files in (["docker-compose.yml"], ["docker-compose.replicas.yml"]):
        test = compose_config(files)["services"]["api"]["healthcheck"]["test"]
        assert test[0] == "CMD"
        out["+".join(files)] = test[1:]
    return out


def exercise(run: Run, base: str, ctr: str) -> None:
    """/predict and /embed as a client sends them, while the server is ready."""
    files = [("file", ("a.png", png_bytes(1), "image/png")),
             ("file", ("b.png", png_bytes(2), "image/png"))]
    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/predict", params={"top_k": 3}, files=files)
        run.statuses["predict"], run.bodies["predict"] = r.status_code, r.json()
        run.bodies["stored"] = r.headers.get("x-imgrec-stored")
        r = client.post("/embed", params={"normalize": "true"}, files=files[:1])
        run.statuses["embed"], run.bodies["embed"] = r.status_code, r.json()


def stop(run: Run, proc: subprocess.Popen[bytes], server_pid: int, base: str) -> None:
    """docker stop: SIGTERM to the CMD's process, then what a client sees during the drain."""
    start = time.monotonic()
    os.kill(server_pid, 15)
    deadline = start + 10
    while http_status(f"{base}/readyz") != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    run.drain["readyz_503_after_s"] = time.monotonic() - start
    with httpx.Client(base_url=base, timeout=30) as client:
        files = [("file", ("c.png", png_bytes(3), "image/png"))]
        run.drain["predict_while_draining"] = client.post("/predict", files=files).status_code
    run.exit_code = proc.wait(timeout=60)
    run.drain["exit_after_s"] = time.monotonic() - start


# run in the container after the server stopped, as `docker run --volumes-from` would look:
# buildah mounts the image's VOLUME as a volume of the container (initialised from the image,
# kept across runs of the container), not in its root file system
READ_STORE = """
import json, os, sqlite3
path = os.environ["IMGREC_EMBED_STORE"]
st = os.stat(path)
mounts = [line.split()[1] for line in open("/proc/mounts")]
rows = sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute(
    "SELECT COUNT(*) FROM embeddings").fetchone()[0]
print(json.dumps({"path": path, "uid": st.st_uid, "rows": rows,
                  "volume": os.path.dirname(path) in mounts}))
"""


def read_store(run: Run, ctr: str) -> None:
    r = subprocess.run(images.run_argv(ctr, ["python", "-c", READ_STORE]), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    run.store = json.loads(r.stdout)


@pytest.fixture(scope="module")
def ran(built: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    config = built["Docker"]["config"]
    run = Run(config=config, port=free_port())
    base = f"http://{LOOPBACK}:{run.port}"
    env = {"IMGREC_HOST": LOOPBACK, "IMGREC_PORT": str(run.port),
           "IMGREC_GRPC_PORT": str(free_port())}
    ctr = images.container(TAG)
    log = tmp_path_factory.mktemp("image-run") / "serve.log"
    proc = subprocess.Popen(images.run_argv(ctr, config["Cmd"], env), stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        start_period = config["Healthcheck"]["StartPeriod"] / 1e9
        start = time.monotonic()
        while http_status(f"{base}/readyz") != 200 and proc.poll() is None \
                and time.monotonic() - start < start_period:
            time.sleep(0.2)
        run.ready_s = time.monotonic() - start if http_status(f"{base}/readyz") == 200 else -1
        assert run.ready_s >= 0, f"not ready within {start_period} s:\n{log.read_text()[-3000:]}"
        server_pid = pid_of_cmd(proc.pid, " ".join(config["Cmd"]))
        run.uid = real_uid(server_pid)
        run.healthcheck_rc = in_container(ctr, config["Healthcheck"]["Test"][1:], run.port)
        for name, test in compose_healthchecks().items():
            # compose probes the image's port, 8000; this run publishes it on run.port
            assert any(":8000/readyz" in a for a in test), test
            probe = [a.replace(":8000/", f":{run.port}/") for a in test]
            run.compose_healthcheck_rc[name] = in_container(ctr, probe, run.port)
        exercise(run, base, ctr)
        stop(run, proc, server_pid, base)
        run.stopped_healthcheck_rc = in_container(ctr, config["Healthcheck"]["Test"][1:], run.port)
        read_store(run, ctr)
        run.log = log.read_text()
        print(f"\nimage run: ready after {run.ready_s:.1f} s, SIGTERM to exit "
              f"{run.drain['exit_after_s']:.1f} s")
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        images.remove(ctr)


# ---- the image as built ------------------------------------------------------------------------

def test_image_is_the_dockerfiles(built: dict[str, Any]) -> None:
    config = built["Docker"]["config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Cmd"] == ["imgrec", "serve"]
    assert config["StopSignal"] == "SIGTERM"
    assert "/data" in config["Volumes"]
    assert {"8000/tcp", "8001/tcp"} <= set(config["ExposedPorts"])
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["IMGREC_EMBED_STORE"] == "/data/embeddings.sqlite3"
    # the build's pip settings were secrets: none of them is in the image's environment
    assert not [k for k in env if k.startswith("PIP_") and k != "PIP_NO_CACHE_DIR"]
    assert "--mount=type=secret" not in str(built["Docker"]["history"])


def test_image_holds_no_build_secret_and_no_torch(built: dict[str, Any]) -> None:
    ctr = images.container(TAG)
    try:
        root = Path(images.buildah("mount", ctr))
        assert not (root / "etc" / "pip.conf").exists()
        assert not (root / "run" / "secrets" / "pip-ca.crt").exists()
        site = next((root / "opt" / "venv" / "lib").glob("python3*/site-packages"))
        assert (site / "onnxruntime").is_dir() and (site / "app").is_dir()
        assert not (site / "torch").exists(), "the cpu image holds no PyTorch"
        data = (root / "data").stat()
        assert (data.st_uid, data.st_gid) == (IMAGE_UID, IMAGE_UID), "/data is the user's"
        images.buildah("umount", ctr)
    finally:
        images.remove(ctr)


# ---- the image run as a user would -------------------------------------------------------------

def test_runs_as_its_user_and_is_ready_within_the_start_period(ran: Run) -> None:
    assert ran.uid == IMAGE_UID
    assert 0 <= ran.ready_s < ran.config["Healthcheck"]["StartPeriod"] / 1e9
    assert ran.healthcheck_rc == 0, "the image's HEALTHCHECK passes while ready"
    assert ran.stopped_healthcheck_rc != 0, "and fails once the server is gone"


def test_predict_and_embed_answer(ran: Run) -> None:
    assert ran.statuses == {"predict": 200, "embed": 200}, ran.bodies
    results = ran.bodies["predict"]["results"]
    assert [r["filename"] for r in results] == ["a.png", "b.png"]
    assert all(len(r["labels"]) == 3 for r in results)
    assert ran.bodies["predict"]["model"]["name"] == "fashion-mnist"
    (emb,) = ran.bodies["embed"]["results"]
    assert len(emb["embedding"]) == 512
    assert abs(sum(x * x for x in emb["embedding"]) - 1) < 1e-3
    assert ran.bodies["stored"] == "true"


def test_the_store_lands_in_the_data_volume(ran: Run) -> None:
    assert ran.store["path"] == "/data/embeddings.sqlite3"
    assert ran.store["volume"], "/data is a volume of the container, not its root file system"
    assert ran.store["uid"] == IMAGE_UID
    assert ran.store["rows"] >= 2  # a.png and b.png (c.png too, answered while draining)


def test_sigterm_drains_and_exits_cleanly(ran: Run) -> None:
    assert ran.drain["readyz_503_after_s"] < 5, "readiness turns 503 at SIGTERM"
    assert ran.drain["predict_while_draining"] == 200, "the lame duck still answers"
    assert ran.exit_code == 0, ran.log[-2000:]
    assert "every accepted image answered" in ran.log


# ---- compose runs what ran here ----------------------------------------------------------------

@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.replicas.yml"]],
                         ids=lambda f: "+".join(f))
def test_compose_runs_what_the_image_test_ran(files: list[str], ran: Run) -> None:
    api = compose_config(files)["services"]["api"]
    config = ran.config
    assert api["image"] == TAG and api["build"]["target"] == TAG.split(":")[1]
    assert "command" not in api and "entrypoint" not in api, "the image's own CMD"
    assert "user" not in api, "the image's own USER"
    env = dict(e.split("=", 1) for e in config["Env"])
    published = [int(p["target"]) for p in api.get("ports", [])] + \
        [int(p) for p in api.get("expose", [])]
    assert {int(env["IMGREC_PORT"]), int(env["IMGREC_GRPC_PORT"])} <= set(published)
    assert {f"{p}/tcp" for p in published} <= set(config["ExposedPorts"])
    store = api["environment"]["IMGREC_EMBED_STORE"]
    if store.startswith("/"):  # SQLite: on a volume at the image's VOLUME
        (mount,) = [v for v in volumes(api) if store.startswith(v["target"] + "/")]
        assert mount["target"] in config["Volumes"] and mount["type"] == "volume"
    hc, image_hc = api["healthcheck"], config["Healthcheck"]
    assert ran.compose_healthcheck_rc["+".join(files)] == 0, "compose's health check passed"
    for key, image_key in (("interval", "Interval"), ("timeout", "Timeout"),
                           ("start_period", "StartPeriod")):
        assert compose_seconds(hc[key]) == image_hc[image_key] / 1e9, key
    assert hc["retries"] == image_hc["Retries"]
    # the model compose mounts is the one the image holds and served here
    (model,) = [v for v in volumes(api) if v["target"] == api["environment"]["IMGREC_MODEL_DIR"]]
    assert Path(model["source"]).resolve() == (REPO / "models" / "fashion-mnist").resolve()
    assert env["IMGREC_MODEL_DIR"] == "/opt/imgrec/models/fashion-mnist"
    assert compose_seconds(api["stop_grace_period"]) > ran.drain["exit_after_s"] + 5
