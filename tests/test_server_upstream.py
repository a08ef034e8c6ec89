"""The relay's own HTTP/1.1 client against real sockets and hand-written responses.

Each test starts an asyncio TCP server on loopback that reads one request and answers with
exactly the bytes the test chose (split how the test chose): framing the aiohttp and uvicorn
servers in the other tests never produce (a chunk size split across reads, a 100 Continue,
an idle close, a stall) is covered here.
"""

from __future__ import annotations

import asyncio
import random
from functools import partial

import pytest
from server_fixtures import Script, read_request, scripted_server

from router.server import upstream as upstream_module
from router.server.upstream import (
    Upstream,
    UpstreamError,
    _parse_head,
    _parsed_head,
    _split_whole,
    _walk_chunks,
    _whole_chunks,
)


def _answering(answer: bytes) -> Script:
    """A server script: read one request, send `answer` as one write, hold the connection."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(answer)
        await w.drain()
        await asyncio.sleep(0.1)

    return script


def _client(read_timeout_s: float = 5.0) -> Upstream:
    return Upstream(connect_timeout_s=2.0, read_timeout_s=read_timeout_s)


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def test_chunked_body_split_at_every_byte_is_reassembled_and_the_connection_reused() -> None:
    events = [b'data: {"n": %d}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]
    body = _chunked(*events)
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    whole = head + body
    seen: list[int] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        seen.append(n)
        while True:
            try:
                await read_request(r)
            except asyncio.IncompleteReadError:
                return
            for i in range(len(whole)):  # one byte per write: every split a reader can meet
                w.write(whole[i : i + 1])
                await w.drain()
                await asyncio.sleep(0)

    upstream = _client()
    async with scripted_server(script) as url:
        target = upstream.target(url + "/generate")
        for _ in range(3):
            response = await upstream.post(target, b'{"text": "hi"}', b"X-Request-Id: r\r\n")
            assert response.status == 200
            assert response.headers["content-type"] == "text/event-stream"
            got: list[bytes] = []
            await response.relay(partial(_keep, got), _no_drain)
            assert b"".join(got) == b"".join(events)
        upstream.close()
    assert seen == [1]  # three requests, one connection


def _keep(into: list[bytes], data: bytes) -> bool:
    into.append(data)
    return False


async def _no_drain() -> None:
    raise AssertionError("no drain was asked for")


async def test_content_length_close_delimited_and_100_continue_bodies() -> None:
    answers = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"until": "close"}',
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ]

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(answers[n - 1])
        await w.drain()
        if n in (3,):  # the body ends with the connection
            w.close()
            return
        await asyncio.sleep(0.05)

    upstream = _client()
    async with scripted_server(script) as url:
        target = upstream.target(url + "/v1/completions")
        bodies = []
        for _ in answers:
            response = await upstream.post(target, b"{}", b"")
            bodies.append((response.status, await response.read()))
        upstream.close()
    assert bodies == [(200, b"hello"), (404, b"no"), (200, b'{"until": "close"}'), (204, b"")]


async def test_request_bytes_on_the_wire() -> None:
    sent: list[bytes] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        sent.append(await read_request(r))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await asyncio.sleep(0.05)

    upstream = _client()
    async with scripted_server(script) as url:
        port = url.rsplit(":", 1)[1]
        response = await upstream.post(
            upstream.target(url + "/generate?x=1"), b'{"a": 1}', b"X-Request-Id: abc\r\n"
        )
        assert await response.read() == b"ok"
        upstream.close()
    assert sent == [
        b"POST /generate?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%b\r\nContent-Length: 8\r\n"
        b"X-Request-Id: abc\r\n\r\n"
        b'{"a": 1}' % port.encode()
    ]


async def test_a_connection_the_server_dropped_while_idle_is_written_again_fresh() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % n)
        await w.drain()
        # no Connection: close, yet the server closes right after (a keep-alive timeout)

    upstream = _client()
    async with scripted_server(script) as url:
        target = upstream.target(url + "/generate")
        first = await upstream.post(target, b"{}", b"")
        assert await first.read() == b"1"
        await asyncio.sleep(0.1)  # the close reaches the pooled connection
        second = await upstream.post(target, b"{}", b"")
        assert await second.read() == b"2"
        upstream.close()


async def test_stale_connection_closed_as_the_request_goes_out_is_retried_once() -> None:
    """The race the idle check cannot see: the server closes without answering."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        if n == 1:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
            await w.drain()
            await read_request(r)  # the second request arrives on the same connection...
            return  # ...and the server closes it unanswered
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
        await w.drain()
        await asyncio.sleep(0.05)

    upstream = _client()
    async with scripted_server(script) as url:
        target = upstream.target(url + "/generate")
        assert await (await upstream.post(target, b"{}", b"")).read() == b"a"
        assert await (await upstream.post(target, b"{}", b"")).read() == b"b"
        upstream.close()


