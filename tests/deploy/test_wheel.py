"""The package as users install it: the wheel, installed without extras into a fresh venv, serves
the shipped model on the CPU with PyTorch absent, and says in one line what to install for what
needs PyTorch.

Needs the package registry (pip installs the wheel's dependencies from it, as a user's would; CI
has it): an unreachable registry fails at once, saying so, and every step is bounded in time.
Took 2-3 minutes here (the dependencies' download dominates; pip's cache makes reruns faster).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import httpx
import pytest
from helpers.daemons import LOOPBACK, Daemon, free_port, http_status, wait_until
from helpers.images import png_bytes

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = REPO / "models" / "fashion-mnist"
# what a serve-only install must not hold (the extras bring them)
NOT_FOR_SERVING = {"torch", "torchvision", "onnx", "onnxscript", "safetensors", "matplotlib"}
# a generous bound: the serve-only venv measured ~320 MB here; torch alone is 700+ MB (CPU
# wheel) or ~4.4 GB with its CUDA libraries
MAX_VENV_MB = 500


def clean_env() -> dict[str, str]:
    """This environment, less what would make the fresh venv see this checkout or this venv."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("IMGREC_")}


def run(argv: list[str], timeout_s: float, what: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              env=env or clean_env(), cwd=cwd, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what}: no end after {timeout_s:.0f} s: {e.stderr!r:.2000}")


def index_url() -> str:
    """The registry pip uses (PIP_INDEX_URL, pip's configuration, else PyPI)."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        done = run([sys.executable, "-m", "pip", "config", "get", "global.index-url"], 60,
                   "pip config")
        url = done.stdout.strip() if done.returncode == 0 else ""
    return url or "https://pypi.org/simple/"


def require_registry(url: str) -> None:
    if url.startswith("file:"):
        return
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/pip/", timeout=15):
            pass
    except OSError as e:
        pytest.fail(f"the package registry {url} is unreachable ({e}); this test installs the "
                    "wheel's dependencies from it, as a user's pip would")


def build_wheel(tmp: Path) -> Path:
    """The wheel, built from a copy of the sources (an in-tree build/ could hold stale files)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "app", src / "app", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp / "dist"
    done = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "-w", str(dist), str(src)], 300, "pip wheel")
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = dist.glob("imgrec-*.whl")
    return wheel


def venv_mb(venv: Path) -> float:
    return sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink()
               ) / 1e6


def graphless_copy(tmp: Path) -> Path:
    """The shipped model as a trainer without the export extra would leave it: no graphs."""
    root = shutil.copytree(SHIPPED_MODEL, tmp / "graphless")
    card = json.loads((root / "card.json").read_text())
    for graph in card.pop("graphs", {}).values():
        (root / graph["file"]).unlink(missing_ok=True)
    (root / "card.json").write_text(json.dumps(card, indent=2))
    return root


@pytest.mark.slow
def test_the_wheel_without_extras_serves_the_shipped_model_without_torch(tmp_path: Path) -> None:
    require_registry(index_url())
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    done = run([sys.executable, "-m", "venv", str(venv)], 120, "python -m venv")
    assert done.returncode == 0, done.stderr
    python, imgrec = venv / "bin" / "python", venv / "bin" / "imgrec"
    done = run([str(python), "-m", "pip", "install", "--timeout", "30", "--retries", "2",
                "--disable-pip-version-check", str(wheel)], 900, "pip install of the wheel")
    assert done.returncode == 0, ("pip could not install the wheel's dependencies from the "
                                  f"package registry:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")

    # PyTorch and the other extras' packages are absent; imgrec is the installed wheel's
    done = run([str(python), "-m", "pip", "list", "--format", "json"], 120, "pip list")
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(done.stdout)}
    assert not installed & NOT_FOR_SERVING, installed & NOT_FOR_SERVING
    assert not [p for p in installed if p.startswith("nvidia-")]
    done = run([str(python), "-c", "import torch"], 60, "import torch")
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr
    done = run([str(python), "-c", "import app; print(app.__file__)"], 60, "import app",
               cwd=tmp_path)
    assert done.stdout.strip().startswith(str(venv)), done.stdout
    size = venv_mb(venv)
    assert size < MAX_VENV_MB, f"the serve-only venv is {size:.0f} MB"

    # it serves the shipped model (ONNX Runtime), gRPC skin included
    port = free_port()
    env = {**clean_env(), "IMGREC_MODEL_DIR": str(SHIPPED_MODEL), "IMGREC_DEVICE": "auto",
           "IMGREC_HOST": LOOPBACK, "IMGREC_PORT": str(port), "IMGREC_GRPC_PORT": str(free_port()),
           "IMGREC_EMBED_STORE": str(tmp_path / "embeddings.sqlite3"),
           "IMGREC_TORCH_THREADS": "1"}
    server = Daemon("wheel-serve", [str(imgrec), "serve"], tmp_path, env=env, cwd=tmp_path)
    try:
        url = f"http://{LOOPBACK}:{port}"
        wait_until(lambda: http_status(url + "/readyz") == 200, 120, "/readyz", server)
        r = httpx.post(url + "/predict", files=[("file", ("a.png", png_bytes(1)))], timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["name"] == "fashion-mnist"
        assert httpx.get(url + "/model", timeout=10).json()["engine"] == "onnxruntime"
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        assert "torch" not in maps
    finally:
        server.stop()

    # what needs PyTorch says so in one line
    graphless = graphless_copy(tmp_path)
    done = run([str(imgrec), "serve"], 120, "imgrec serve of a graphless directory",
               env={**env, "IMGREC_MODEL_DIR": str(graphless)}, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and lines, done.stderr
    assert lines[-1].startswith("imgrec serve: start-up failed: ") and \
        f"imgrec export {graphless}" in lines[-1], lines[-1]
    for argv, extra in ((["export", str(graphless)], "export"), (["train", "--help"], "train")):
        done = run([str(imgrec), *argv], 60, f"imgrec {argv[0]}", cwd=tmp_path)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert lines[0].startswith(f"imgrec {argv[0]}: needs PyTorch") and \
            lines[0].endswith(f"pip install 'imgrec[{extra}]'"), lines[0]
