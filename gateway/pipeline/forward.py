"""The last stage: route the request to its model's upstream, falling back down the model's list."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

from gateway import sse
from gateway.context import ProxyRequest, ProxyResponse
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout
from gateway.jsonbody import dumps
from gateway.routing import Router, Target
from gateway.upstream.client import RetriesExhausted, UpstreamClient
from gateway.upstream.transport import TimedOut, TransportError

logger = logging.getLogger("gateway.forward")

# Upstream response headers worth handing to the client; hop-by-hop and length headers are the
# server's business, and the upstream's own rate-limit headers describe the gateway's key.
_PASSED = ("content-type", "openai-processing-ms", "x-request-id")


def _client_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    headers = {}
    for name in _PASSED:
        value = upstream.get(name)
        if value is not None:
            headers["x-upstream-request-id" if name == "x-request-id" else name] = value
    return headers


class Forward:
    def __init__(self, router: Router, clients: Mapping[str, UpstreamClient]) -> None:
        self._router = router
        self._clients = clients

    def _body_for(self, request: ProxyRequest, target: Target) -> bytes:
        client = self._clients[target.upstream]
        if client.provider.rewrites_model and target.upstream_model != request.body.get("model"):
            return dumps({**request.body, "model": target.upstream_model})
        return dumps(request.body) if request.body_changed else request.raw_body

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        loop = asyncio.get_running_loop()
        failure: GatewayError | None = None
        for target in self._router.targets(request.model):
            client = self._clients[target.upstream]
            deadline = loop.time() + client.config.timeout_s
            try:
                reply = await client.send(
                    request.endpoint.path,
                    target.upstream_model,
                    self._body_for(request, target),
                    request.headers,
                    stream=request.stream,
                    deadline=deadline,
                )
            except RetriesExhausted as exhausted:
                failure = exhausted.error
                logger.warning(
                    "request_id=%s model=%s upstream=%s failed after retries: %s (%s)",
                    request.request_id,
                    target.model,
                    target.upstream,
                    failure.code,
                    failure.message,
                )
                continue
            headers = _client_headers(reply.headers)
            if target.model != request.model:
                headers["x-gateway-fallback-model"] = target.model
            stream = None
            if reply.stream is not None:
                stream = _guard(reply.stream, deadline, client.name, loop)
            return ProxyResponse(
                reply.status,
                headers,
                reply.body,
                stream,
                model=target.model,
                upstream=client.name,
                upstream_seconds=reply.upstream_seconds,
            )
        assert failure is not None, "every model has at least one target"
        raise failure


async def _guard(
    chunks: AsyncIterator[bytes], deadline: float, upstream: str, loop: asyncio.AbstractEventLoop
) -> AsyncIterator[bytes]:
    """Re-frame the upstream's bytes into whole SSE events, bound the stream by the overall deadline,
    and end it with an error event if the upstream fails, so the client never sees half an event.

    The transport's read timeout bounds each silence; checking the deadline after every chunk bounds
    a trickle that never goes silent for long.
    """
    decoder = sse.Decoder()
    try:
        async for chunk in chunks:
            events = decoder.feed(chunk)
            if events:
                yield b"".join(event.encode() for event in events)
            if loop.time() > deadline:
                yield UpstreamTimeout(f"upstream {upstream!r} exceeded the request deadline mid-stream").sse_event()
                return
        tail = decoder.flush()
        if tail:
            yield b"".join(event.encode() for event in tail)
    except TimedOut as exc:
        # The transport enforces the overall deadline too, so this is the usual mid-stream timeout.
        yield UpstreamTimeout(f"upstream {upstream!r} timed out mid-stream: {exc}").sse_event()
    except TransportError as exc:
        yield UpstreamError(f"upstream {upstream!r} failed mid-stream: {exc}").sse_event()
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
