"""The change feed over HTTP against a real server: ``GET /v1/feed`` (pages, long polls,
filters, errors), ``GET /v1/feed/stream`` (SSE, resuming with Last-Event-ID), ``GET
/v1/projection``, and the AdminClient methods over them (``feed``, ``follow``,
``projection``), including a reconnect after a cut connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from crdtsync import AdminClient, Device
from crdtsync.admin import SseParser, sse_lines
from crdtsync.cli import build_parser
from crdtsync.errors import CursorExpired, MalformedRequest, Unauthorized
from crdtsync_server import Server
from crdtsync_server.api import feed as feed_api
from crdtsync_server.feed import FeedNotifier

from .conftest import ADMIN_TOKEN, DeviceFactory

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def emit(dev: Device, topic: str, count: int) -> None:
    for n in range(count):
        await dev.emit(topic, {"n": n})
    await dev.sync()


async def cursors(admin: AdminClient, **filters: Any) -> list[str]:
    items, _ = await admin.feed(limit=1000, **filters)
    return [item["cursor"] for item in items]


# --- GET /v1/feed -----------------------------------------------------------------------------


async def test_pages_follow_the_cursor(admin: AdminClient, make_device: DeviceFactory
                                       ) -> None:
    dev = await make_device("d1")
    await emit(dev, "t", 5)
    items, head = await admin.feed(limit=3)
    rest, end = await admin.feed(after=head, limit=3)
    assert [i["seq"] for i in items + rest] == [1, 2, 3, 4, 5]
    assert head == int(items[-1]["cursor"]) and end == int(rest[-1]["cursor"])
    assert items[0] == {"cursor": items[0]["cursor"], "key": "ev:d1:1", "kind": "event",
                        "device": "d1", "fleet": None, "time": items[0]["time"],
                        "received": items[0]["received"], "topic": "t", "seq": 1,
                        "body": {"n": 0}}
    assert await admin.feed(after=end) == ([], end)  # nothing new: next stays put


async def test_a_long_poll_returns_at_once_when_items_exist(
        admin: AdminClient, make_device: DeviceFactory) -> None:
    dev = await make_device("d1")
    await emit(dev, "t", 1)
    async with asyncio.timeout(20):  # a guard, far above the 60 s the poll could hold
        items, _ = await admin.feed(wait=60)
    assert [i["key"] for i in items] == ["ev:d1:1"]


def when_waiting(notifier: FeedNotifier, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set once a reader of the feed found nothing and waits on ``notifier`` (set
    as it starts waiting; a coroutine awaiting the event resumes after it went to sleep)."""
    entered = asyncio.Event()
    original = notifier.wait

    async def wait(seconds: float) -> None:
        entered.set()
        await original(seconds)

    monkeypatch.setattr(notifier, "wait", wait)
    return entered


async def test_a_long_poll_wakes_up_when_a_device_syncs(
        admin: AdminClient, make_device: DeviceFactory, server: Server,
        monkeypatch: pytest.MonkeyPatch) -> None:
    dev = await make_device("d1")
    await emit(dev, "t", 1)
    _, head = await admin.feed()
    waiting = when_waiting(server.services.feed, monkeypatch)
    poll = asyncio.create_task(admin.feed(after=head, wait=60))
    async with asyncio.timeout(20):  # a hang guard, not a timing check
        await waiting.wait()  # nothing to return yet: the server holds the request
    assert not poll.done()
    await emit(dev, "t", 1)
    async with asyncio.timeout(30):
        items, end = await poll
    assert [(i["key"], i["kind"]) for i in items] == [("ev:d1:2", "event")]
    assert end == int(items[0]["cursor"])


