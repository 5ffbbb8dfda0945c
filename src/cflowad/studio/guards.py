"""The studio's guards, as ASGI middleware: the CSRF token on every state-changing API
request, and, with an API key, the login that the page needs (an HttpOnly cookie) and
the key that scripts send (``Authorization: Bearer``)."""

from __future__ import annotations

import hashlib
import hmac

from cflowad.line.server import ASGIApp, Receive, Scope, Send, send_json

__all__ = ["COOKIE", "CsrfGuard", "LoginGuard", "csrf_token", "session_token"]

COOKIE = "cflowad_studio"
_SAFE = ("GET", "HEAD", "OPTIONS")


def csrf_token(secret: str) -> str:
    """The page's CSRF token: an HMAC of the workspace's secret, so a tab survives a restart."""
    return hmac.new(secret.encode(), b"csrf", hashlib.sha256).hexdigest()


def session_token(api_key: str) -> str:
    """The login cookie's value: an HMAC of the key, never the key itself."""
    return hmac.new(api_key.encode(), b"studio-session", hashlib.sha256).hexdigest()


class CsrfGuard:
    """State-changing requests to /studio/api need the page's token in X-CSRF-Token
    (a script with the API key in Authorization needs none: a browser cannot send it
    cross-site)."""

    def __init__(self, app: ASGIApp, token: str, api_key: str | None) -> None:
        self.app, self.token = app, token.encode()
        self.bearer = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] not in _SAFE
            and scope["path"].startswith("/studio/api/")
        ):
            headers = dict(scope["headers"])
            bearer = self.bearer is not None and hmac.compare_digest(
                headers.get(b"authorization", b""), self.bearer
            )
            if not bearer and not hmac.compare_digest(
                headers.get(b"x-csrf-token", b""), self.token
            ):
                await send_json(
                    send, 403, {"error": "missing or stale CSRF token: reload the page"}
                )
                return
        await self.app(scope, receive, send)


class LoginGuard:
    """With an API key: the page needs the login cookie, the API the cookie or the key."""

    def __init__(self, app: ASGIApp, api_key: str, session: str) -> None:
        self.app = app
        self.bearer = f"Bearer {api_key}".encode()
        self.session = session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in ("/healthz", "/studio/login"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        cookies = _cookies(headers.get(b"cookie", b"").decode("latin-1"))
        if hmac.compare_digest(headers.get(b"authorization", b""), self.bearer) or (
            hmac.compare_digest(cookies.get(COOKIE, ""), self.session)
        ):
            await self.app(scope, receive, send)
            return
        if path in ("/", "/studio") and scope["method"] == "GET":
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [(b"location", b"/studio/login")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await send_json(
            send,
            401,
            {"error": "log in at /studio/login, or send Authorization: Bearer <key>"},
            [(b"www-authenticate", b"Bearer")],
        )


def _cookies(header: str) -> dict[str, str]:
    found = {}
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key:
            found[key] = value
    return found
