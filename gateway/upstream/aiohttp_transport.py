"""The production transport: one pooled aiohttp session per upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import aiohttp
import yarl

from gateway.upstream.transport import ConnectFailed, ReadFailed, TimedOut, Timeouts, TransportError


def _map_error(exc: BaseException) -> TransportError:
    # Order matters: aiohttp's timeout classes also derive from its connection errors.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return TimedOut("timed out connecting to the upstream")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return TimedOut("timed out waiting for the upstream")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectFailed(f"cannot connect to the upstream: {exc.strerror or type(exc).__name__}")
    return ReadFailed(f"the upstream connection failed: {type(exc).__name__}")


class _Response:
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _map_error(exc) from None
        finally:
            self._response.release()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _map_error(exc) from None

    async def aclose(self) -> None:
        # close() rather than release(): an unfinished body must not return its connection to the pool.
        if not self._response.closed:
            if self._response.content.at_eof():
                self._response.release()
            else:
                self._response.close()


class AiohttpTransport:
    def __init__(self, max_connections: int = 1000) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        # Parsing a URL costs more than the rest of building a request: parse each one once.
        self._urls: dict[str, yarl.URL] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily so it binds to the running event loop, never at import or config time.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, timeouts: Timeouts
    ) -> _Response:
        timeout = aiohttp.ClientTimeout(total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.read)
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) > 4096:  # bounded: URLs vary only by deployment or path
                self._urls.clear()
            parsed = self._urls[url] = yarl.URL(url)
        try:
            response = await self._get_session().request(
                method, parsed, headers=headers, data=body, timeout=timeout, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _map_error(exc) from None
        return _Response(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
