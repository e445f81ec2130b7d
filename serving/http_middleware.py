"""ASGI middleware that runs before any request parsing: the API key and the body-size limit."""
from __future__ import annotations

import json

from serving.auth import UNAUTHORIZED_MESSAGE, key_matches
from serving.errors import APIError


async def send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every path under `prefix`."""

    def __init__(self, app, api_key: str, prefix: str = "/v1"):
        self.app, self.api_key, self.prefix = app, api_key, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"] == self.prefix
                                        or scope["path"].startswith(self.prefix + "/")):
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not key_matches(self.api_key, auth):
                return await send_error(send, APIError(401, UNAUTHORIZED_MESSAGE,
                                                       code="invalid_api_key"))
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the whole request body first (bodies here are small JSON documents) and answers
    413 once it passes `max_bytes`; the application then gets it replayed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"The request body is larger than the limit of {self.max_bytes} "
                                  "bytes.", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await send_error(send, too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: waits for a disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