async def test_refused_malformed_and_silent_backends_raise() -> None:
    upstream = _client(read_timeout_s=0.3)
    async with scripted_server(_stall) as url:
        dead = url.rsplit(":", 1)[0] + ":1"
        with pytest.raises(UpstreamError, match=r"connect to 127\.0\.0\.1:1"):
            await upstream.post(upstream.target(dead + "/generate"), b"{}", b"")
        with pytest.raises(TimeoutError, match="no byte from the backend"):
            await upstream.post(upstream.target(url + "/generate"), b"{}", b"")

    async with scripted_server(_answering(b"SPDY/9 what\r\n\r\n")) as url:
        with pytest.raises(UpstreamError, match="malformed response head"):
            await upstream.post(upstream.target(url + "/generate"), b"{}", b"")

    bad_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
    async with scripted_server(_answering(bad_chunk)) as url:
        response = await upstream.post(upstream.target(url + "/generate"), b"{}", b"")
        with pytest.raises(UpstreamError, match="malformed chunk size"):
            await response.read()
    upstream.close()


async def _stall(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
    await read_request(r)
    await asyncio.sleep(2)


async def test_a_stream_that_breaks_midway_raises_after_what_arrived() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        w.write(b"6\r\ndata: \r\n3\r\n1\n\n\r\n")
        await w.drain()
        await asyncio.sleep(0.05)
        w.transport.abort()  # a reset, no terminal chunk

    upstream = _client()
    async with scripted_server(script) as url:
        response = await upstream.post(upstream.target(url + "/generate"), b"{}", b"")
        got: list[bytes] = []
        with pytest.raises(UpstreamError):
            await response.relay(partial(_keep, got), _no_drain)
        assert b"".join(got) == b"data: 1\n\n"
        response.release()
        upstream.close()


async def test_a_sink_that_asks_for_a_drain_pauses_the_backend_until_drained() -> None:
    pieces = [b"x" * 1000 for _ in range(20)]

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            w.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await w.drain()
            await asyncio.sleep(0.002)
        w.write(b"0\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.05)

    upstream = _client()
    drains = 0
    got: list[bytes] = []
    draining = False

    def sink(data: bytes) -> bool:
        assert not draining  # nothing arrives while the client drains
        got.append(data)
        return True  # every read: the client's buffer is full

    async def drain() -> None:
        nonlocal drains, draining
        drains += 1
        draining = True
        await asyncio.sleep(0.01)
        draining = False

    async with scripted_server(script) as url:
        response = await upstream.post(upstream.target(url + "/generate"), b"{}", b"")
        await response.relay(sink, drain)
        upstream.close()
    assert b"".join(got) == b"".join(pieces)
    assert drains >= 1


async def test_a_sink_error_ends_the_exchange_and_closes_the_connection() -> None:
    class Gone(Exception):
        pass

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await w.drain()
        for _ in range(100):
            w.write(b"3\r\nabc\r\n")
            await w.drain()
            await asyncio.sleep(0.01)

    def sink(data: bytes) -> bool:
        raise Gone()

    upstream = _client()
    async with scripted_server(script) as url:
        response = await upstream.post(upstream.target(url + "/generate"), b"{}", b"")
        with pytest.raises(Gone):
            await response.relay(sink, _no_drain)
        response.release()
        assert upstream.idle_count(upstream.target(url + "/generate").key) == 0  # not pooled
        upstream.close()


async def test_chunk_extensions_and_trailers_are_skipped() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n1 \r\n!\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    upstream = _client()
    async with scripted_server(_answering(answer)) as url:
        response = await upstream.post(upstream.target(url + "/generate"), b"{}", b"")
        assert await response.read() == b"hello!"
        upstream.close()


async def test_idle_connections_past_their_timeout_are_closed_as_others_come_back() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    upstream = Upstream(connect_timeout_s=2.0, read_timeout_s=5.0, idle_timeout_s=0.2)
    async with scripted_server(script) as url:
        target = upstream.target(url + "/generate")

        async def one() -> bytes:
            return await (await upstream.post(target, b"{}", b"")).read()

        assert await asyncio.gather(*(one() for _ in range(5))) == [b"ok"] * 5
        assert upstream.idle_count(target.key) == 5  # a burst of five left five idle
        for _ in range(8):  # steady single requests reuse the warmest; the other four age
            assert await one() == b"ok"
            await asyncio.sleep(0.05)
        assert upstream.idle_count(target.key) == 1  # pruned as the warm one came back
        upstream.close()


async def test_whole_chunks_pass_through_raw_and_the_rest_goes_as_payload() -> None:
    reads = [
        b"6\r\ndata: \r\n3\r\n1\n\n\r\n",  # two whole chunks: raw, as they came
        b"9\r\ndata: 2\n\n\r\n9\r\nda",  # a chunk cut short: the payload path
        b"ta: 3\n\n\r\n",  # the rest of it (mid-chunk): payload
        b"9\r\ndata: 4\n\n\r\n",  # declined by the raw sink: payload
        b"9\r\ndata: 5\n\n\r\n0\r\n\r\n",  # a whole chunk and the end: raw, end seen
    ]

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in reads:
            await asyncio.sleep(0.02)  # one read each
            w.write(piece)
            await w.drain()
        await asyncio.sleep(0.1)

    got: list[tuple[str, bytes]] = []

    def raw(framed: bytes, ended: bool) -> bool | None:
        if b"data: 4" in framed:
            return None
        got.append(("raw, ended" if ended else "raw", framed))
        return False

    def sink(payload: bytes) -> bool:
        got.append(("payload", payload))
        return False

    upstream = _client()
    async with scripted_server(script) as url:
        target = upstream.target(url + "/v1/completions")
        response = await upstream.post(target, b"{}", b"")
        await response.relay(sink, _no_drain, raw)
        assert upstream.idle_count(target.key) == 1  # the end was seen: pooled for reuse
        upstream.close()
    assert got == [
        ("raw", reads[0]),
        ("payload", b"data: 2\n\nda"),
        ("payload", b"ta: 3\n\n"),
        ("payload", b"data: 4\n\n"),
        ("raw, ended", reads[4]),  # with the terminal chunk: the sink writes the end or not
    ]


async def test_whole_chunks_then_a_split_one_in_the_same_read() -> None:
    """A read of whole chunks ending in part of the next (the walk, then the state machine
    from where it stopped), then the rest with the terminal chunk (walked to the end)."""
    events = [b'data: {"n": %d}\n\n' % i for i in range(4)]
    body = _chunked(*events)
    cut = body.index(b"\r\n", body.index(events[3])) - 3  # inside the fourth chunk's payload
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        for part in (head + body[:cut], body[cut:]):
            w.write(part)
            await w.drain()
            await asyncio.sleep(0.05)

    upstream = _client()
    async with scripted_server(script) as url:
        response = await upstream.post(upstream.target(url + "/generate"), b"{}", b"")
        got: list[bytes] = []
        await response.relay(partial(_keep, got), _no_drain)
        assert b"".join(got) == b"".join(events)
        assert len(got) == 2  # one payload per read: three events and a part, then the rest
        upstream.close()


def test_the_split_check_agrees_with_the_walk_wherever_it_answers() -> None:
    """`_split_whole` (C-level calls, long reads) says what the chunk-by-chunk walk says, or
    nothing: random reads of whole chunks, with and without the terminal chunk, payloads with
    and without CRLFs, cut at random places, and a few malformed ones."""
    rng = random.Random(13)
    answered = 0
    for case in range(3000):
        events = [
            b"data: %b\n\n" % bytes(rng.choice(b"ab{}: \r\n") for _ in range(rng.randint(0, 60)))
            if rng.random() < 0.2
            else b'data: {"n": %d}\n\n' % i
            for i in range(rng.randint(1, 40))
        ]
        data = b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events)
        if rng.random() < 0.3:
            data += b"0\r\n\r\n"
        if rng.random() < 0.3:
            data = data[: rng.randint(0, len(data))]
        if case % 50 == 0:
            data = data.replace(b"\r\n", b";x=1\r\n", 1)  # an extension
        want_pieces: list[bytes] = []
        want = _walk_chunks(data, want_pieces)
        got_pieces: list[bytes] = []
        got = _split_whole(data, got_pieces)
        if got is not None:
            answered += 1
            assert (got, got_pieces) == (want, want_pieces), data
        else:
            assert not got_pieces
        assert _whole_chunks(data) == want
    assert answered > 300  # reads of whole chunks of CRLF-free events are answered


def _walk_by_int(data: bytes) -> tuple[int, bool, list[bytes]]:
    """The chunk walk with `int(size, 16)` for every size line: what `_walk_chunks` answered
    before its table of sizes, kept here as the reference."""
    pos, payloads = 0, []
    while pos < len(data):
        end = data.find(b"\r\n", pos, pos + 18)
        if end < 0:
            return pos, False, payloads
        try:
            size = int(data[pos:end], 16)
        except ValueError:
            return -1, False, payloads
        if not size:
            return pos, data[end:] == b"\r\n\r\n", payloads
        stop = end + 2 + size
        if stop + 2 > len(data) or data[stop : stop + 2] != b"\r\n":
            return (pos, False, payloads) if stop + 2 > len(data) else (-1, False, payloads)
        payloads.append(data[end + 2 : stop])
        pos = stop + 2
    return pos, False, payloads


def test_the_walks_size_table_reads_every_spelling_as_int_does() -> None:
    """Sizes in the table (lower-case hex) and out of it (upper case, leading zeros, a `0x`,
    spaces, 4 KiB and more, garbage) give the walk the answer `int(size, 16)` gives."""
    rng = random.Random(1313)
    spellings = (
        lambda n: b"%x" % n,
        lambda n: b"%X" % n,
        lambda n: b"0%x" % n,
        lambda n: b"0x%x" % n,
        lambda n: b" %x" % n,
        lambda n: b"%x " % n,
    )
    for case in range(2000):
        pieces = []
        for _ in range(rng.randint(1, 8)):
            size = rng.choice((rng.randint(1, 300), rng.randint(3000, 5000)))
            spell = spellings[0] if rng.random() < 0.7 else rng.choice(spellings)
            pieces.append(b"%b\r\n%b\r\n" % (spell(size), b"x" * size))
        if rng.random() < 0.3:
            pieces.append(rng.choice((b"0\r\n\r\n", b"00\r\n\r\n", b"0\r\nT: 1\r\n\r\n")))
        if case % 40 == 0:
            pieces.insert(rng.randrange(len(pieces)), b"zz\r\nxx\r\n")  # not a size
        data = b"".join(pieces)
        if rng.random() < 0.3:
            data = data[: rng.randint(0, len(data))]
        got: list[bytes] = []
        pos, ended = _walk_chunks(data, got)
        assert (pos, ended, got) == _walk_by_int(data), data[:80]


def test_a_remembered_head_reads_as_parsed_and_each_caller_owns_its_headers() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-A: 1\r\nx-a: 2\r\n"
        b"Transfer-Encoding: chunked\r\nDate: Sat, 05 Dec 2026 02:10:46 GMT"
    )
    first = _parsed_head(bytes(bytearray(head)))  # equal bytes, another object
    first[1]["x-a"] = "changed by its caller"
    second = _parsed_head(bytes(bytearray(head)))
    assert first[0] == second[0] == 200 and second == _parse_head(head)
    assert second[1]["x-a"] == "1, 2"
    for bad in (b"HTTX/1.1 200 OK", b"HTTP/1.1 200 OK\r\nno colon"):
        for _ in range(2):  # refused each time: a malformed head is never remembered
            with pytest.raises(ValueError):
                _parsed_head(bad)
    for k in range(3 * upstream_module._HEADS_KEPT):  # bounded
        assert _parsed_head(b"HTTP/1.1 200 OK\r\nContent-Length: %d" % k)[1] == {
            "content-length": str(k)
        }
    assert len(upstream_module._HEADS) <= upstream_module._HEADS_KEPT


