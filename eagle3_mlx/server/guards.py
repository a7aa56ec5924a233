"""ASGI middleware that guards every request before a route sees it.

Contract (``Guard(app, api_key=..., max_body_bytes=...)``):
* With an API key, every HTTP request must carry ``Authorization: Bearer KEY``
  (compared in constant time); otherwise 401 with OpenAI's error JSON. The
  check runs on the headers, before any of the body is read.
* The body is read here, up to ``max_body_bytes``: a larger ``Content-Length``
  or a chunked body that passes the limit is refused with 413. The refusal is
  sent once the client has finished sending (the rest is read and dropped, up
  to ``DRAIN_FACTOR`` times the limit): closing a socket that still holds unread
  data resets the connection, and the client would then lose the 413. POST bodies are JSON whatever their Content-Type
  says (``curl -d`` sends a form type). The route then gets the buffered body, and later
  ``receive()`` calls go to the server so disconnects are still seen.
"""

from __future__ import annotations

import hmac
import json

from .schemas import error_body

DRAIN_FACTOR = 8    # a refused body is read and dropped up to this many times the limit


async def send_error(send, status: int, body: dict, headers=()):
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


class Guard:
    def __init__(self, app, *, api_key: str | None = None, max_body_bytes: int = 1 << 20):
        self.app = app
        self.key = f"Bearer {api_key}".encode() if api_key else None
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.key is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
            return await send_error(
                send, 401,
                error_body("Missing or incorrect API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key"),
                [(b"www-authenticate", b"Bearer")])
        declared = headers.get(b"content-length")
        too_big = error_body(f"request body is larger than {self.max_body} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._drain(receive, 0)
            return await send_error(send, 413, too_big, [(b"connection", b"close")])
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected before the body arrived
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                if message.get("more_body", False):
                    await self._drain(receive, size)
                return await send_error(send, 413, too_big, [(b"connection", b"close")])
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if scope["method"] == "POST":
            # Every POST body here is JSON: parse it as such whatever Content-Type says
            # (curl -d sends a form type), instead of failing with a confusing error.
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")])
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _drain(self, receive, size: int):
        """Read and drop the rest of a refused body (``size`` bytes already
        read), up to the drain cap; a larger one is cut off all the same."""
        while size <= DRAIN_FACTOR * self.max_body:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
