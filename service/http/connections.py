"""Connections, before a request reaches the app: a deadline for each request's headers, and
a JSON 503 with ``Retry-After`` when there are more connections than the service takes.

uvicorn has neither: a client that sends its headers a byte at a time keeps its connection for
as long as it likes, and over ``limit_concurrency`` uvicorn answers a plain-text 503. This is its
httptools protocol (the one ``uvicorn[standard]`` runs) with both added.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["GuardedHttpProtocol", "raw_error"]


def raw_error(status: int, reason: str, code: str, message: str, retry_after: int = 0) -> bytes:
    """A complete HTTP/1.1 error answer with the service's JSON body, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    body = json.dumps(
        {
            "error": {
                "code": "overloaded",
                "message": "the server has as many connections as it takes; retry later",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


LINGER_S = 2.0  # longest wait for a client to stop sending after an early answer


class _LingeringTransport:
    """The connection's transport, whose ``close()`` lingers when a request is unfinished.

    Answering before a request has fully arrived (408, 413) and then closing a socket that
    still receives the client's bytes makes the kernel reset the connection, and a reset can
    reach the client before it has read the answer. So, like nginx's lingering close, this
    sends what is buffered, half-closes, and reads and discards what still comes, for up to
    :data:`LINGER_S`, before closing for good.
    """

    def __init__(self, transport: asyncio.Transport, mid_request: Any) -> None:
        self._transport = transport
        self._mid_request = mid_request  # () -> bool: is a request partly received?
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        t = self._transport
        if self.lingering or t.is_closing() or not self._mid_request() or not t.can_write_eof():
            t.close()
            return
        self.lingering = True
        t.write_eof()  # after the buffered answer
        t.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_S, t.close)


class GuardedHttpProtocol(HttpToolsProtocol):
    """``header_timeout_s`` (set by the server on the class) runs from the connection's start,
    and from the end of each answer on a kept-alive connection, to the end of the next
    request's headers; past it the client gets 408 and the connection is closed."""

    header_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._mid_request = False
        self._lingering = _LingeringTransport(transport, lambda: self._mid_request)
        super().connection_made(self._lingering)  # type: ignore[arg-type]
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._lingering.lingering:
            return  # the rest of a request already answered: discarded
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._mid_request = True
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._mid_request = False
        super().on_message_complete()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (
            self.cycle is not None and not self.cycle.response_complete
        ):
            return
        self.transport.write(
            raw_error(
                408,
                "Request Timeout",
                "request_timeout",
                f"no complete request headers within {self.header_timeout_s:g} s",
            )
        )
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._mid_request and not self.transport.is_closing():
            # Answered before its request fully arrived (413, 408, 401, ...): the rest of the
            # body is not wanted, so the connection ends here, lingering (see above).
            self.transport.close()
        elif not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn picks its plain-text 503 when over limit_concurrency; answer in JSON instead.
        if app is service_unavailable:
            app = _too_many_connections
        super()._start_asgi_task(cycle, app)
