"""The ``nats`` sink against a real NATS JetStream server (``tests/services.py``): subjects,
message ids, deduplication of redelivered batches, per-device order, the stream's creation
and its absence, errors, and the feed of a real server (devices, a restart) reaching the
stream once per key. Each test uses its own stream and subject prefix and deletes them."""

from __future__ import annotations

import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from crdtsync import AdminClient, Device
from crdtsync.errors import MalformedRequest, SinkError, SinkRejected
from crdtsync_server import Server, ServerConfig
from crdtsync_server.sinks import SINK_TYPES, Sink, SinkConfig
from crdtsync_server.sinks.nats import MSG_ID, item_subject, subject_token
from crdtsync_server.store.feed import FeedItem

from .conftest import ADMIN_TOKEN
from .services import require_nats
from .test_sinks_e2e import (
    assert_device_order,
    caught_up,
    eventually,
    feed_keys,
    produce,
    server_config,
    start_devices,
    start_pinned,
)

__all__ = ["server_config"]  # the e2e fixture: readers re-poll the feed often

SERVICE = pytest.mark.service


# --- feed items built by hand (shared with test_sinks_postgres) --------------------------------

def event(cursor: int, device: str, seq: int, topic: str = "reading",
          fleet: str | None = None, body: Any = None) -> FeedItem:
    return FeedItem(cursor, "event", device, fleet, 1_700_000_000_000 + seq, 1_700_000_000_500,
                    {"n": seq} if body is None else body, topic, seq)


def state(cursor: int, device: str, changes: dict[str, dict[str, Any]], doc: str = "state",
          fleet: str | None = None) -> FeedItem:
    return FeedItem(cursor, "state", device, fleet, 1_700_000_000_000 + cursor,
                    1_700_000_000_000 + cursor, changes, doc=doc, source="device")


def conflict(cursor: int, device: str, key: str = "k", fleet: str | None = None) -> FeedItem:
    body = {"map": "state", "key": key,
            "winner": {"writer": "cloud", "time": 1_700_000_000_000, "value": "c"},
            "loser": {"writer": "device", "time": 1_699_999_999_000, "deleted": True}}
    return FeedItem(cursor, "conflict", device, fleet, 1_700_000_000_000 + cursor,
                    1_700_000_000_000 + cursor, body, doc="state")


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- subjects (no service) ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["d1", "temp.inside", "a:b", "_x", "_", "x y*>%", "é.ü",
                                  "-_~"])
def test_a_name_is_one_reversible_subject_token(name: str) -> None:
    token = subject_token(name)
    assert token and not any(c in token for c in ". *>\t")
    assert token.isascii() and not token.startswith("_")
    assert unquote(token) == name


def test_subjects_name_fleet_device_topic_or_document() -> None:
    assert item_subject("cs", event(1, "dev.1", 1, "temp.c")) == "cs._.dev%2E1.temp%2Ec"
    assert item_subject("a.b", event(2, "d", 1, fleet="f:1")) == "a.b.f%3A1.d.reading"
    assert item_subject("cs", state(3, "d", {}, doc="state")) == "cs._.d._state.state"
    assert item_subject("cs", conflict(6, "d", fleet="n")) == "cs.n.d._conflict.state"
    # no topic can pose as the state marker, no fleet as "no fleet"
    assert item_subject("cs", event(4, "d", 1, "_state")) == "cs._.d.%5Fstate"
    assert item_subject("cs", event(4, "d", 1, "_conflict")) == "cs._.d.%5Fconflict"
    assert item_subject("cs", event(5, "d", 1, fleet="_")) == "cs.%5F.d.reading"


@pytest.mark.parametrize(("options", "field"), [
    ({"stream": "a.b"}, "stream"), ({"subject_prefix": "a.*"}, "subject_prefix"),
    ({"subject_prefix": "a..b"}, "subject_prefix"), ({"url": "http://x"}, "url"),
    ({"create_stream": "yes"}, "create_stream"), ({"duplicate_window": 0}, "duplicate_window"),
    ({"timeout": -1}, "timeout")])
def test_options_are_validated(options: dict[str, Any], field: str) -> None:
    with pytest.raises(MalformedRequest) as info:
        SINK_TYPES["nats"](SinkConfig("js", "nats", options))
    assert info.value.detail["field"] == f"options.{field}"


