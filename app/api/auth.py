"""API keys: `Authorization: Bearer <key>` on every inference and store route, one store
namespace per key.

Optional: only with IMGREC_API_KEYS_FILE. The file holds one key per line; `#` starts a comment
(a whole line or the end of one: `#` is not a bearer-token character), blank lines are ignored.
It is re-read on SIGHUP (``reload``, called by app/main.py's handler); a file that does not load
(missing, empty, a malformed line) keeps the keys loaded before, with a log line naming the
line, never a key.

The check is an ASGI middleware outside the fast path (app/api/fastpath.py), so it covers every
route but those the route table (app/api/route_table.py) says are open; the Open Inference
Protocol's REST skin (app/api/oip/rest.py) and gRPC check the same ``KeyRing`` themselves, so
that their refusals are in their own protocol's terms. A key is compared as its sha256 digest,
with hmac.compare_digest against every known digest (constant time, no early exit). A good
key's namespace, a stable non-secret id (the first 16 hex digits of its sha256), goes to
``scope["state"]["namespace"]``, which the routes read as ``request.state.namespace``: the
embedding store keeps each namespace apart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_response
from app.api.route_table import is_open
from app.serving.metrics import Metrics

log = logging.getLogger("imgrec.auth")

# RFC 6750's b64token: what may follow "Bearer "
TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
MIN_KEY_CHARS = 16
REALM = 'Bearer realm="imgrec"'

class KeyFileError(ValueError):
    """The keys file cannot be used (the message names the line, never the key)."""


def namespace_of_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def parse_keys(text: str) -> list[str]:
    keys: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.split("#", 1)[0].strip()
        if not key:
            continue
        if not TOKEN.match(key):
            raise KeyFileError(f"line {number}: not a bearer token (letters, digits and "
                               "-._~+/ only, one key per line)")
        if len(key) < MIN_KEY_CHARS:
            raise KeyFileError(f"line {number}: a key must have at least {MIN_KEY_CHARS} "
                               "characters")
        keys.append(key)
    if not keys:
        raise KeyFileError("no keys in the file (every request would be refused)")
    return keys


class Unauthorized(Exception):
    def __init__(self, message: str, challenge: str) -> None:
        super().__init__(message)
        self.message = message
        self.challenge = challenge  # the WWW-Authenticate value


class KeyRing:
    """The keys of one file, as (sha256 digest, namespace) pairs; swapped whole on reload."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries = self._load()  # raises KeyFileError at start-up
        log.info("API keys: %d loaded from %s", len(self._entries), path)

    def __len__(self) -> int:
        return len(self._entries)

    def _load(self) -> tuple[tuple[bytes, str], ...]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KeyFileError(f"cannot read it: {type(e).__name__}: {e}") from None
        entries = {hashlib.sha256(k.encode()).digest(): namespace_of_key(k)
                   for k in parse_keys(text)}
        return tuple(entries.items())

    def reload(self) -> bool:
        """Re-read the file; on any problem keep the keys loaded before (and say so)."""
        try:
            entries = self._load()
        except KeyFileError as e:
            log.error("API keys not reloaded from %s: %s; still using the %d keys loaded "
                      "before", self.path, e, len(self._entries))
            return False
        self._entries = entries
        log.info("API keys reloaded from %s: %d keys", self.path, len(entries))
        return True

    def check(self, authorization: str | None) -> str:
        """The namespace of the bearer key in this Authorization value, or Unauthorized."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("this route needs an API key: send `Authorization: Bearer <key>`",
                               REALM)
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for known, namespace in self._entries:  # every entry, whether or not one matched
            if hmac.compare_digest(known, digest):
                found = namespace
        if found is None:
            raise Unauthorized("the API key is not valid", f'{REALM}, error="invalid_token"')
        return found


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: KeyRing, metrics: Metrics) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        authorization = next((v.decode("latin-1") for k, v in scope["headers"]
                              if k == b"authorization"), None)
        try:
            namespace = self.keys.check(authorization)
        except Unauthorized as e:
            self.metrics.rejections.labels("unauthorized").inc()
            response = error_response(401, "unauthorized", e.message,
                                      {"WWW-Authenticate": e.challenge})
            await response(scope, receive, send)
            return
        # A new state dict in the same scope: some servers share one dict between requests
        # (asgi-lifespan's), and the outer middleware reads this scope's state afterwards.
        scope["state"] = {**(scope.get("state") or {}), "namespace": namespace}
        await self.app(scope, receive, send)
