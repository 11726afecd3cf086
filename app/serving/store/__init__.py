"""The embedding store: every vector the service computes, keyed by (store key, image id).

SQLite in a file is the embedded default (sqlite.py), Redis (redis_store.py) is shared between
replicas, memory (memory.py) keeps nothing across restarts; base.py says what every store is.
The circuit breaker in front of them is guard.py; the similarity index beside SQLite is
ann_index.py (HNSW, kept by ann_indexer.py, searched by sqlite_search.py), the memory store's
the exact vector_index.py, Redis's RediSearch (redis_search.py).
"""

from __future__ import annotations

from app.serving.store.base import EmbeddingStore, StoreFailure
from app.serving.store.memory import MemoryStore
from app.serving.store.sqlite import SQLiteStore

__all__ = ["EmbeddingStore", "MemoryStore", "SQLiteStore", "StoreFailure", "open_store"]


def open_store(url: str, max_items: int, timeout_s: float = 5.0,
               ann: bool = True) -> EmbeddingStore:
    """'memory', 'redis://...' / 'rediss://...', or a SQLite file path ('sqlite:///p' too).
    timeout_s bounds one call's wait on the network (Redis) or on another's lock (SQLite);
    ann: the SQLite store keeps its approximate index (off: exact scans, for a process that
    only writes, such as `imgrec index`, or to compare)."""
    if url == "memory":
        return MemoryStore(max_items)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from app.serving.store.redis_store import RedisStore

        return RedisStore(url, max_items, timeout_s=timeout_s)
    path = url.removeprefix("sqlite://") if url.startswith("sqlite://") else url
    return SQLiteStore(path, max_items, timeout_s=timeout_s, ann=ann)
