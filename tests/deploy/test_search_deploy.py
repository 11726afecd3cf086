"""Search across replicas, for real: a Redis server with the search module, two `imgrec serve`
replicas and nginx with deploy/nginx.conf. A vector stored through one replica is found through
the other, and through nginx."""

from __future__ import annotations

from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory,
             served_model_dir: Path) -> Iterator[tuple[list[str], str]]:
    require_binary("nginx")
    tmp = tmp_path_factory.mktemp("search-deploy")
    daemons: list[Daemon] = []
    try:
        redis_daemon, url = start_redis(tmp, search=True)
        daemons.append(redis_daemon)
        env = {"IMGREC_EMBED_STORE": url, "IMGREC_WARMUP_BATCHES": "1"}
        ports = []
        for name in ("replica-a", "replica-b"):
            daemon, port = start_replica(name, tmp, served_model_dir, env, timeout_s=180)
            daemons.append(daemon)
            ports.append(port)
        nginx, nginx_port = start_nginx(tmp, ports)
        daemons.append(nginx)
        front = f"http://{LOOPBACK}:{nginx_port}"
        wait_until(lambda: http_status(f"{front}/readyz") == 200, 20, "nginx -> /readyz", nginx)
        yield [f"http://{LOOPBACK}:{p}" for p in ports], front
    finally:
        for d in reversed(daemons):
            d.stop()


def test_stored_through_one_replica_found_through_the_other(
        replicas: tuple[list[str], str]) -> None:
    (a, b), front = replicas
    with httpx.Client(timeout=10) as c:
        seen = c.post(f"{a}/embed", files=[("file", (f"shelf/{n}.png", png_bytes(100 + n)))
                                            for n in range(5)])
        assert seen.status_code == 200, seen.text
        catalogue = [x["id"] for x in seen.json()["results"]]
        # a new photo through replica B: its neighbours are the five stored through A
        r = c.post(f"{b}/search", params={"k": 5},
                   files=[("file", ("query.png", png_bytes(200)))])
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert sorted(n["id"] for n in result["neighbors"]) == sorted(catalogue)
        assert {n["filename"] for n in result["neighbors"]} == \
            {f"shelf/{n}.png" for n in range(5)}
        # and the query image, stored through B, is found by id through A (polled: how soon is
        # a figure for a benchmark, not something a test on a shared machine can assert)
        found: list[httpx.Response] = []

        def found_through_a() -> bool:
            found[:] = [c.get(f"{a}/search", params={"id": result["id"], "k": 3})]
            return found[0].status_code == 200

        wait_until(found_through_a, 20, "the query stored through B to be found through A",
                   interval_s=0.02)
        r = found[0]
        assert r.json()["results"][0]["filename"] == "query.png"
        # through nginx, whichever replica answers, the ranking is the same
        rankings = {tuple(n["id"] for n in c.get(f"{front}/search",
                                                   params={"id": catalogue[0], "k": 4})
                          .json()["results"][0]["neighbors"]) for _ in range(4)}
        assert len(rankings) == 1 and len(next(iter(rankings))) == 4


def test_hnsw_search_through_nginx_matches_exact(replicas: tuple[list[str], str]) -> None:
    """RediSearch's HNSW index behind both replicas: neighbours through nginx against exact
    cosine over the stored vectors (recall@10 and the scores)."""
    (a, _), front = replicas
    with httpx.Client(timeout=10) as c:
        ids: list[str] = []
        for lo in (0, 20):
            r = c.post(f"{a}/embed", files=[("file", (f"hnsw/{n}.png", png_bytes(300 + n)))
                                             for n in range(lo, lo + 20)])
            assert r.status_code == 200, r.text
            ids += [x["id"] for x in r.json()["results"]]
        hits = 0
        for image_id in ids[:8]:
            stored = c.get(f"{front}/search", params={"id": image_id, "k": 100}).json()
            universe = [image_id] + [n["id"] for n in stored["results"][0]["neighbors"]]
            vectors = c.get(f"{front}/embed", params=[("id", i) for i in universe]).json()
            x = np.array([v["embedding"] for v in vectors["results"]], dtype=np.float64)
            s = x[1:] @ x[0] / (np.linalg.norm(x[1:], axis=1) * np.linalg.norm(x[0]))
            want = sorted(zip(universe[1:], s.tolist(), strict=True),
                          key=lambda t: (-t[1], t[0]))[:10]
            got = c.get(f"{front}/search", params={"id": image_id, "k": 10}).json()
            neighbors = got["results"][0]["neighbors"]
            hits += len({n["id"] for n in neighbors} & {i for i, _ in want})
            scores = dict(want)
            for n in neighbors:
                if n["id"] in scores:
                    assert n["score"] == pytest.approx(scores[n["id"]], abs=1e-4)
        assert hits / 80 >= 0.95
