"""What a request must show before any route runs: a Host this server answers to, the API key, JSON.

A server on loopback is reachable from every web page the user opens: a page may POST `text/plain`
without a CORS preflight (CSRF), and a DNS name rebound to 127.0.0.1 makes the browser send the page's own
`Host` (DNS rebinding). So on a loopback bind only loopback host names (and those given with
`--allow-host`) are answered, and a POST must say `application/json`, which a page cannot send across
origins without a preflight this server never grants.
"""

from __future__ import annotations

import secrets

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = ("/health",)  # answered without the API key (probes)


def error_response(status: int, message: str, code: str, type: str = "invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape."""
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def host_name(header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1'; '[::1]:8000' -> '::1'; lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware: Host allowlist (when `allowed_hosts` is given), API key, JSON content type."""

    def __init__(self, app, api_key: str | None = None, allowed_hosts: list[str] | None = None):
        self.app, self.api_key = app, api_key
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope["method"], scope["path"], Headers(scope=scope))
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, method: str, path: str, headers: Headers) -> JSONResponse | None:
        """The error response for a request that may not reach a route, or None."""
        host = host_name(headers.get("host", ""))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return error_response(403, f"this server answers to {', '.join(sorted(self.allowed_hosts))}, not to "
                                       f"Host {host!r} (a web page may be trying to reach it); start it with "
                                       f"--allow-host {host or 'NAME'} if that name is yours", "host_not_allowed")
        if self.api_key and path not in OPEN_PATHS and not self._key_ok(headers):
            return error_response(401, "invalid API key; send 'Authorization: Bearer <key>'", "invalid_api_key")
        if method == "POST" and not _is_json(headers.get("content-type", "")):
            return error_response(415, "send the request body as JSON with 'Content-Type: application/json'",
                                  "unsupported_media_type")
        return None

    def _key_ok(self, headers: Headers) -> bool:
        given = headers.get("authorization", "")
        return secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"