# --- against JetStream -------------------------------------------------------------------------

@dataclass
class JetStream:
    """A test's own stream and subject prefix on the real server."""

    url: str
    nc: Client
    js: JetStreamContext
    stream: str
    prefix: str

    def options(self, **extra: Any) -> dict[str, Any]:
        return {"url": self.url, "stream": self.stream, "subject_prefix": self.prefix,
                **extra}

    def sink(self, **extra: Any) -> Sink:
        return SINK_TYPES["nats"](SinkConfig("js", "nats", self.options(**extra)))

    async def messages(self) -> list[Msg]:
        """Every message of the stream, read through a pull consumer (and acked)."""
        total = (await self.js.stream_info(self.stream)).state.messages
        sub = await self.js.pull_subscribe(f"{self.prefix}.>", stream=self.stream)
        got: list[Msg] = []
        try:
            while len(got) < total:
                for msg in await sub.fetch(min(100, total - len(got)), timeout=10):
                    await msg.ack()
                    got.append(msg)
        finally:
            await sub.unsubscribe()
        return got


@pytest.fixture
async def jetstream() -> AsyncIterator[JetStream]:
    url = require_nats()
    tag = uuid.uuid4().hex[:12]
    nc = await nats.connect(url)
    bus = JetStream(url, nc, nc.jetstream(), f"TEST_{tag}", f"test{tag}")
    try:
        yield bus
    finally:
        with contextlib.suppress(NotFoundError):
            await bus.js.delete_stream(bus.stream)
        await nc.close()


async def delivered(sink: Sink, *batches: Sequence[FeedItem]) -> None:
    """Open ``sink``, deliver ``batches`` in order, close it."""
    await sink.open()
    try:
        for batch in batches:
            await sink.deliver(batch)
    finally:
        await sink.aclose()


@SERVICE
async def test_each_item_is_stored_once_with_its_key_subject_and_json(
        jetstream: JetStream) -> None:
    items = [event(1, "d.1", 1, "temp.in", fleet="north"), event(2, "d2", 1),
             state(3, "d.1", {"state": {"mode": "eco", "old": None}}, fleet="north"),
             event(4, "d.1", 2, "temp.in", fleet="north"), event(5, "d2", 2)]
    # a batch delivered twice, then again overlapping the next one (a retry after a failure)
    await delivered(jetstream.sink(), items[:3], items[:3], items[1:], items)

    messages = await jetstream.messages()
    assert [msg.headers[MSG_ID] for msg in messages if msg.headers] == [i.key for i in items]
    assert [msg.subject for msg in messages] == [
        f"{jetstream.prefix}.north.d%2E1.temp%2Ein", f"{jetstream.prefix}._.d2.reading",
        f"{jetstream.prefix}.north.d%2E1._state.state", f"{jetstream.prefix}.north.d%2E1.temp%2Ein",
        f"{jetstream.prefix}._.d2.reading"]
    assert [json.loads(msg.data) for msg in messages] == [
        json.loads(json.dumps(item.to_json())) for item in items]
    assert_device_order([json.loads(msg.data) for msg in messages])


@SERVICE
async def test_the_stream_is_created_with_the_duplicate_window(jetstream: JetStream) -> None:
    await delivered(jetstream.sink(duplicate_window=30))
    config = (await jetstream.js.stream_info(jetstream.stream)).config
    assert config.subjects == [f"{jetstream.prefix}.>"]
    assert config.duplicate_window == 30


@SERVICE
async def test_a_missing_stream_without_create_stream_is_rejected(jetstream: JetStream) -> None:
    sink = jetstream.sink(create_stream=False)
    with pytest.raises(SinkRejected, match="does not exist"):
        await sink.open()
    await sink.aclose()


@SERVICE
async def test_a_stream_deleted_under_the_sink_is_created_again(jetstream: JetStream) -> None:
    sink = jetstream.sink()
    await sink.open()
    try:
        await sink.deliver([event(1, "d", 1)])
        await jetstream.js.delete_stream(jetstream.stream)
        with pytest.raises(SinkError, match="created it") as info:
            await sink.deliver([event(2, "d", 2)])
        assert not isinstance(info.value, SinkRejected)
        await sink.deliver([event(2, "d", 2)])  # the runner's retry
    finally:
        await sink.aclose()
    assert [msg.headers[MSG_ID] for msg in await jetstream.messages() if msg.headers] == [
        "ev:d:2"]


