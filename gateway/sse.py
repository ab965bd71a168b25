"""Incremental Server-Sent Events framing: pure functions, no I/O.

The proxy mostly forwards upstream bytes untouched; it only needs to know where each event ends so
that it can look at (and sometimes drop or rewrite) whole events. Chunks may split an event anywhere,
including inside a `\\r\\n` pair, so the decoder keeps the unfinished tail between feeds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Event:
    raw: bytes  # the event's lines, "\n"-separated, without the terminating blank line

    @property
    def data(self) -> bytes:
        """The `data:` fields joined by newlines, as the SSE spec says."""
        parts = []
        for line in self.raw.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                parts.append(value[1:] if value.startswith(b" ") else value)
        return b"\n".join(parts)

    @property
    def is_done(self) -> bool:
        return self.data == b"[DONE]"

    def encode(self) -> bytes:
        return self.raw + b"\n\n"


class Decoder:
    """Feed it byte chunks split anywhere; it returns the complete events seen so far.

    Line endings may be "\n", "\r\n" or "\r" (the spec allows all three); they are normalised to
    "\n". A trailing "\r" is held back because it may be the first half of "\r\n".
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer + chunk if self._buffer else chunk
        held = b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *complete, rest = buffer.split(b"\n\n")
        self._buffer = rest + held
        return [Event(raw.strip(b"\n")) for raw in complete if raw.strip(b"\n")]

    def flush(self) -> list[Event]:
        """The event left when a stream ends without its final blank line."""
        tail = self._buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").strip(b"\n")
        self._buffer = b""
        return [Event(tail)] if tail else []


def encode(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


DONE = encode(b"[DONE]")
