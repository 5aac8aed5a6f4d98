"""CORS as llama-server answers it: every route answers a browser's preflight (OPTIONS, no API key needed) and
every response names the origin allowed to read it.

The policy is `--cors-origins`: '*' (llama-server's default: any origin; with credentials allowed, the request's
Origin is echoed back, as a browser requires), 'localhost' (the Origin is echoed only when it is
http(s)://localhost, 127.0.0.1 or [::1] on any port; look-alikes such as localhost.evil.com are not), a
comma-separated list of origins (the Origin is echoed when it is one of them), or '' (no CORS headers: browsers
on other origins are blocked).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_METHODS = "GET, POST, DELETE, OPTIONS"
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:\d{1,5})?$", re.IGNORECASE)


@dataclass(frozen=True)
class CorsPolicy:
    origins: str = "*"                 # '*', 'localhost', '' or a comma-separated list of origins
    methods: str = DEFAULT_METHODS
    headers: str = "*"
    credentials: bool = True

    @staticmethod
    def parse_origins(text: str) -> str:
        """--cors-origins checked: a malformed origin is a ValueError naming it and the form expected."""
        text = text.strip()
        if text in ("*", "localhost", ""):
            return text
        items = [o.strip() for o in text.split(",")]
        for o in items:
            if o in ("*", "localhost"):
                raise ValueError(f"{o!r} stands alone; it cannot be part of a list ({text!r})")
            if not _ORIGIN.match(o) or not _port_ok(o):
                raise ValueError(f"{o!r} is not an origin; write scheme://host[:port] with no path, e.g. "
                                 "http://localhost:3000 (or '*', 'localhost')")
        return ",".join(o.rstrip("/").lower() for o in items)

    def allowed(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for a request from `origin` (None: no header)."""
        if self.origins == "*":
            return origin if self.credentials and origin else "*"
        if not origin:
            return None
        if self.origins == "localhost":
            return origin if origin_is_localhost(origin) else None
        return origin if origin.lower() in self.origins.split(",") else None


def _port_ok(origin: str) -> bool:
    try:
        urlsplit(origin).port
    except ValueError:
        return False
    return True


def origin_is_localhost(origin: str) -> bool:
    """http(s)://localhost, 127.0.0.1 or [::1], any port, nothing else (no userinfo, path or look-alike host)."""
    if not _ORIGIN.match(origin) or not _port_ok(origin):
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.hostname in ("localhost", "127.0.0.1", "::1")


class CorsMiddleware:
    """Plain ASGI (see _CountAndAuthorize for why not BaseHTTPMiddleware); sits outside the API-key check, since
    browsers send no Authorization header on a preflight."""

    def __init__(self, app, policy: CorsPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.policy.origins and scope["method"] != "OPTIONS":
            return await self.app(scope, receive, send)
        policy = self.policy
        origin = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"origin"), None)
        allow = policy.allowed(origin)
        extra = [(b"access-control-allow-origin", allow.encode("latin-1"))] if allow else []
        if policy.origins not in ("*", "") or allow not in (None, "*"):
            extra.append((b"vary", b"Origin"))
        if scope["method"] == "OPTIONS":
            extra += [(b"access-control-allow-credentials", b"true" if policy.credentials else b"false"),
                      (b"access-control-allow-methods", policy.methods.encode("latin-1")),
                      (b"access-control-allow-headers", policy.headers.encode("latin-1")),
                      (b"content-type", b"text/html"), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 200, "headers": extra})
            return await send({"type": "http.response.body", "body": b""})

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)
        return await self.app(scope, receive, send_with_cors)
