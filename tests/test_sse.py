"""WHATWG event-stream framing on raw bytes (services.gateway.sse): every line-end style, every cut."""

from __future__ import annotations

import itertools
import random

import pytest

from services.gateway import sse

# (stream, the events' (type, data) in order) — written from the WHATWG parsing rules.
CASES = {
    "lf": (b"data: a\n\ndata: b\n\n", [(None, b"a"), (None, b"b")]),
    "crlf": (b"data: a\r\n\r\ndata: b\r\n\r\n", [(None, b"a"), (None, b"b")]),
    "cr": (b"data: a\r\rdata: b\r\r", [(None, b"a"), (None, b"b")]),
    "mixed": (b"data: a\r\n\ndata: b\n\r\ndata: c\r\r\n", [(None, b"a"), (None, b"b"), (None, b"c")]),
    "multi-line data": (b"data: one\ndata:two\ndata\n\n", [(None, b"one\ntwo\n")]),
    "event type and id": (b"event: ping\nid: 7\ndata: {}\n\n", [("ping", b"{}")]),
    "comments": (b": keep-alive\n\n: OPENROUTER PROCESSING\n\ndata: x\n\n", [(None, None), (None, None), (None, b"x")]),
    "one space stripped": (b"data:  two spaces\n\n", [(None, b" two spaces")]),
    "utf-8": (
        'data: {"t": "h\u00e9llo \u2603 \U0001f600"}\n\n'.encode(),
        [(None, '{"t": "h\u00e9llo \u2603 \U0001f600"}'.encode())],
    ),
    "bom": (b"\xef\xbb\xbfdata: a\n\n", [(None, b"a")]),
}


def frame(stream: bytes, cuts: list[int]) -> list[bytes]:
    """The raw events as the proxy relays them: what each read completes, then what is left at close."""
    framer = sse.EventFramer()
    events: list[bytes] = []
    bounds = [0, *sorted(cuts), len(stream)]
    for start, end in itertools.pairwise(bounds):
        events += framer.feed(stream[start:end])
    tail = framer.close()
    return [*events, tail] if tail else events


def fields(raw_events: list[bytes]) -> list[tuple[str | None, bytes | None]]:
    return [(e.event, e.data) for e in map(sse.parse, raw_events)]


@pytest.mark.parametrize("name", CASES)
def test_every_cut_gives_the_same_events_and_the_same_bytes(name):
    stream, expected = CASES[name]
    whole = frame(stream, [])
    assert fields(whole) == expected
    assert all(sse.terminator(event) == b"" for event in whole), "every event is complete"
    assert frame(stream, list(range(1, len(stream)))) == whole, "one byte per read"
    rng = random.Random(name)
    for _ in range(50):
        cuts = rng.sample(range(1, len(stream)), k=min(len(stream) - 1, rng.randint(1, 4)))
        assert frame(stream, cuts) == whole
    assert b"".join(whole) == stream, "relayed byte for byte"


def test_a_cut_inside_crlf_is_one_line_end_not_two():
    stream = b"data: a\r\n\r\ndata: b\r\n\r\n"
    for cut in (8, 10):  # between \r and \n
        assert frame(stream, [cut]) == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]


def test_an_event_left_in_the_buffer_at_close_is_returned_and_can_be_completed():
    events = frame(b"data: a\n\ndata: last", [3])
    assert events == [b"data: a\n\n", b"data: last"]
    rest = events[-1]
    assert sse.parse(rest + sse.terminator(rest)).data == b"last"
    assert sse.terminator(b"data: x\r\n") == b"\r\n"
    assert sse.terminator(b"data: x\r") == b"\r"
    assert sse.terminator(b"data: x") == b"\n\n"
    # A CR at the very end is only known to be a line end when the stream closes.
    framer = sse.EventFramer()
    assert framer.feed(b"data: z\r\r") == [] and framer.close() == b"data: z\r\r"
    assert sse.terminator(b"data: z\r\r") == b"" and sse.terminator(b"data: z\r\n\r\n") == b""


def test_replace_data_keeps_the_other_lines_and_the_line_end_style():
    raw = b'event: response.completed\r\nid: 9\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
    assert sse.replace_data(raw, b'{"b":2}') == b'event: response.completed\r\nid: 9\r\ndata: {"b":2}\r\n\r\n'
    assert sse.replace_data(b"data: {}\n\n", b"[]") == b"data: []\n\n"
