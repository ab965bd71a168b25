"""The ASGI endpoint for proxied operations: read the body, run the pipeline, send the answer.

Written against raw ASGI rather than Starlette's Request/Response because it is the hot path and
because it must watch for the client going away while the upstream works: a disconnect cancels the
request at once, which closes the upstream connection too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive, Scope, Send

from gateway.context import Endpoint, Handler, ProxyRequest, ProxyResponse, aclose
from gateway.errors import ClientDisconnected, GatewayError, InvalidRequest, RequestTooLarge, StoreUnavailable
from gateway.metrics import Metrics
from gateway.quietlog import QuietWarning
from gateway.request_id import request_id_from
from gateway.store import StoreError

logger = logging.getLogger("gateway.proxy")
access_logger = logging.getLogger("gateway.access")


class _DisconnectWatcher:
    """Cancels `task` if the client disconnects before `done()` is called."""

    __slots__ = ("_done", "_task", "disconnected")

    def __init__(self, receive: Receive, task: asyncio.Task[object]) -> None:
        self.disconnected = False
        self._done = False
        self._task = asyncio.ensure_future(self._watch(receive, task))

    async def _watch(self, receive: Receive, task: asyncio.Task[object]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # After a complete response uvicorn also reports "disconnect": that one is not news.
                if not self._done:
                    self.disconnected = True
                    task.cancel()
                return

    def done(self) -> None:
        self._done = True
        self._task.cancel()


async def read_body(receive: Receive, limit: int, content_length: str | None) -> bytes:
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise InvalidRequest("The Content-Length header is not a number.") from None
        if declared > limit:
            raise RequestTooLarge(f"The request body is {declared} bytes; this gateway accepts at most {limit}.")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"The request body is over {limit} bytes, the most this gateway accepts.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _encode_headers(headers: dict[str, str], content_type: str) -> list[tuple[bytes, bytes]]:
    raw = [(b"content-type", content_type.encode("latin-1"))]
    raw.extend((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items())
    return raw


async def send_error(send: Send, error: GatewayError, id_header: tuple[bytes, bytes]) -> None:
    body = error.body()
    headers = _encode_headers(error.response_headers(), "application/json")
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append(id_header)
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _log_access(request: ProxyRequest, status: int, elapsed: float) -> None:
    principal = request.principal
    access_logger.info(
        "request_id=%s endpoint=%s tenant=%s key=%s user=%r model=%r stream=%s status=%d duration_ms=%.1f",
        request.request_id,
        request.endpoint.name,
        principal.tenant if principal else "-",
        principal.key_id if principal else "-",
        request.user or "-",
        request.model or "-",
        request.stream,
        status,
        elapsed * 1000,
    )


class ProxyEndpoint:
    def __init__(
        self,
        endpoint: Endpoint,
        handler: Handler,
        metrics: Metrics,
        max_body_bytes: int,
        models: frozenset[str],
        *,
        access_log: bool = False,
    ) -> None:
        self._endpoint = endpoint
        self._handler = handler
        self._metrics = metrics
        self._max_body_bytes = max_body_bytes
        self._models = models
        self._access_log = access_log
        # Resolving label values costs ~10 µs a call: do it once per label set, not per request.
        self._duration = metrics.request_duration.labels(endpoint.name)
        self._overhead = metrics.overhead.labels(endpoint.name)
        self._disconnects = metrics.client_disconnects.labels(endpoint.name)
        self._store_failures = QuietWarning(logger, "the store failed; requests get 503 store_unavailable")
        self._requests: dict[tuple[str, int], Any] = {}
        self._upstream_duration: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        request = ProxyRequest(request_id_from(headers.get("x-request-id")), self._endpoint, b"", headers, started)
        id_header = (b"x-request-id", request.request_id.encode())
        self._metrics.in_flight.inc()
        status = 499  # nginx's "client closed request", for metrics only
        task = asyncio.current_task()
        assert task is not None
        watcher: _DisconnectWatcher | None = None
        try:
            request.raw_body = await read_body(receive, self._max_body_bytes, headers.get("content-length"))
            watcher = _DisconnectWatcher(receive, task)
            response = await self._handler(request)
            status = response.status
            if response.stream is None:
                watcher.done()
                await self._send_body(send, response, id_header)
                self._observe(started, response)
            else:
                await self._send_stream(send, response, started, id_header)
                watcher.done()
        except GatewayError as error:
            status = error.status
            if watcher is not None:
                watcher.done()
            await send_error(send, error, id_header)
        except StoreError as exc:
            # Fail closed: limits and stored keys cannot be checked, so nothing is forwarded. The SDKs retry a 503.
            status = 503
            if watcher is not None:
                watcher.done()
            self._store_failures.warn(exc)
            message = "The gateway cannot reach its store right now, so this request was not sent on; try again."
            await send_error(send, StoreUnavailable(message), id_header)
        except ClientDisconnected:
            self._disconnects.inc()
        except asyncio.CancelledError:
            if watcher is None or not watcher.disconnected:
                raise
            task.uncancel()
            status = 499  # also when a stream had begun: the client did not get the whole answer
            self._disconnects.inc()
        except Exception:
            # Only reached before the response started: streams handle their own failures.
            status = 500
            if watcher is not None:
                watcher.done()
            logger.exception("request_id=%s unhandled error", request.request_id)
            message = f"The gateway failed unexpectedly; quote request id {request.request_id} when reporting it."
            await send_error(send, GatewayError(message), id_header)
        finally:
            self._metrics.in_flight.dec()
            self._count(request.model, status)
            elapsed = time.perf_counter() - started
            self._duration.observe(elapsed)
            if self._access_log:
                _log_access(request, status, elapsed)

    def _count(self, model: str, status: int) -> None:
        # Only configured models get their own label value: clients choose `model` freely. The cache is
        # keyed by the label too, or every made-up model name would add an entry that is never freed.
        label = model if model in self._models else "unknown"
        counter = self._requests.get((label, status))
        if counter is None:
            counter = self._requests[(label, status)] = self._metrics.requests.labels(label, str(status))
        counter.inc()

    def _observe(self, started: float, response: ProxyResponse) -> None:
        if response.upstream:
            histogram = self._upstream_duration.get(response.upstream)
            if histogram is None:
                histogram = self._upstream_duration[response.upstream] = self._metrics.upstream_duration.labels(
                    response.upstream
                )
            histogram.observe(response.upstream_seconds)
            self._overhead.observe(max(0.0, time.perf_counter() - started - response.upstream_seconds))

    async def _send_body(self, send: Send, response: ProxyResponse, id_header: tuple[bytes, bytes]) -> None:
        content_type = response.headers.pop("content-type", "application/json")
        headers = _encode_headers(response.headers, content_type)
        headers.append((b"content-length", str(len(response.body)).encode()))
        headers.append(id_header)
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _send_stream(
        self, send: Send, response: ProxyResponse, started: float, id_header: tuple[bytes, bytes]
    ) -> None:
        stream: AsyncIterator[bytes] = response.stream  # type: ignore[assignment]
        response.headers.pop("content-type", None)
        headers = _encode_headers(response.headers, "text/event-stream; charset=utf-8")
        headers.append((b"cache-control", b"no-cache"))
        headers.append((b"x-accel-buffering", b"no"))  # tell nginx-style proxies not to buffer SSE
        headers.append(id_header)
        try:  # the stream is closed even if the client is gone before the headers are out
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            first = True
            try:
                async for chunk in stream:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if first:
                        first = False
                        self._metrics.time_to_first_token.observe(time.perf_counter() - started)
                        self._observe(started, response)
            except Exception:
                # Headers are out: the failure can only be the stream's last event.
                logger.exception("request_id=%s stream failed", id_header[1].decode())
                error = GatewayError("The gateway failed mid-stream; the answer is incomplete.")
                await send({"type": "http.response.body", "body": error.sse_event(), "more_body": True})
        finally:
            await aclose(stream)
        await send({"type": "http.response.body", "body": b""})
