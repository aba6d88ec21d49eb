"""The ASGI gate before any route: the API key and the body's size are checked before the body is read.

A key is compared with ``hmac.compare_digest``; a body past ``max_body_size``
gets 413 without being held whole. Both answer in OpenAI's error shape.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from gpt2lite.serve.errors import KINDS, error_response

__all__ = ["PUBLIC_PATHS", "AccessGate"]

PUBLIC_PATHS = ("/health", "/metrics", "/")  # served without the API key


class AccessGate:
    """ASGI middleware: the API key and the body's size are checked before the body is read."""

    def __init__(self, app: Any, api_key: str | None, max_body_size: int) -> None:
        self.app = app
        self.key = api_key.encode() if api_key is not None else None
        self.limit = max_body_size

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in PUBLIC_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            # Both compared whatever the scheme, so the time taken says nothing about the key.
            if not hmac.compare_digest(token.strip(), self.key) or scheme.lower() != b"bearer":
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                  kind=KINDS[401])
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        too_big = error_response(413, f"the request body is larger than this server's limit of {self.limit} bytes",
                         kind=KINDS[413])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_big(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:  # read at most the limit: a larger body is never held whole
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the disconnect, when it comes

        return await self.app(scope, replay, send)
