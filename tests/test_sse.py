from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import sse
from gateway.sse import Decoder, Event

# A line is any text without line-ending characters; it is never empty (an empty line ends an event).
_line = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), min_size=1, max_size=20
).map(str.encode)
_event = st.lists(_line, min_size=1, max_size=4).map(b"\n".join)
_events = st.lists(_event, max_size=8)
_newline = st.sampled_from([b"\n", b"\r\n", b"\r"])


def _encode(events: list[bytes], newline: bytes) -> bytes:
    return b"".join(raw.replace(b"\n", newline) + newline + newline for raw in events)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(edges)]


def _decode(chunks: list[bytes]) -> list[bytes]:
    decoder = Decoder()
    raws = [event.raw for chunk in chunks for event in decoder.feed(chunk)]
    return raws + [event.raw for event in decoder.flush()]


@given(events=_events, newline=_newline, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_split_of_any_events_decodes_to_the_same_events(
    events: list[bytes], newline: bytes, cuts: list[int]
) -> None:
    data = _encode(events, newline)
    assert _decode(_split(data, cuts)) == events


@given(events=_events, newline=_newline)
def test_byte_at_a_time_feeding_decodes_to_the_same_events(events: list[bytes], newline: bytes) -> None:
    data = _encode(events, newline)
    assert _decode([data[i : i + 1] for i in range(len(data))]) == events


@given(events=st.lists(_event, min_size=1, max_size=5), cuts=st.lists(st.integers(min_value=0, max_value=200)))
def test_complete_events_come_out_before_flush(events: list[bytes], cuts: list[int]) -> None:
    """With "\\n" endings every event is recognised as soon as its blank line arrives, not at flush."""
    decoder = Decoder()
    seen = [event.raw for chunk in _split(_encode(events, b"\n"), cuts) for event in decoder.feed(chunk)]
    assert seen == events
    assert decoder.flush() == []


def test_crlf_line_endings_are_normalised() -> None:
    events = Decoder().feed(b"event: message\r\ndata: one\r\n\r\ndata: two\r\n\r\n")
    assert [event.raw for event in events] == [b"event: message\ndata: one", b"data: two"]


def test_cr_line_endings_are_normalised() -> None:
    decoder = Decoder()
    events = decoder.feed(b"data: one\r\rdata: two\r\r") + decoder.flush()
    assert [event.raw for event in events] == [b"data: one", b"data: two"]


def test_crlf_split_across_chunks_is_one_line_ending() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: a\r") == []
    # Were the held "\r" and the "\n" two line endings, they would make a blank line and split the event.
    assert decoder.feed(b"\ndata: b\r\n") == []
    assert [event.raw for event in decoder.feed(b"\r\n")] == [b"data: a\ndata: b"]
    assert decoder.flush() == []


def test_a_blank_line_made_of_crlf_split_across_chunks_ends_the_event() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: one\r\n\r") == []
    assert [event.raw for event in decoder.feed(b"\ndata: two\r")] == [b"data: one"]
    assert [event.raw for event in decoder.feed(b"\n\r\n")] == [b"data: two"]
    assert decoder.flush() == []


def test_a_lone_cr_at_a_chunk_end_is_a_line_ending_when_no_lf_follows() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: one\r") == []
    assert [event.raw for event in decoder.feed(b"\rdata: two")] == [b"data: one"]
    assert [event.raw for event in decoder.flush()] == [b"data: two"]


def test_an_event_split_mid_line_waits_for_its_blank_line() -> None:
    decoder = Decoder()
    assert decoder.feed(b'data: {"a"') == []
    assert decoder.feed(b": 1}\n") == []
    assert [event.data for event in decoder.feed(b"\n")] == [b'{"a": 1}']


def test_extra_blank_lines_between_events_make_no_empty_events() -> None:
    events = Decoder().feed(b"\n\ndata: a\n\n\n\n\ndata: b\n\n")
    assert [event.raw for event in events] == [b"data: a", b"data: b"]


def test_flush_returns_the_unterminated_tail_once() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") != []
    assert [event.raw for event in decoder.flush()] == [b"data: b"]
    assert decoder.flush() == []


def test_flush_of_an_empty_decoder_is_empty() -> None:
    decoder = Decoder()
    decoder.feed(b"\n\n")
    assert decoder.flush() == []


@pytest.mark.parametrize(
    ("raw", "data"),
    [
        (b"data: hello", b"hello"),
        (b"data:hello", b"hello"),
        (b"data:  two spaces", b" two spaces"),
        (b"data: line1\ndata: line2", b"line1\nline2"),
        (b"event: x\nid: 3\ndata: y", b"y"),
        (b": a comment", b""),
        (b"data:", b""),
    ],
)
def test_event_data_joins_data_fields(raw: bytes, data: bytes) -> None:
    assert Event(raw).data == data


def test_done_event() -> None:
    assert Event(b"data: [DONE]").is_done
    assert not Event(b'data: {"done": true}').is_done
    assert not Event(b"data: [DONE] ").is_done


def test_event_encode_round_trips() -> None:
    event = Event(b"event: x\ndata: y")
    assert event.encode() == b"event: x\ndata: y\n\n"
    assert [e.raw for e in Decoder().feed(event.encode())] == [event.raw]


def test_module_encode_and_done() -> None:
    assert sse.encode(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert sse.DONE == b"data: [DONE]\n\n"
    assert Decoder().feed(sse.DONE)[0].is_done
