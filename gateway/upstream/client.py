"""One upstream: send a request with retries, backoff, Retry-After and an overall deadline.

Retries happen only before any byte has reached the client: a non-streaming answer is read whole
before it is returned, and a stream's first chunk is read before its headers are committed.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import orjson

from gateway.config.schema import UpstreamConfig
from gateway.errors import (
    GatewayError,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.upstream.providers import Provider
from gateway.upstream.transport import (
    ConnectFailed,
    TimedOut,
    Timeouts,
    Transport,
    TransportError,
    UpstreamResponse,
)

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0
_SECRET_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_*\-]{3})[A-Za-z0-9_*\-]+")
PASSED_HEADERS = ("retry-after", "retry-after-ms")


class UpstreamHTTPError(GatewayError):
    """An error answer from the upstream, passed to the client with its status and (scrubbed) body."""

    type = "upstream_error"
    code = None  # the upstream's own code, if it gave one; never the gateway's "internal_error"

    def __init__(self, status: int, body: bytes, headers: dict[str, str], secret: str) -> None:
        self._body = _scrub(body, secret)
        message, kind, code, param = _describe(self._body, status)
        super().__init__(message, status=status, code=code, param=param, headers=headers)
        self.type = kind

    def body(self) -> bytes:
        return self._body if _describe_ok(self._body) else super().body()


def _describe_ok(body: bytes) -> bool:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= error.keys()


def _describe(body: bytes, status: int) -> tuple[str, str, str | None, str | None]:
    try:
        error = orjson.loads(body).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    message = str(error.get("message") or f"the upstream answered HTTP {status}")
    kind = str(error.get("type") or ("rate_limit_error" if status == 429 else "upstream_error"))
    code = error.get("code")
    param = error.get("param")
    return message, kind, None if code is None else str(code), None if param is None else str(param)


def _scrub(body: bytes, secret: str) -> bytes:
    if secret:
        body = body.replace(secret.encode(), b"[REDACTED]")
    text = body.decode("utf-8", errors="replace")
    return _SECRET_LIKE.sub(r"\1***", text).encode()


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the upstream asked us to wait, from `retry-after-ms` or `retry-after`."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(slots=True)
class UpstreamReply:
    """A successful (or non-retryable error) answer, ready to go to the client."""

    status: int
    headers: Mapping[str, str]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    upstream_seconds: float = 0.0  # until the whole body (or, for streams, the first chunk) arrived


class RetriesExhausted(Exception):
    """Every attempt failed in a way a fallback model might avoid."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class UpstreamClient:
    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        provider: Provider,
        transport: Transport,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self.config = config
        self.provider = provider
        self.transport = transport
        self._sleep = sleep
        self._jitter = jitter
        self._secret = config.api_key.get_secret_value()

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: half the nominal delay fixed, half random."""
        nominal = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2**attempt)
        return float(nominal * (0.5 + self._jitter() / 2))

    async def send(
        self,
        path: str,
        upstream_model: str,
        body: bytes,
        client_headers: dict[str, str],
        *,
        stream: bool,
        deadline: float,
    ) -> UpstreamReply:
        """Try up to `max_retries + 1` times before `deadline` (event-loop time)."""
        loop = asyncio.get_running_loop()
        url = self.provider.url(path, upstream_model)
        headers = self.provider.headers(client_headers)
        error: GatewayError | None = None
        for attempt in range(self.config.max_retries + 1):
            started = loop.time()
            # The transport enforces the overall deadline on the whole exchange, streams included.
            timeouts = Timeouts(self.config.connect_timeout_s, self.config.read_timeout_s, deadline - started)
            try:
                response = await self.transport.send("POST", url, headers, body, timeouts)
                outcome = await self._settle(response, stream, started, loop)
            except TimedOut as exc:
                if loop.time() >= deadline:
                    error = UpstreamTimeout(f"upstream {self.name!r} did not answer within {self.config.timeout_s:g}s")
                    break  # no time is left for another attempt
                error = UpstreamTimeout(f"upstream {self.name!r}: {exc}")
                delay: float | None = self.backoff(attempt)
            except ConnectFailed as exc:
                error = UpstreamUnavailable(f"upstream {self.name!r} is unreachable: {exc}")
                delay = self.backoff(attempt)
            except TransportError as exc:
                error = UpstreamError(f"upstream {self.name!r} failed: {exc}")
                delay = self.backoff(attempt)
            else:
                if isinstance(outcome, UpstreamReply):
                    return outcome
                error = outcome
                if isinstance(error, UpstreamAuthFailed):
                    break
                after = retry_after_seconds(error.headers)
                if after is not None and after > MAX_RETRY_AFTER_S:
                    break  # the upstream asks for a long pause: tell the client instead of holding it
                delay = self.backoff(attempt) if after is None else after
            if attempt == self.config.max_retries or loop.time() + (delay or 0) >= deadline:
                break
            await self._sleep(delay or 0)
        assert error is not None, "the loop runs at least once"
        error.should_retry = False
        raise RetriesExhausted(error)

    async def _settle(
        self, response: UpstreamResponse, stream: bool, started: float, loop: asyncio.AbstractEventLoop
    ) -> UpstreamReply | GatewayError:
        """A reply to hand on, or the error of a failed attempt (the response is then closed)."""
        status = response.status
        if status < 400 and stream:
            chunks = response.iter_chunks()
            try:
                first = await anext(chunks, b"")
            except BaseException:
                await response.aclose()
                raise
            return UpstreamReply(
                status,
                response.headers,
                stream=_prepend(first, chunks, response),
                upstream_seconds=loop.time() - started,
            )
        payload = await response.read()
        if status < 400:
            return UpstreamReply(status, response.headers, body=payload, upstream_seconds=loop.time() - started)
        if status in (401, 403):
            return UpstreamAuthFailed(
                f"upstream {self.name!r} refused the gateway's credentials (HTTP {status}); "
                "check the upstream's api_key in the gateway config"
            )
        passed = {name: response.headers[name] for name in PASSED_HEADERS if name in response.headers}
        http_error = UpstreamHTTPError(status, payload, passed, self._secret)
        if status in RETRYABLE_STATUS:
            return http_error
        return UpstreamReply(status, response.headers, body=http_error.body())


async def _prepend(first: bytes, rest: AsyncIterator[bytes], response: UpstreamResponse) -> AsyncIterator[bytes]:
    try:
        if first:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
        await response.aclose()
