"""Server-sent events framed on raw bytes, by the WHATWG rules, so every event can be relayed verbatim.

The proxy must pass each upstream event to the client byte for byte (only the node's cost fields
are ever added) while reading the events it meters. Event-stream decoders on PyPI (httpx-sse,
sseclient-py, aiohttp-sse-client) hand back parsed events and drop the bytes they came from (line
ends, comments, field spelling), so framing is done here on the raw bytes instead.

Rules (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
a line ends with CRLF, LF or CR; an empty line ends an event; a line starting with ``:`` is a
comment; ``field: value`` loses one space after the colon; several ``data`` lines join with LF; a
leading UTF-8 BOM is skipped. Line ends are bytes that never occur inside a multi-byte UTF-8
character, so a read may end anywhere (mid-character, mid-CRLF, one byte at a time).
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")
_CR = 0x0D
BOM = b"\xef\xbb\xbf"


class EventFramer:
    """Cut a byte stream into whole raw events, each ending with its blank line, as reads arrive.

    ``feed(chunk) -> list[bytes]`` returns the events completed by this read (possibly none);
    ``close() -> bytes`` returns what is left when the stream ends: an event the upstream never
    terminated, or ``b""``. Joining every returned piece gives back exactly the bytes fed.
    """

    __slots__ = ("_buffer", "_line_start", "_scan")

    def __init__(self) -> None:
        self._buffer = b""
        self._scan = 0  # where to resume looking for line ends
        self._line_start = 0  # where the current (unfinished) line starts

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[bytes] = []
        start, line_start, scan, end = 0, self._line_start, len(buffer), len(buffer)
        if b"\r" not in buffer:  # LF only, the usual case: the same rules, found with bytes.find
            at = buffer.find(b"\n", self._scan)
            while at >= 0:
                if at == line_start:
                    events.append(buffer[start : at + 1])
                    start = at + 1
                line_start = at + 1
                at = buffer.find(b"\n", line_start)
            self._buffer, self._scan, self._line_start = buffer[start:], end - start, line_start - start
            return events
        for match in _LINE_END.finditer(buffer, self._scan):
            at, after = match.span()
            if after == end and after - at == 1 and buffer[at] == _CR:
                scan = at  # a CR at the end of the read may be the first half of a CRLF: wait for more
                break
            if at == line_start:  # an empty line: the event is complete
                events.append(buffer[start:after])
                start = after
            line_start = after
        self._buffer = buffer[start:]
        self._scan = scan - start
        self._line_start = line_start - start
        return events

    def close(self) -> bytes:
        """The bytes of an unterminated last event (``b""`` if the stream ended cleanly); resets the framer."""
        rest, self._buffer, self._scan, self._line_start = self._buffer, b"", 0, 0
        return rest


def terminator(tail: bytes) -> bytes:
    """The line ends that complete ``tail`` (what `EventFramer.close` returned) as an event, in the
    line-end style it uses: ``b""`` when it is already complete (a stream ending in a lone CR)."""
    ends = list(_LINE_END.finditer(tail))
    if not ends:
        return b"\n\n" if tail else b""
    last = ends[-1]
    if last.end() != len(tail):
        return last.group() * 2
    if last.start() == 0 or (len(ends) > 1 and ends[-2].end() == last.start()):
        return b""
    return last.group()


class Event:
    """One parsed event: ``event`` type (``None`` = "message") and ``data`` (``None`` when it had no data line).

    ``data`` is bytes, the ``data`` lines joined by LF, undecoded (UTF-8 is decoded by the JSON parser).
    """

    __slots__ = ("data", "event")

    def __init__(self, event: str | None, data: bytes | None):
        self.event = event
        self.data = data


def parse(raw: bytes) -> Event:
    """The fields of one raw event as `EventFramer` cuts it (comments and unknown fields ignored)."""
    if raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n") == 2 and b"\r" not in raw:
        return Event(None, raw[6:-2])  # the common case, "data: {...}\n\n", without splitting lines
    if raw.startswith(BOM):
        raw = raw[len(BOM) :]
    event: str | None = None
    data: list[bytes] = []
    for line in _LINE_END.split(raw):
        if not line or line[0] == 0x3A:  # blank, or a ":" comment
            continue
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    return Event(event, b"\n".join(data) if data else None)


def replace_data(raw: bytes, data: bytes) -> bytes:
    """``raw`` with its ``data`` lines replaced by one ``data: <data>`` line where the first one was;
    other lines, their order and the line-end style stay as they were."""
    match = _LINE_END.search(raw)
    eol = match.group() if match else b"\n"
    lines, out, placed = _LINE_END.split(raw), [], False
    for line in lines:
        if line.startswith(b"data") and line[4:5] in (b":", b""):
            if not placed:
                out.append(b"data: " + data)
                placed = True
            continue
        out.append(line)
    return eol.join(out)
