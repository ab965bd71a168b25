"""The request path as a chain of small stages, composed once at start-up.

A stage is `async def __call__(request, call_next) -> ProxyResponse`: work before `call_next` runs on
the way in, work after it on the way out. Post-work on a stream wraps `response.stream` so that it
runs when the stream closes (see gateway/context.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Protocol

from gateway.context import Handler, ProxyRequest, ProxyResponse


class Stage(Protocol):
    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse: ...


def build_pipeline(stages: Sequence[Stage], endpoint: Handler) -> Handler:
    handler = endpoint
    for stage in reversed(stages):
        handler = partial(stage.__call__, call_next=handler)
    return handler
