"""Build and run imgrec's images without Docker: buildah, on the stand-in base that
deploy/standin-base.sh imports under the official name (python:3.11-slim-bookworm).

    python deploy/images.py build [--target cpu|gpu] [--build-arg K=V ...]
    python deploy/images.py run [--target cpu] [--port 8000]

`build` prints one JSON line: the tag, the build's wall time, the image's size and its layers.
`run` runs the image's own CMD as its own user (USER) with its own environment; only the address
and ports are set, as `docker run -p` would publish them: chroot isolation shares the host's
network. Needs root, buildah and debootstrap (./dev setup installs them). The pip settings the
build needs (the CA bundle of this machine's TLS proxy, an index URL) reach the build as the
secrets `pip.conf` and `pip-ca.crt`, mounted for each pip step only and never in a layer.
Storage lives in IMGREC_IMAGE_CACHE (default /var/tmp/imgrec-images), outside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("IMGREC_IMAGE_CACHE", "/var/tmp/imgrec-images"))
BASE_SCRIPT = REPO / "deploy" / "standin-base.sh"
ISOLATION = ["--isolation", "chroot"]


def buildah_argv(*args: str) -> list[str]:
    driver = (CACHE / "driver").read_text().strip() if (CACHE / "driver").exists() else "vfs"
    return ["buildah", "--root", str(CACHE / "storage"), "--runroot", str(CACHE / "run"),
            "--storage-driver", driver, *args]


def buildah(*args: str, timeout: float = 120) -> str:
    r = subprocess.run(buildah_argv(*args), capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"buildah {' '.join(args[:2])}: {r.stderr.strip()[-2000:]}")
    return r.stdout.strip()


def ensure_base(log: Path, timeout: float) -> None:
    """The stand-in base in storage (made by debootstrap once, then reused from the cache)."""
    with log.open("ab") as out:
        subprocess.run(["bash", str(BASE_SCRIPT)], stdout=out, stderr=out, check=True,
                       timeout=timeout)


def host_ca_bundle() -> Path:
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                      "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("no CA bundle for pip (set PIP_CERT)")


def pip_secrets(workdir: Path) -> list[str]:
    """--secret arguments: a pip.conf with this machine's CA bundle and, if one is set, an
    http(s) index URL (file:// indexes of the host do not exist inside the build)."""
    lines = ["[global]", "cert = /run/secrets/pip-ca.crt"]
    index = os.environ.get("PIP_INDEX_URL", "")
    if index.startswith(("http://", "https://")):
        lines.append(f"index-url = {index}")
    conf = workdir / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    return ["--secret", f"id=pip.conf,src={conf}",
            "--secret", f"id=pip-ca.crt,src={host_ca_bundle()}"]


def prune_if_large(limit_gb: float = 20) -> None:
    """Every build of changed sources leaves the last image's layers behind; past limit_gb of
    storage, drop the images no tag names (the layer cache goes with them: one cold build)."""
    r = subprocess.run(["du", "-sxk", str(CACHE / "storage")], capture_output=True, text=True,
                       timeout=120)
    if r.returncode == 0 and int(r.stdout.split()[0]) > limit_gb * 1e6:
        subprocess.run(buildah_argv("rm", "--all"), capture_output=True, timeout=300)
        subprocess.run(buildah_argv("rmi", "--prune"), capture_output=True, timeout=600)


def build(target: str, tag: str, log: Path, build_args: Sequence[str] = (),
          timeout: float = 900) -> float:
    """buildah bud of the Dockerfile, unchanged, with the cached layers; its wall time."""
    prune_if_large()
    with tempfile.TemporaryDirectory() as tmp, log.open("ab") as out:
        argv = buildah_argv("bud", *ISOLATION, "--pull=never", "--format", "docker",
                            "--layers", "--target", target, "-t", tag,
                            *pip_secrets(Path(tmp)),
                            *[a for kv in build_args for a in ("--build-arg", kv)], str(REPO))
        start = time.monotonic()
        r = subprocess.run(argv, stdout=out, stderr=out, timeout=timeout)
        seconds = time.monotonic() - start
    if r.returncode:
        raise RuntimeError(f"buildah bud --target {target} failed ({r.returncode}), see {log}")
    return seconds


def inspect(tag: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(buildah("inspect", "--type", "image", tag))
    return info


def image_size(tag: str) -> int:
    """Bytes of the image's layers as stored (uncompressed), summed over `buildah images`."""
    rows = json.loads(buildah("images", "--json", tag))
    (row,) = [r for r in rows if any(n.endswith(tag) for n in r.get("names") or [])]
    # buildah's JSON spells the size for people ("518 MB"); the unit is SI
    number, unit = row["size"].split()
    scale = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    return int(float(number) * scale)


def report(tag: str, seconds: float | None = None) -> dict[str, Any]:
    info = inspect(tag)
    history = info["Docker"]["history"]
    return {"tag": tag, "build_s": None if seconds is None else round(seconds, 1),
            "size_mb": round(image_size(tag) / 1e6),
            "layers": len(info["Docker"]["rootfs"]["diff_ids"]),
            "steps": len(history),
            "base": info["Docker"]["config"]["Labels"].get("imgrec.standin") and "stand-in"}


def container(tag: str) -> str:
    """A working container of the image (buildah from), named after it."""
    return buildah("from", "--pull=never", tag)


def run_argv(ctr: str, cmd: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
    """`buildah run` of cmd in the container: the image's USER, WORKDIR and ENV apply; env
    adds to the environment (as `docker run -e`)."""
    extra = [a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")]
    return buildah_argv("run", *ISOLATION, *extra, ctr, "--", *cmd)


def remove(ctr: str) -> None:
    subprocess.run(buildah_argv("rm", ctr), capture_output=True, timeout=60)


def _cli() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    b.add_argument("--build-arg", action="append", default=[])
    r = sub.add_parser("run")
    r.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    r.add_argument("--port", type=int, default=8000)
    a = p.parse_args()
    if not shutil.which("buildah"):
        print("buildah is missing: ./dev setup installs it (as root)", file=sys.stderr)
        return 1
    tag = f"imgrec:{a.target}"
    log = CACHE / f"build-{a.target}.log"
    CACHE.mkdir(parents=True, exist_ok=True)
    if a.cmd == "build":
        start = time.monotonic()
        ensure_base(log, timeout=1800)
        base_s = time.monotonic() - start
        seconds = build(a.target, tag, log, a.build_arg, timeout=7200)
        print(json.dumps({**report(tag, seconds), "base_s": round(base_s, 1), "log": str(log)}))
        return 0
    ctr = container(tag)
    try:
        cmd = inspect(tag)["Docker"]["config"]["Cmd"]
        env = {"IMGREC_HOST": "127.0.0.1", "IMGREC_PORT": str(a.port),
               "IMGREC_GRPC_PORT": str(a.port + 1)}
        return subprocess.run(run_argv(ctr, cmd, env)).returncode
    finally:
        remove(ctr)


if __name__ == "__main__":
    sys.exit(_cli())
