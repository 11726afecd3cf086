"""Scale-out, for real: redis-server, two `imgrec serve` replicas and nginx with deploy/nginx.conf.

All on loopback ports chosen free by the kernel. Skips when nginx or redis-server is missing on a
workstation; fails instead when CI is set (the CI machine must install both).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers.daemons import (
    LOOPBACK,
    Daemon,
    http_status,
    require_binary,
    start_nginx,
    start_redis,
    start_replica,
    wait_until,
)
from helpers.images import png_bytes

pytestmark = [pytest.mark.deploy, pytest.mark.slow]


@dataclass
class Replica:
    name: str
    daemon: Daemon
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


@dataclass
class Cluster:
    tmp: Path
    model_dir: Path
    redis_url: str
    replicas: list[Replica] = field(default_factory=list)
    nginx_port: int = 0
    daemons: list[Daemon] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.nginx_port}"

    def env(self) -> dict[str, str]:
        return {"IMGREC_EMBED_STORE": self.redis_url, "IMGREC_WARMUP_BATCHES": "1"}

    def start_replica(self, name: str) -> Replica:
        daemon, port = start_replica(name, self.tmp, self.model_dir, self.env())
        self.daemons.append(daemon)
        return Replica(name, daemon, port)

    def ensure_all_up(self) -> None:
        """Restart a replica an earlier test killed (same port: nginx's config names it), so
        that tests do not depend on their order."""
        for i, r in enumerate(self.replicas):
            if not r.daemon.alive():
                r.daemon.stop()
                daemon, _ = start_replica(r.name, self.tmp, self.model_dir, self.env(), r.port)
                self.daemons.append(daemon)
                self.replicas[i] = Replica(r.name, daemon, r.port)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, served_model_dir: Path) -> Iterator[Cluster]:
    require_binary("nginx")
    require_binary("redis-server")
    tmp = tmp_path_factory.mktemp("deploy")
    redis_daemon, url = start_redis(tmp)
    c = Cluster(tmp, served_model_dir, url, daemons=[redis_daemon])
    try:
        c.replicas = [c.start_replica("replica-a"), c.start_replica("replica-b")]
        nginx, c.nginx_port = start_nginx(tmp, [r.port for r in c.replicas])
        c.daemons.append(nginx)
        wait_until(lambda: http_status(f"{c.url}/readyz") == 200, 20, "nginx -> /readyz", nginx)
        yield c
    finally:
        # nginx first (no new requests), then the replicas, then the store they write to
        for d in reversed(c.daemons):
            d.stop()


def instance(client: httpx.Client, base_url: str) -> str:
    r = client.get(f"{base_url}/model")
    assert r.status_code == 200, r.text
    return str(r.json()["instance"])


def upload(seed: int) -> tuple[bytes, dict[str, tuple[str, bytes, str]]]:
    data = png_bytes(seed)
    return data, {"file": (f"img{seed}.png", data, "image/png")}


def test_requests_reach_both_replicas(cluster: Cluster) -> None:
    cluster.ensure_all_up()
    with httpx.Client(timeout=30) as client:
        direct = {instance(client, r.url) for r in cluster.replicas}
        assert len(direct) == 2, "the replicas must report different instances"
        seen: set[str] = set()
        deadline = time.monotonic() + 30  # a restarted replica may sit out nginx's fail_timeout
        for _ in range(200):
            seen.add(instance(client, cluster.url))
            if seen == direct or time.monotonic() > deadline:
                break
        assert seen == direct
        # uploads are spread too, and every one is answered
        for seed in range(6):
            _, files = upload(seed)
            r = client.post(f"{cluster.url}/predict", files=files)
            assert r.status_code == 200, r.text


def test_embedding_posted_on_one_replica_is_found_on_the_other(cluster: Cluster) -> None:
    cluster.ensure_all_up()
    a, b = cluster.replicas
    data, files = upload(1234)
    image_id = hashlib.sha256(data).hexdigest()
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{b.url}/embed", params={"id": image_id}).status_code == 404
        r = client.post(f"{a.url}/embed", files=files)
        assert r.status_code == 200, r.text
        posted = r.json()["results"][0]
        assert posted["id"] == image_id
        vector = np.asarray(posted["embedding"], dtype=np.float32)

        r = client.get(f"{b.url}/embed", params={"id": image_id})
        assert r.status_code == 200, r.text
        found = r.json()["results"]
        assert [x["id"] for x in found] == [image_id]
        np.testing.assert_allclose(np.asarray(found[0]["embedding"], np.float32), vector,
                                   rtol=1e-6, atol=1e-7)
        # through the balancer, whichever replica answers
        for _ in range(4):
            r = client.get(f"{cluster.url}/embed", params={"id": image_id})
            assert r.status_code == 200, r.text
        # not found is an answer, not a failure: nginx passes the 404 through, no retry
        r = client.get(f"{cluster.url}/embed", params={"id": "0" * 64})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "unknown_id"


def test_body_limit_matches_the_service(cluster: Cluster) -> None:
    with httpx.Client(timeout=30) as client:
        body = b"\0" * (32 * 1024 * 1024 + 4096)  # just over IMGREC_MAX_UPLOAD_BYTES
        r = client.post(f"{cluster.url}/predict", content=body,
                        headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "too_large"


def slow_rate_limits(text: str) -> str:
    """The shipped limits (100 r/s per client, 400 per address) at 2 r/s, bursts of 5 and 15,
    so that a test reaches them in a few dozen requests."""
    rates = {"imgrec_per_client": ("2r/s", 5), "imgrec_per_address": ("2r/s", 15)}
    for zone, (rate, burst) in rates.items():
        text, n = re.subn(rf"(zone={zone}:\S+ rate=)\S+;", rf"\g<1>{rate};", text)
        text, m = re.subn(rf"(limit_req zone={zone} burst=)\d+", rf"\g<1>{burst}", text)
        assert n == m == 1, f"deploy/nginx.conf: the {zone} limit"
    return text


def test_rate_limit_per_client(cluster: Cluster, tmp_path: Path) -> None:
    """A client over its rate gets 429 with a JSON error and Retry-After; another key from the
    same address is served meanwhile; made-up keys still meet the per-address limit."""
    cluster.ensure_all_up()
    nginx, port = start_nginx(tmp_path, [r.port for r in cluster.replicas], slow_rate_limits)
    url = f"http://{LOOPBACK}:{port}/healthz"
    try:
        with httpx.Client(timeout=30) as client:
            a = [client.get(url, headers={"Authorization": "Bearer key-a-0123456789abcdef"})
                 for _ in range(15)]
            codes = [r.status_code for r in a]
            assert codes[:5] == [200] * 5 and 429 in codes, codes
            refused = next(r for r in a if r.status_code == 429)
            assert refused.json()["error"]["code"] == "rate_limited"
            assert refused.headers["retry-after"] == "1"
            assert "key-a" not in refused.text
            # another client (key) from the same address is not held back by A's excess
            assert [client.get(url, headers={"Authorization": "Bearer key-b-0123456789ab"}
                               ).status_code for _ in range(3)] == [200] * 3
            # a new key per request: each is a fresh client, but the address has its limit
            made_up = [client.get(url, headers={"Authorization": f"Bearer made-up-{i:020d}"}
                                  ).status_code for i in range(25)]
            assert made_up[0] == 200 and 429 in made_up, made_up
    finally:
        nginx.stop()


# Last in the file: it kills a replica (later tests would restart it via ensure_all_up).
def test_replica_killed_mid_load_fails_no_request(cluster: Cluster) -> None:
    cluster.ensure_all_up()
    victim = cluster.replicas[1]
    n_threads, after_kill, time_limit_s = 4, 40, 60.0
    lock = threading.Lock()
    done = {"before": 0, "after": 0}
    failures: list[str] = []
    killed = threading.Event()
    stop = threading.Event()

    def client_loop(t: int) -> None:
        with httpx.Client(timeout=30) as client:
            for i in range(10_000):  # bounded; stop is set long before
                if stop.is_set():
                    return
                data, files = upload(10_000 * (t + 1) + i)
                path = "/predict" if i % 2 else "/embed"
                try:
                    r = client.post(f"{cluster.url}{path}", files=files)
                    ok = r.status_code == 200 and (
                        r.json()["results"][0]["id"] == hashlib.sha256(data).hexdigest())
                    detail = f"{path} -> {r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, detail = False, f"{path} -> {type(e).__name__}: {e}"
                with lock:
                    if not ok:
                        failures.append(detail)
                    done["after" if killed.is_set() else "before"] += 1

    threads = [threading.Thread(target=client_loop, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    try:
        wait_until(lambda: done["before"] >= 20, 30, "load to start")
        # SIGKILL: the crash case, connections die mid-request with no draining
        os.kill(victim.daemon.pid, signal.SIGKILL)
        killed.set()
        wait_until(lambda: done["after"] >= after_kill, time_limit_s, "load after the kill")
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=40)
    assert not any(th.is_alive() for th in threads)
    assert failures == [], f"{len(failures)} failed requests, e.g. {failures[:3]}"
    victim.daemon.proc.wait(timeout=10)
    assert not victim.daemon.alive()
    # the survivor answers everything now
    with httpx.Client(timeout=30) as client:
        survivor = instance(client, cluster.replicas[0].url)
        assert {instance(client, cluster.url) for _ in range(4)} == {survivor}
