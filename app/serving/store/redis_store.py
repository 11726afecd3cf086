"""The embedding store in Redis: one store shared by every replica behind the load balancer.

Chosen with IMGREC_EMBED_STORE=redis://host:port/db. All keys under one hash tag so that a
Redis Cluster keeps them in one slot and the Lua script may touch them together:

    {imgrec}:e:<member>  HASH  v -> float32 little-endian bytes of the vector, f -> filename
    {imgrec}:order  ZSET  member scored by its insertion number (oldest = lowest score)
    {imgrec}:seq    STRING counter handing out insertion numbers
    {imgrec}:vec    HASH  member -> vector bytes: the layout before per-image hashes (which the
                    search module needs: it indexes keys). Its entries are moved to their own
                    hashes when a store opens and are still read if an older replica wrote some.

A member is "<len(model)>:<model>:<id>", unambiguous whatever the model and id strings hold.
Writes run as one Lua script, so concurrent replicas never see a vector without its order entry,
a re-put refreshes an entry's age atomically, and the bound holds after every call. Redis itself
must not evict these keys on its own (run it with `maxmemory-policy noeviction`, as the compose
file does): a memory-pressure eviction of the whole hash would silently drop every vector.
Redis's own failures (unreachable, timeouts, loading, read-only replica, out of memory) are
raised as StoreFailure (_is_failure); any other error reply is a bug.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager

import numpy as np
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from app.serving.store.base import store_failures, to_blob, unique_items
from app.serving.store.redis_search import RedisSearch
from app.serving.store.vector_index import Neighbor

log = logging.getLogger("imgrec.store")

# KEYS: old-layout vec hash, order zset, seq counter. ARGV: max_items, the per-image key
# prefix, then member/blob/filename triples ('' = no filename given: keep the stored one).
# Eviction goes in chunks: Lua's unpack() has a stack limit of a few thousand values, and a
# lowered max_items on restart may need to drop many entries at once. The per-image keys carry
# the same hash tag, so they live in the script's slot.
_PUT_SCRIPT = """
local max_items = tonumber(ARGV[1])
local prefix = ARGV[2]
for i = 3, #ARGV, 3 do
    local seq = redis.call('INCR', KEYS[3])
    local doc = prefix .. ARGV[i]
    redis.call('HSET', doc, 'v', ARGV[i + 1])
    if ARGV[i + 2] ~= '' then redis.call('HSET', doc, 'f', ARGV[i + 2]) end
    redis.call('ZADD', KEYS[2], seq, ARGV[i])
end
local excess = redis.call('ZCARD', KEYS[2]) - max_items
while excess > 0 do
    local n = math.min(excess, 1000)
    local old = redis.call('ZRANGE', KEYS[2], 0, n - 1)
    for _, member in ipairs(old) do redis.call('DEL', prefix .. member) end
    redis.call('HDEL', KEYS[1], unpack(old))
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - 1)
    excess = excess - n
end
return redis.call('ZCARD', KEYS[2])
"""

# KEYS: old-layout vec hash. ARGV: the per-image key prefix, then members to move.
_MIGRATE_SCRIPT = """
for i = 2, #ARGV do
    local blob = redis.call('HGET', KEYS[1], ARGV[i])
    if blob then
        local doc = ARGV[1] .. ARGV[i]
        if redis.call('EXISTS', doc) == 0 then redis.call('HSET', doc, 'v', blob) end
        redis.call('HDEL', KEYS[1], ARGV[i])
    end