async def test_the_read_timeout_of_a_kept_alive_connections_next_request_counts_from_it() -> None:
    """The read timer an exchange leaves pending serves the next one on the same connection:
    a request sent 0.2 s after the last (timeout 0.5 s) that gets no answer times out 0.5 s
    after it was sent, not when the old timer fires; an idle connection's timer ends."""
    loop = asyncio.get_running_loop()
    sent_second = 0.0

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        await w.drain()
        await read_request(r)  # the second request: never answered
        await asyncio.sleep(3)

    upstream = _client(read_timeout_s=0.5)
    async with scripted_server(script) as url:
        target = upstream.target(url + "/generate")
        assert await (await upstream.post(target, b"{}", b"")).read() == b"a"
        (conn,) = upstream._idle[target.key]
        assert conn._timer is not None  # left pending for the next exchange
        await asyncio.sleep(0.2)
        sent_second = loop.time()
        with pytest.raises(TimeoutError, match="no byte from the backend"):
            await upstream.post(target, b"{}", b"")
        assert 0.45 <= loop.time() - sent_second < 1.0

    async def answer_and_hold(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
        await w.drain()
        await asyncio.sleep(3)

    async with scripted_server(answer_and_hold) as url:
        target = upstream.target(url + "/generate")
        assert await (await upstream.post(target, b"{}", b"")).read() == b"b"
        (conn,) = upstream._idle[target.key]
        await asyncio.sleep(0.7)  # idle past the period: the timer fired and ended
        assert conn._timer is None and not conn.closed and conn.error is None
    upstream.close()