async def test_filters(admin: AdminClient, make_device: DeviceFactory) -> None:
    await admin.add_fleet("pumps")
    one, two = await make_device("d1"), await make_device("d2")
    await admin.set_fleet("d2", "pumps")
    for dev in (one, two):
        dev.state["v"] = dev.id
        await emit(dev, "temp", 2)
        await emit(dev, "hum", 1)
    everything, _ = await admin.feed(limit=1000)

    def expected(**where: str) -> list[str]:
        return [i["cursor"] for i in everything
                if all(i.get(name) == value for name, value in where.items())]

    for where in ({"device": "d1"}, {"fleet": "pumps"}, {"topic": "hum"}, {"kind": "state"},
                  {"kind": "event", "device": "d2", "topic": "temp"}):
        assert await cursors(admin, **where) == expected(**where) != []
    assert await cursors(admin, device="nobody") == []
    assert {i["kind"] for i in everything} == {"event", "state"}
    # several kinds, separated by commas
    assert await cursors(admin, kind="state,event") == [i["cursor"] for i in everything]
    assert await cursors(admin, kind="conflict,state") == expected(kind="state")


@pytest.mark.parametrize("query", ["after=abc", "after=-1", "after=99999999999999999999",
                                   "kind=nope", "kind=event,nope", "limit=0", "limit=1001",
                                   "wait=61", "wait=x"])
async def test_bad_parameters_get_a_typed_400(server: Server, query: str) -> None:
    async with aiohttp.ClientSession(headers=AUTH) as session, \
            session.get(f"{server.url}/v1/feed?{query}") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "malformed_request"


async def test_bad_parameters_raise_from_the_client(admin: AdminClient) -> None:
    with pytest.raises(MalformedRequest, match="after"):
        await admin.feed(after="abc")
    with pytest.raises(MalformedRequest, match="kind"):
        await admin.feed(kind="nope")
    with pytest.raises(MalformedRequest, match="limit"):
        await admin.feed(limit=0)
    with pytest.raises(MalformedRequest, match="Last-Event-ID"):
        await anext(admin.follow("abc"))