@SERVICE
async def test_a_message_too_large_for_nats_is_rejected(jetstream: JetStream) -> None:
    sink = jetstream.sink()
    await sink.open()
    try:
        limit = jetstream.nc.max_payload
        with pytest.raises(SinkRejected):
            await sink.deliver([event(1, "d", 1, body={"blob": "x" * (limit + 1)})])
        await sink.deliver([event(1, "d", 1)])  # the sink still works
    finally:
        await sink.aclose()


@SERVICE
async def test_a_lost_connection_is_opened_again(jetstream: JetStream) -> None:
    sink = jetstream.sink()
    await sink.open()
    try:
        await sink.deliver([event(1, "d", 1)])
        await sink._nc.close()  # type: ignore[attr-defined]  # as if the server dropped it
        await sink.deliver([event(2, "d", 2)])
    finally:
        await sink.aclose()
    assert [msg.headers[MSG_ID] for msg in await jetstream.messages() if msg.headers] == [
        "ev:d:1", "ev:d:2"]


@pytest.mark.parametrize(("kind", "url"), [
    ("nats", "nats://127.0.0.1:{port}"),
    ("postgres", "postgresql://postgres@127.0.0.1:{port}/test"),
])
async def test_an_unreachable_destination_is_a_retryable_error(kind: str, url: str) -> None:
    """NATS and PostgreSQL alike: a destination that does not answer is retried (backoff),
    never dead-lettered as if it had refused the items."""
    sink = SINK_TYPES[kind](SinkConfig("s", kind, {
        "url": url.format(port=closed_port()), "timeout": 2}))
    with pytest.raises(SinkError) as opening:
        await sink.open()
    with pytest.raises(SinkError) as delivering:
        await sink.deliver([event(1, "d", 1)])
    assert not isinstance(opening.value, SinkRejected)
    assert not isinstance(delivering.value, SinkRejected)
    await sink.aclose()


# --- the feed of a real server -----------------------------------------------------------------

@SERVICE
async def test_a_server_feed_reaches_the_stream_once_per_key_across_a_restart(
        server_config: ServerConfig, jetstream: JetStream, tmp_path: Path) -> None:
    sink = {"type": "nats", "options": jetstream.options(), "batch": 3, "backoff": 0.02,
            "max_backoff": 0.2}
    first = await start_pinned(server_config)
    devices: list[Device] = []
    try:
        async with AdminClient(first.url, ADMIN_TOKEN) as admin:
            await admin.put_sink("js", sink)
            await start_devices(admin, first.url, ("d0", "d.1"), tmp_path, devices)
            await produce(devices, range(3))
            await admin.patch_state("d0", {"mode": "eco"})
        await first.aclose()  # wherever the runner was
        async with Server(server_config) as second, \
                AdminClient(second.url, ADMIN_TOKEN) as admin:
            await produce(devices, range(3, 6))
            expected = await feed_keys(admin)
            await eventually(lambda: caught_up(admin, "js"))
            # A second sink on the same stream delivers the whole feed again: all duplicates.
            await admin.put_sink("again", {**sink, "start": "beginning"})
            await eventually(lambda: caught_up(admin, "again"))
            statuses = [(await admin.sink(name))["status"] for name in ("js", "again")]
    finally:
        for dev in devices:
            await dev.aclose()
        await first.aclose()

    messages = await jetstream.messages()
    keys = [msg.headers[MSG_ID] for msg in messages if msg.headers]
    assert len(keys) == len(messages) == len(set(keys))  # once per key
    assert sorted(keys) == sorted(expected)  # every item of the feed
    assert_device_order([json.loads(msg.data) for msg in messages])
    assert {msg.subject for msg in messages} >= {
        f"{jetstream.prefix}._.d%2E1.reading", f"{jetstream.prefix}._.d0._state.state"}
    assert all(s["dead_letters"] == 0 and s["delivered"] >= len(expected) for s in statuses)
