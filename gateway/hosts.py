"""The Host-header check that guards a gateway without keys against DNS rebinding.

With auth off, anything that can make a browser send a request to the gateway's address could
use it: a page on ``evil.example`` whose name resolves to 127.0.0.1 sends ``Host: evil.example``.
Only the names in :meth:`GatewaySettings.allowed_hosts` are served (loopback names by default);
others get a 400 in the OpenAI error shape. With keys set, the keys guard and any host is served.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.error_responses import BadRequestError, to_error_response


def host_name(header: str) -> str:
    """``example.com:8080`` -> ``example.com``; ``[::1]:8080`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Exact names, or ``*.example.com`` for any subdomain."""
    return any(host == name or (name.startswith("*.") and host.endswith(name[1:])) for name in allowed)


class TrustedHostMiddleware:
    """400 for a Host header not in `allowed` (HTTP requests only; lifespan passes through)."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if not host_allowed(host, self.allowed):
                error = BadRequestError(
                    f"host {host!r} is not served while auth is off; add it to GATEWAY_TRUSTED_HOSTS or set API keys",
                    code="untrusted_host",
                )
                await to_error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
