"""Similarity search inside Redis, with the search module (RediSearch, part of Redis Stack).

Every replica writes its vectors to the shared Redis; RediSearch indexes each one as it is
written (synchronously, within the write), so a vector stored through one replica is found
through any other as soon as its write returns. One index per store key, over the store's
per-image hashes ``{imgrec}:e:<member>`` (field ``v``: float32 bytes, ``f``: filename):

    FT.CREATE {imgrec}:idx:hnsw:<d>:<member prefix> ON HASH PREFIX 1 {imgrec}:e:<member prefix>
        SCHEMA v VECTOR HNSW 12 TYPE FLOAT32 DIM <d> DISTANCE_METRIC COSINE
               M 16 EF_CONSTRUCTION 128 EF_RUNTIME 64

HNSW, not FLAT: a FLAT index scans every vector per query (linear in the store's size). The
graph only proposes: RediSearch computes each returned distance on the stored float32 vector,
so the scores are exact cosines and the order is ours (ties by id); a search asks the graph
for at least 4k candidates (EF_RUNTIME). FLOAT32, because the indexed field is the stored
vector itself (what GET /embed returns); FLOAT16 would need a second copy of each. An index of
the earlier FLAT layout ({imgrec}:idx:<d>:<prefix>) is dropped, never its vectors, when a
store key's HNSW index is made (the store opening, or its first write or search).
A Redis server without the module (Debian's redis-server, ElastiCache without search) still
stores vectors; /search then answers 501 and the service logs why once at start.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import redis

from app.serving.store.vector_index import Neighbor, SearchUnavailable

log = logging.getLogger("imgrec.search")

NO_MODULE = ("the Redis server has no search module (RediSearch): /search is unavailable; "
             "run Redis Stack (the redis/redis-stack-server image) to search a shared store")
# the graph's parameters (connectivity, expansion at insert and at search), as the SQLite
# index's graph uses (ann_index.py) but float32 and a wider insert expansion: RediSearch's
# defaults are 16, 200 and 10, and 10 is below the 4k candidates a search wants; the recall
# measured with these is in BENCHMARKS.md (bench/search.py --redis)
HNSW_M, HNSW_EF_ADD, HNSW_EF_SEARCH = 16, 128, 64
# how long the first search of an index waits for RediSearch's scan of vectors already stored
INDEXING_WAIT_S = 30.0


class RedisSearch:
    def __init__(self, client: redis.Redis, tag: str) -> None:
        self._redis = client
        self._tag = tag
        self._indexes: set[str] = set()
        try:
            client.execute_command("FT._LIST")
            self.available = True
        except redis.ResponseError:
            self.available = False
            log.warning(NO_MODULE)

    def doc_prefix(self, member_prefix: bytes = b"") -> bytes:
        return f"{self._tag}:e:".encode() + member_prefix

    def ensure_index(self, member_prefix: bytes, dim: int) -> str:
        """The store key's index, created on first use (idempotent across replicas)."""
        name = f"{self._tag}:idx:hnsw:{dim}:" + member_prefix.decode()
        if name in self._indexes or not self.available:
            return name
        try:
            self._redis.execute_command(
                "FT.CREATE", name, "ON", "HASH", "PREFIX", 1, self.doc_prefix(member_prefix),
                "SCHEMA", "v", "VECTOR", "HNSW", 12, "TYPE", "FLOAT32", "DIM", dim,
                "DISTANCE_METRIC", "COSINE", "M", HNSW_M, "EF_CONSTRUCTION", HNSW_EF_ADD,
                "EF_RUNTIME", HNSW_EF_SEARCH)
            log.info("created the search index %s (HNSW)", name)
        except redis.ResponseError as e:
            if "already exists" not in str(e).lower():
                raise
        self._drop_flat(member_prefix, dim)
        self._wait_until_indexed(name)
        self._indexes.add(name)
        return name

    def _drop_flat(self, member_prefix: bytes, dim: int) -> None:
        """The earlier FLAT index of this store key, if any: dropped (its hashes stay)."""
        flat = f"{self._tag}:idx:{dim}:" + member_prefix.decode()
        try:
            self._redis.execute_command("FT.DROPINDEX", flat)
            log.info("dropped the FLAT search index %s: searches use the HNSW one", flat)
        except redis.ResponseError as e:
            if not _no_such_index(e):
                raise

    def _wait_until_indexed(self, name: str) -> None:
        """An index made over hashes that already exist (a restart, an upgrade's moved vectors,
        another replica's fresh index) is filled by a background scan: until it ends, a search
        would miss vectors that are stored. Wait for it, once per index and process."""
        deadline = time.monotonic() + INDEXING_WAIT_S
        delay = 0.005
        while _info(self._redis.execute_command("FT.INFO", name)).get(b"indexing") not in (
                0, b"0", "0", None):
            if time.monotonic() > deadline:
                log.warning("the search index %s is still being built after %.0f s; searches "
                            "may miss vectors until it is", name, INDEXING_WAIT_S)
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _knn(self, index: str, q: np.ndarray, n: int) -> Any:
        ef = max(HNSW_EF_SEARCH, 4 * n)
        return self._redis.execute_command(
            "FT.SEARCH", index, f"*=>[KNN {n} @v $q EF_RUNTIME {ef} AS d]", "PARAMS", 2, "q",
            q.tobytes(), "SORTBY", "d", "ASC", "RETURN", 2, "d", "f", "LIMIT", 0, n,
            "DIALECT", 2)

    def search(self, member_prefix: bytes, query: np.ndarray, k: int,
               exclude: str | None) -> list[Neighbor]:
        if not self.available:
            raise SearchUnavailable(NO_MODULE)
        q = np.ascontiguousarray(query, dtype="<f4").reshape(-1)
        if not np.any(q):
            return []  # a zero vector has no direction: nothing is similar to it
        index = self.ensure_index(member_prefix, q.shape[0])
        n = k + 1 if exclude is not None else k
        try:
            reply = self._knn(index, q, n)
        except redis.ResponseError as e:
            if not _no_such_index(e):
                raise
            # The index is gone while its hashes may not be: a Redis restarted without
            # persistence, a FLUSHALL, an operator's FT.DROPINDEX. Made again, over what is
            # stored now, instead of failing every search until this process restarts.
            log.warning("the search index %s is gone; creating it again", index)
            self._indexes.discard(index)
            index = self.ensure_index(member_prefix, q.shape[0])
            reply = self._knn(index, q, n)
        strip = len(self.doc_prefix(member_prefix))
        found: list[Neighbor] = []
        for key, values in _hits(reply):
            image_id = key[strip:].decode()
            if image_id == exclude:
                continue
            name = values.get(b"f")
            score = 1.0 - float(values[b"d"])
            found.append(Neighbor(image_id, min(1.0, max(-1.0, score)),
                                  name.decode() if name else None))
        found.sort(key=lambda n: (-n.score, n.id))
        return found[:k]


def _no_such_index(e: redis.ResponseError) -> bool:
    message = str(e).lower()
    return "no such index" in message or "unknown index name" in message


def _hits(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """(key, fields) of an FT.SEARCH reply, as RESP2 (a flat list) or RESP3 (a map) gives it."""
    if isinstance(reply, dict):
        return [(_b(hit[b"id"]), {_b(f): _b(v) for f, v in hit[b"extra_attributes"].items()})
                for hit in (reply.get(b"results") or [])]
    return [(key, dict(zip(fields[::2], fields[1::2], strict=True)))
            for key, fields in zip(reply[1::2], reply[2::2], strict=True)]


def _info(reply: Any) -> dict[bytes, Any]:
    """FT.INFO's reply as a dict, from RESP2 (a flat list of names and values) or RESP3."""
    if isinstance(reply, dict):
        return {_b(k): v for k, v in reply.items()}
    return {_b(k): v for k, v in zip(reply[::2], reply[1::2], strict=True)}


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
