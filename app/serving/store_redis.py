"""The embedding store in Redis: one store shared by every replica behind the load balancer.

Chosen with IMGREC_EMBED_STORE=redis://host:port/db. Three keys, all under one hash tag so that
a Redis Cluster keeps them in one slot and the Lua script may touch them together:

    {imgrec}:vec    HASH  member -> float32 little-endian bytes of the vector
    {imgrec}:order  ZSET  member scored by its insertion number (oldest = lowest score)
    {imgrec}:seq    STRING counter handing out insertion numbers

A member is "<len(model)>:<model>:<id>", unambiguous whatever the model and id strings hold.
Writes run as one Lua script, so concurrent replicas never see a vector without its order entry,
a re-put refreshes an entry's age atomically, and the bound holds after every call. Redis itself
must not evict these keys on its own (run it with `maxmemory-policy noeviction`, as the compose
file does): a memory-pressure eviction of the whole hash would silently drop every vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# KEYS: vec hash, order zset, seq counter. ARGV: max_items, then member/blob pairs.
# Eviction goes in chunks: Lua's unpack() has a stack limit of a few thousand values, and a
# lowered max_items on restart may need to drop many entries at once.
_PUT_SCRIPT = """
local max_items = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
    local seq = redis.call('INCR', KEYS[3])
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('ZADD', KEYS[2], seq, ARGV[i])
end
local excess = redis.call('ZCARD', KEYS[2]) - max_items
while excess > 0 do
    local n = math.min(excess, 1000)
    local old = redis.call('ZRANGE', KEYS[2], 0, n - 1)
    redis.call('HDEL', KEYS[1], unpack(old))
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - 1)
    excess = excess - n
end
return redis.call('ZCARD', KEYS[2])
"""


def _member(model: str, image_id: str) -> bytes:
    return f"{len(model)}:{model}:{image_id}".encode()


class RedisStore:
    """A bounded (model, id) -> float32 vector map in Redis; the oldest entries are evicted."""

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
        # circuit breaker's business (store_guard.py), which stops calling and probes.
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2,
                        supported_errors=(redis.ConnectionError,)),
            retry_on_error=[redis.ConnectionError])
        self._put = self._redis.register_script(_PUT_SCRIPT)
        # Fail at start-up, not at the first request, when Redis is unreachable.
        self._redis.ping()

    def put_many(self, model: str, items: Sequence[tuple[str, np.ndarray]]) -> None:
        if not items:
            return
        args: list[bytes | int] = [self.max_items]
        for image_id, vec in items:
            args += [_member(model, image_id),
                     np.ascontiguousarray(vec, dtype="<f4").tobytes()]
        self._put(keys=self._keys, args=args)

    def get_many(self, model: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        if not ids:
            return {}
        blobs = self._redis.hmget(self._keys[0], [_member(model, i) for i in ids])
        return {i: np.frombuffer(b, dtype="<f4")
                for i, b in zip(ids, blobs, strict=True) if isinstance(b, bytes)}

    def count(self) -> int:
        return int(self._redis.zcard(self._keys[1]))

    def ping(self) -> None:
        self._redis.ping()

    def close(self) -> None:
        self._redis.close()
