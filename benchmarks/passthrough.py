"""A reference point for the benchmark: the thinnest Starlette + aiohttp pass-through.

It does nothing a gateway must do (no auth, no parsing, no retries, no metrics), so the gap
between it and the gateway is the price of the gateway's own work, measured on the same machine
in the same run. Run by `benchmarks/run.py --reference`.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def build_app(upstream: str, api_key: str) -> Starlette:
    session: dict[str, aiohttp.ClientSession] = {}
    headers = {"content-type": "application/json", "authorization": f"Bearer {api_key}"}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        session["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))
        yield
        await session["s"].close()

    async def chat(request: Request) -> Response:
        body = await request.body()
        upstream_response = await session["s"].post(upstream + "/chat/completions", data=body, headers=headers)
        if b'"stream":true' not in body:
            payload = await upstream_response.read()
            return Response(payload, upstream_response.status, media_type="application/json")

        async def relay() -> AsyncIterator[bytes]:
            async with upstream_response:
                async for chunk in upstream_response.content.iter_any():
                    yield chunk

        return StreamingResponse(relay(), upstream_response.status, media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000/v1")
    parser.add_argument("--api-key", default="")
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.upstream, args.api_key),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