end
return #ARGV - 1
"""


# Redis's own failures, not our code's: unreachable, timed out, still loading its data, a
# replica that takes no writes, out of memory (the store's "disk full"), a cluster without
# quorum, an ACL that refuses us. Any other ResponseError (a wrong command, a script error) is
# a bug, except these replies redis-py does not map to a class of their own:
_FAILURES = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError,
             redis.exceptions.OutOfMemoryError, redis.exceptions.ClusterError,
             redis.exceptions.TryAgainError, redis.exceptions.NoPermissionError, OSError)
_FAILURE_REPLIES = ("MISCONF", "BUSY ", "LOADING", "MASTERDOWN", "NOREPLICAS")


def _is_failure(e: Exception) -> bool:
    return isinstance(e, _FAILURES) or (
        isinstance(e, redis.ResponseError) and str(e).startswith(_FAILURE_REPLIES))


def _failures() -> AbstractContextManager[None]:
    return store_failures(_is_failure)


def _member_prefix(model: str) -> bytes:
    return f"{len(model)}:{model}:".encode()


def _member(model: str, image_id: str) -> bytes:
    return _member_prefix(model) + image_id.encode()


class RedisStore:
    """A bounded (model, id) -> float32 vector map in Redis; the oldest entries are evicted.
    Redis's own failures (_is_failure) are raised as StoreFailure."""

    def __init__(self, url: str, max_items: int, prefix: str = "imgrec",
                 timeout_s: float = 5.0) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.max_items = max_items
        tag = "{" + prefix + "}"
        self._keys = [f"{tag}:vec", f"{tag}:order", f"{tag}:seq"]
        # A connection pool makes one client safe to share between the service's worker
        # threads. Two quick retries on a broken connection ride out a Redis restart (the
        # pooled sockets are dead, a fresh one works) or a fail-over blip; re-running the put
        # script is harmless (it only stores the same vectors again). A timeout is not
        # retried: that would multiply the wait of a hung Redis. Longer outages are the
        # circuit breaker's business (guard.py), which stops calling and probes.
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2,
                        supported_errors=(redis.ConnectionError,)),
            retry_on_error=[redis.ConnectionError])
        self._put = self._redis.register_script(_PUT_SCRIPT)
        with _failures():
            # Fail at start-up, not at the first request, when Redis is unreachable.
            self._redis.ping()
            self._search = RedisSearch(self._redis, tag)
            self._doc = self._search.doc_prefix()
            self._migrate()

    def _migrate(self, chunk: int = 500) -> None:
        """Move vectors of the old single-hash layout to per-image hashes (idempotent)."""
        if not self._redis.hlen(self._keys[0]):
            return
        move = self._redis.register_script(_MIGRATE_SCRIPT)
        moved = 0
        members = self._redis.hkeys(self._keys[0])
        for n in range(0, len(members), chunk):
            moved += int(move(keys=self._keys[:1], args=[self._doc, *members[n:n + chunk]]))
        log.info("moved %d vectors to per-image hashes", moved)

    def put_many(self, model: str, items: Sequence[tuple[str, np.ndarray]],
                 filenames: Sequence[str | None] | None = None) -> None:
        # each id once: the script would store a repeated one correctly too (its ZADD moves
        # the member, ZCARD counts it once), but the stores agree on one rule, checked here
        batch = unique_items(items, filenames)
        if not batch.ids:
            return
        args: list[bytes | int] = [self.max_items, self._doc]
        for image_id, vec, name in zip(batch.ids, batch.vectors, batch.names, strict=True):
            args += [_member(model, image_id), to_blob(vec), (name or "").encode()]
        with _failures():
            if self._search.available:  # before the write: the index sees it as it lands
                self._search.ensure_index(_member_prefix(model), len(batch.vectors[0]))
            self._put(keys=self._keys, args=args)

    def get_many(self, model: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        with _failures():
            if not ids:
                return {}
            members = [_member(model, i) for i in ids]
            pipe = self._redis.pipeline(transaction=False)
            for m in members:
                pipe.hget(self._doc + m, "v")
            blobs = pipe.execute()
            missing = [n for n, b in enumerate(blobs) if not isinstance(b, bytes)]
            if missing:  # written by an older replica in the single-hash layout
                old = self._redis.hmget(self._keys[0], [members[n] for n in missing])
                for n, b in zip(missing, old, strict=True):
                    blobs[n] = b
            return {i: np.frombuffer(b, dtype="<f4")
                    for i, b in zip(ids, blobs, strict=True) if isinstance(b, bytes)}

    def search(self, model: str, query: np.ndarray, k: int,
               exclude: str | None = None) -> list[Neighbor]:
        with _failures():
            return self._search.search(_member_prefix(model), query, k, exclude)

    def filenames(self, model: str, ids: Sequence[str]) -> dict[str, str | None]:
        with _failures():
            if not ids:
                return {}
            members = [_member(model, i) for i in ids]
            pipe = self._redis.pipeline(transaction=False)
            for m in members:
                pipe.exists(self._doc + m)
                pipe.hget(self._doc + m, "f")
            replies = pipe.execute()
            stored, names = replies[::2], replies[1::2]
            missing = [n for n, there in enumerate(stored) if not there]
            if missing:  # an older replica's single-hash layout keeps no filenames
                old = self._redis.hmget(self._keys[0], [members[n] for n in missing])
                for n, blob in zip(missing, old, strict=True):
                    stored[n] = isinstance(blob, bytes)
            return {i: name.decode() if isinstance(name, bytes) else None
                    for i, there, name in zip(ids, stored, names, strict=True) if there}

    def count(self) -> int:
        with _failures():
            return int(self._redis.zcard(self._keys[1]))

    def ping(self) -> None:
        with _failures():
            self._redis.ping()

    def close(self) -> None:
        self._redis.close()