@pytest.mark.parametrize("path", ["/v1/feed", "/v1/feed/stream", "/v1/projection"])
async def test_the_admin_token_is_required(server: Server, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with aiohttp.ClientSession(headers=headers) as session, \
                session.get(server.url + path) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_the_client_raises_unauthorized_without_retrying(server: Server) -> None:
    async with AdminClient(server.url, "wrong") as admin:
        with pytest.raises(Unauthorized):
            await admin.feed()
        with pytest.raises(Unauthorized):
            await anext(admin.follow())
        with pytest.raises(Unauthorized):
            await admin.projection()


# --- GET /v1/feed/stream ----------------------------------------------------------------------


@pytest.fixture
def quick_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep-alive comments every 0.2 s: a stream handler notices its client left at its next
    write, so the server shuts down at once at the end of the test (else after 15 s)."""
    monkeypatch.setattr(feed_api, "HEARTBEAT_S", 0.2)



async def read_stream(session: aiohttp.ClientSession, url: str, count: int,
                      last_id: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """``(id, event, data)`` of the first ``count`` events of a stream, then hang up."""
    headers = {"Last-Event-ID": last_id} if last_id is not None else {}
    events: list[tuple[str, str, dict[str, Any]]] = []
    parser = SseParser()
    async with asyncio.timeout(30), session.get(url, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        async for line in sse_lines(resp.content):
            if (event := parser.line(line)) is not None:
                events.append((event.id, event.event, json.loads(event.data)))
                if len(events) == count:
                    break
    return events


@pytest.mark.usefixtures("quick_heartbeat")
async def test_sse_resumes_exactly_after_last_event_id(
        admin: AdminClient, server: Server, make_device: DeviceFactory) -> None:
    dev = await make_device("d1")
    dev.state["x"] = 1
    await emit(dev, "t", 6)
    everything = await cursors(admin)
    url = server.url + "/v1/feed/stream"
    async with aiohttp.ClientSession(headers=AUTH) as session:
        first = await read_stream(session, url, 3)
        rest = await read_stream(session, url, len(everything) - 3, last_id=first[-1][0])
        only_state = await read_stream(session, url + "?kind=state", 1, last_id="0")
    ids = [event_id for event_id, _, _ in first + rest]
    assert ids == everything  # no duplicate, no gap
    assert all(event_id == data["cursor"] and kind == data["kind"]
               for event_id, kind, data in first + rest)
    assert [kind for _, kind, _ in only_state] == ["state"]


@pytest.mark.usefixtures("quick_heartbeat")
async def test_follow_streams_old_then_new_items(admin: AdminClient,
                                                 make_device: DeviceFactory) -> None:
    dev = await make_device("d1")
    await emit(dev, "t", 2)
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(30), contextlib.aclosing(admin.follow(kind="event")) as feed:
        async for item in feed:
            seen.append(item)
            if len(seen) == 2:
                await emit(dev, "t", 1)  # stored while the stream is open
            if len(seen) == 3:
                break
    assert [i["key"] for i in seen] == ["ev:d1:1", "ev:d1:2", "ev:d1:3"]


class CutProxy:
    """A TCP proxy whose connections can all be cut at once (a network failure)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    async def __aenter__(self) -> CutProxy:
        self.server = await asyncio.start_server(self.accept, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}
        await asyncio.gather(self.pipe(reader, up_writer), self.pipe(up_reader, writer),
                             return_exceptions=True)
        for side in (writer, up_writer):
            side.close()
            self.writers.discard(side)

    @staticmethod
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


@pytest.mark.usefixtures("quick_heartbeat")
async def test_follow_reconnects_after_a_cut_and_misses_nothing(
        admin: AdminClient, server: Server, make_device: DeviceFactory) -> None:
    dev = await make_device("d1")
    await emit(dev, "t", 4)
    seen: list[str] = []
    async with CutProxy(server.port) as proxy, AdminClient(proxy.url, ADMIN_TOKEN) as via, \
            asyncio.timeout(60), contextlib.aclosing(via.follow()) as feed:
        async for item in feed:
            seen.append(item["key"])
            if len(seen) == 2:
                proxy.cut()  # mid-stream: items 3 and 4 were maybe sent, maybe not
            if len(seen) == 4:
                await emit(dev, "t", 2)  # stored while the stream may be down
            if len(seen) == 6:
                break
        assert proxy.connections >= 2
    assert seen == [f"ev:d1:{n}" for n in range(1, 7)]


async def test_sse_parser() -> None:
    parser = SseParser("7")
    lines = [": keep-alive", "", "retry: 2500", "id: 8", "event: state", "data: {", "data: }",
             "", "data:x", "unknown: field", "", "id: 10", "", "id: 11", "data: partial"]
    events = [e for line in lines if (e := parser.line(line)) is not None]
    assert [(e.id, e.event, e.data) for e in events] == [("8", "state", "{\n}"),
                                                         ("8", "message", "x")]
    assert (parser.retry, parser.last_id) == (2.5, "10")  # an id without data still counts
    parser.reset()  # the connection dropped in the middle of event 11
    assert parser.line("") is None and parser.last_id == "10"

    class Content:
        async def iter_any(self) -> AsyncIterator[bytes]:
            for chunk in (b"id: 1\r\nda", b"ta: ", b"\xc3", b"\xa9\n\n" + b"data: " + b"x" *
                          300_000 + b"\n\n"):
                yield chunk

    got = [line async for line in sse_lines(Content())]  # type: ignore[arg-type]
    assert got[:4] == ["id: 1", "data: é", "", "data: " + "x" * 300_000]


# --- GET /v1/projection, cloud writes ---------------------------------------------------------


def document(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Projection rows of one device's ``state`` document as ``{map: {key: value}}``."""
    doc: dict[str, dict[str, Any]] = {}
    for row in rows:
        assert row["doc"] == "state"
        doc.setdefault(row["map"], {})[row["key"]] = row["value"]
    return doc


VALUES = [0, -7, 3.25, True, False, "text", "", "ünï", [1, "two", None], {"a": {"b": [1]}}]


@pytest.mark.parametrize("seed", range(3))
async def test_projection_equals_the_device_state_after_random_edits(
        admin: AdminClient, make_device: DeviceFactory, monkeypatch: pytest.MonkeyPatch,
        seed: int) -> None:
    monkeypatch.setattr("crdtsync.admin.MAX_PAGE", 4)  # several projection pages
    rng = random.Random(seed)
    dev, other = await make_device("d1"), await make_device("d2")
    other.state["untouched"] = 1
    await other.sync()
    keys = [f"k{n}" for n in range(8)]
    for _ in range(12):
        for _ in range(rng.randint(1, 4)):
            target = dev.state if rng.random() < 0.7 else dev.map("config")
            key = rng.choice(keys)
            if rng.random() < 0.25 and key in target:
                del target[key]
            else:
                target[key] = rng.choice(VALUES)
        await dev.sync()
        cloud = {key: None if rng.random() < 0.3 else rng.choice(VALUES)
                 for key in rng.sample(keys, rng.randint(1, 3))}
        await admin.patch_state("d1", cloud, rng.choice(["state", "config"]))
        await dev.sync()
        maps = {name: dev.map(name).to_dict() for name in ("state", "config")}
        expected = {name: values for name, values in maps.items() if values}
        assert document(await admin.projection("d1")) == expected
        cloud_doc = await admin.state("d1")
        assert {name: values for name, values in cloud_doc.items() if values} == expected
    assert document(await admin.projection("d2")) == {"state": {"untouched": 1}}
    assert {row["device"] for row in await admin.projection()} == {"d1", "d2"}


async def test_a_cloud_write_appears_in_the_feed_with_source_cloud(
        admin: AdminClient, make_device: DeviceFactory) -> None:
    dev = await make_device("d1")
    dev.state.update({"a": 1, "b": 2})
    await dev.sync()
    await admin.patch_state("d1", {"a": None, "c": [3]})
    await admin.patch_state("d1", {"unit": "C"}, "config")
    items, _ = await admin.feed(kind="state")
    assert [(i["source"], i["doc"], i["changes"]) for i in items] == [
        ("device", "state", {"state": {"a": 1, "b": 2}}),
        ("cloud", "state", {"state": {"a": None, "c": [3]}}),
        ("cloud", "state", {"config": {"unit": "C"}})]
    assert [i["key"] for i in items] == [f"st:{i['cursor']}" for i in items]
    assert document(await admin.projection("d1")) == {"state": {"b": 2, "c": [3]},
                                                      "config": {"unit": "C"}}


async def test_cli_feed(admin: AdminClient, make_device: DeviceFactory,
                        capsys: pytest.CaptureFixture[str]) -> None:
    dev = await make_device("d1")
    dev.state["a"] = 1
    await emit(dev, "t", 2)
    args = build_parser().parse_args(["feed", "--kind", "event", "--url", admin.url,
                                      "--admin-token", ADMIN_TOKEN])
    assert await args.run(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["key"] for line in lines] == ["ev:d1:1", "ev:d1:2"]


async def test_shutdown_releases_long_polls_and_streams(tmp_path: Any) -> None:
    """A server stopping does not wait out its readers' long polls (here 60 s) or streams:
    they are answered at once and the shutdown finishes."""
    from crdtsync_server import ServerConfig

    server = Server(ServerConfig(db=str(tmp_path / "s.db"), port=0, admin_token=ADMIN_TOKEN))
    await server.start()
    notifier = server.services.feed
    waiting: set[asyncio.Task[Any] | None] = set()
    both_wait = asyncio.Event()
    wait = notifier.wait

    async def noted_wait(seconds: float) -> None:
        waiting.add(asyncio.current_task())
        if len(waiting) >= 2:
            both_wait.set()
        await wait(seconds)

    notifier.wait = noted_wait  # type: ignore[method-assign]
    async with aiohttp.ClientSession(headers=AUTH) as session:
        poll = asyncio.create_task(session.get(f"{server.url}/v1/feed?wait=60"))
        stream = await session.get(f"{server.url}/v1/feed/stream")
        assert await stream.content.readline() == b"retry: 1000\n"
        await asyncio.wait_for(both_wait.wait(), 20)  # both handlers wait for items
        await asyncio.wait_for(server.aclose(), 20)  # far below the 60 s poll
        answer = await asyncio.wait_for(poll, 5)
        assert answer.status == 200 and (await answer.json())["items"] == []
        stream.close()


# --- retention: a purged feed -----------------------------------------------------------------


async def purge_all(server: Server) -> int:
    """Purge every item stored so far (as the purge loop does once they are old enough)."""
    store = server.services.store
    return await store.purge_feed(before=2**62, keep_after=await store.feed_head())


@pytest.mark.usefixtures("quick_heartbeat")
async def test_a_cursor_below_the_floor_is_expired_not_silently_skipped(
        admin: AdminClient, server: Server, make_device: DeviceFactory) -> None:
    dev = await make_device("d1")
    await emit(dev, "t", 3)
    _, head = await admin.feed()
    assert await purge_all(server) == 3
    await emit(dev, "t", 1)
    for after in (1, head - 1):
        with pytest.raises(CursorExpired) as info:
            await admin.feed(after=after)
        assert info.value.detail == {"after": str(after), "floor": str(head)}
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.get(f"{server.url}/v1/feed?after=1") as resp:
            assert resp.status == 410 and (await resp.json())["error"]["code"] == "cursor_expired"
        async with session.get(f"{server.url}/v1/feed/stream",
                               headers={"Last-Event-ID": "2"}) as resp:
            assert resp.status == 410
        # From the floor, or from 0 ("the oldest item kept"), nothing was missed.
        tail = await read_stream(session, f"{server.url}/v1/feed/stream", 1, last_id=str(head))
    assert [data["seq"] for _, _, data in tail] == [4]
    for after in (0, head):
        items, _ = await admin.feed(after=after)
        assert [i["seq"] for i in items] == [4]
    with pytest.raises(CursorExpired):
        async with contextlib.aclosing(admin.follow(after=1)) as feed:
            await anext(feed)


async def test_a_stream_that_falls_behind_a_purge_ends_with_an_error_event(
        tmp_path: Any) -> None:
    """Items are stored and purged while a stream waits (without waking it: written to the
    store directly, and no re-poll for 60 s); when it is woken it reports the gap."""
    from crdtsync.protocol import Event
    from crdtsync_server import ServerConfig
    from crdtsync_server.store import DeviceRecord, SyncWrite

    config = ServerConfig(db=str(tmp_path / "s.db"), port=0, admin_token=ADMIN_TOKEN,
                          feed_poll=60)
    async with Server(config) as server, aiohttp.ClientSession(headers=AUTH) as session:
        store = server.services.store
        await store.add_device(DeviceRecord("d1", "hash", created=1))
        await store.commit(SyncWrite("d1", 10, events=[Event(1, "t", 1, {"n": 1})]))
        events: list[tuple[str, dict[str, Any]]] = []
        async with asyncio.timeout(30), session.get(f"{server.url}/v1/feed/stream") as resp:
            parser = SseParser()
            async for line in sse_lines(resp.content):
                if (event := parser.line(line)) is None:
                    continue
                events.append((event.event, json.loads(event.data)))
                if len(events) == 1:  # the stream now waits for a notification
                    await store.commit(SyncWrite("d1", 11, events=[
                        Event(seq, "t", 1, {"n": seq}) for seq in (2, 3)]))
                    await purge_all(server)
                    await store.commit(SyncWrite("d1", 12, events=[Event(4, "t", 1, {})]))
                    server.services.feed.notify()
    assert [kind for kind, _ in events] == ["event", "error"]
    assert events[1][1]["error"]["code"] == "cursor_expired"
    assert events[1][1]["error"]["detail"] == {"after": "1", "floor": "3"}
