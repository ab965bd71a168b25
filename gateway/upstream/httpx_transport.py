"""A transport over an `httpx.AsyncClient`: the test seam (respx, `httpx.MockTransport`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import httpx

from gateway.upstream.transport import ConnectFailed, ReadFailed, TimedOut, Timeouts, TransportError


def _map_error(exc: httpx.HTTPError) -> TransportError:
    if isinstance(exc, httpx.TimeoutException):
        return TimedOut("timed out waiting for the upstream")
    if isinstance(exc, httpx.ConnectError):
        return ConnectFailed("cannot connect to the upstream")
    return ReadFailed(f"the upstream connection failed: {type(exc).__name__}")


class _Response:
    __slots__ = ("_response",)

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        except httpx.HTTPError as exc:
            raise _map_error(exc) from None
        finally:
            await self._response.aclose()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            # aiter_bytes, not aiter_raw: decode any content-encoding, as read() and aiohttp do.
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:
            raise _map_error(exc) from None

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxTransport:
    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client or httpx.AsyncClient()

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, timeouts: Timeouts
    ) -> _Response:
        request = self._client.build_request(
            method,
            url,
            headers=dict(headers),
            content=body,
            timeout=httpx.Timeout(timeouts.read, connect=timeouts.connect),
        )
        try:
            async with asyncio.timeout(timeouts.total):
                response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _map_error(exc) from None
        except TimeoutError:
            raise TimedOut("the upstream did not answer before the deadline") from None
        return _Response(response)

    async def aclose(self) -> None:
        await self._client.aclose()
