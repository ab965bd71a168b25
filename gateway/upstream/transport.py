"""The seam between the gateway and the HTTP client library that talks to upstreams.

Production uses aiohttp (AiohttpTransport): in benchmarks/ it costs about a fifth of the CPU per
request of httpx's connection pool. Tests use HttpxTransport over `httpx.MockTransport` or respx.
Each transport maps its library's exceptions to the three below, in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True, frozen=True)
class Timeouts:
    connect: float
    read: float  # the longest silence allowed between two chunks
    total: float | None = None  # for the whole exchange, the response body included


class TransportError(Exception):
    """Base of the errors a transport raises; the message never contains credentials."""


class ConnectFailed(TransportError):
    """No connection could be made; nothing was sent, so a retry is always safe."""


class TimedOut(TransportError):
    """Connecting or reading took longer than its timeout."""


class ReadFailed(TransportError):
    """The connection broke while the response was being read."""


class UpstreamResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Case-insensitive."""
        ...

    async def read(self) -> bytes: ...

    def iter_chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, timeouts: Timeouts
    ) -> UpstreamResponse:
        """Send the request and return once the response headers have arrived."""
        ...

    async def aclose(self) -> None: ...
