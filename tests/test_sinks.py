"""Sinks without a server: the runner against a scripted fake sink (retries, backoff, dead
letters, filters, order), the manager, configuration parsing and redaction, the webhook
sink against a real local receiver, and the metrics text. Delays are recorded through an
injected ``sleep``, never measured."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.core import Metric

from crdtsync._aio import cancel_and_wait, spawn
from crdtsync.errors import MalformedRequest, SinkError, SinkRejected
from crdtsync.protocol import Event
from crdtsync_server.feed import FeedNotifier
from crdtsync_server.metrics import sink_families
from crdtsync_server.sinks import SINK_TYPES, SinkConfig
from crdtsync_server.sinks import delivery as runner_module
from crdtsync_server.sinks.config import load_sinks_file, parse_sink
from crdtsync_server.sinks.delivery import Backoff, SinkRunner
from crdtsync_server.sinks.manager import SinkManager
from crdtsync_server.sinks.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookSink,
    batch_key,
    sign,
    verify_signature,
)
from crdtsync_server.store import DeviceRecord, MemoryStore, SyncWrite
from crdtsync_server.store.feed import FeedFilter, FeedItem
from crdtsync_server.store.sinks import SinkRecord
from crdtsync_server.validation import keep_redacted, redact_options

from .conftest import local_app
from .scrape import parse, value

Failer = Callable[[Sequence[FeedItem]], BaseException | None]


class FakeSink:
    """Records every attempt; ``fail(items)`` returns the exception an attempt raises."""

    def __init__(self, fail: Failer = lambda items: None, open_failures: int = 0) -> None:
        self.fail = fail
        self.open_failures = open_failures
        self.attempts: list[list[str]] = []
        self.delivered: list[list[str]] = []
        self.closed = False
        self.progress = asyncio.Event()

    async def open(self) -> None:
        if self.open_failures:
            self.open_failures -= 1
            raise SinkError("cannot connect")

    async def deliver(self, items: Sequence[FeedItem]) -> None:
        keys = [item.key for item in items]
        self.attempts.append(keys)
        exc = self.fail(items)
        if exc is not None:
            raise exc
        self.delivered.append(keys)
        self.progress.set()

    async def aclose(self) -> None:
        self.closed = True


def failing(times: int, exc: Callable[[], BaseException] = lambda: SinkError("down")
            ) -> Failer:
    """Fail the first ``times`` attempts."""
    left = [times]

    def fail(items: Sequence[FeedItem]) -> BaseException | None:
        left[0] -= 1
        return exc() if left[0] >= 0 else None

    return fail


class Sleeps:
    """An injected ``sleep``: records the delays, waits for nothing."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    async with MemoryStore() as backend:
        yield backend


async def emit(store: MemoryStore, device: str, first: int, last: int, topic: str = "t"
               ) -> None:
    if await store.get_device(device) is None:
        await store.add_device(DeviceRecord(device, "hash", created=1))
    await store.commit(SyncWrite(device, 10, events=[
        Event(seq, topic, 1000 + seq, {"n": seq}) for seq in range(first, last + 1)]))


async def make_runner(store: MemoryStore, sink: FakeSink, sleeps: Sleeps | None = None,
                      owner: str | None = None, lease_ttl: float = 30.0, **kw: Any
                      ) -> SinkRunner:
    config = SinkConfig("s", "fake", **kw)
    record = await store.put_sink(config, 1)
    return SinkRunner(store, FeedNotifier(poll=0.01), config, sink, record.cursor,
                      sleep=sleeps or Sleeps(), rand=lambda: 1.0, owner=owner,
                      lease_ttl=lease_ttl)


async def status(store: MemoryStore) -> SinkRecord:
    record = await store.get_sink("s")
    assert record is not None
    return record


async def drain(runner: SinkRunner) -> None:
    """Step until a step finds nothing to do."""
    while await runner.step():
        pass


# --- the runner --------------------------------------------------------------------------------

async def test_pages_are_delivered_in_cursor_order(store: MemoryStore) -> None:
    await emit(store, "a", 1, 4)
    await emit(store, "b", 1, 3)
    sink = FakeSink()
    runner = await make_runner(store, sink, batch=3)
    await drain(runner)
    assert sink.delivered == [["ev:a:1", "ev:a:2", "ev:a:3"], ["ev:a:4", "ev:b:1", "ev:b:2"],
                              ["ev:b:3"]]
    record = await status(store)
    assert (record.cursor, record.delivered, record.failures) == (7, 7, 0)
    assert record.last_delivered_at is not None


async def test_failures_back_off_exponentially_and_reset_after_a_success(
        store: MemoryStore) -> None:
    await emit(store, "a", 1, 2)
    sleeps = Sleeps()
    failures = iter([4, 2])
    left = [next(failures)]

    def fail(items: Sequence[FeedItem]) -> BaseException | None:
        if left[0] == 0:
            left[0] = next(failures, 0)
            return None
        left[0] -= 1
        return SinkError(f"down {left[0]}")

    sink = FakeSink(fail)
    runner = await make_runner(store, sink, sleeps, batch=1, backoff=1.0, max_backoff=5.0)
    await drain(runner)
    assert sink.delivered == [["ev:a:1"], ["ev:a:2"]]
    assert len(sink.attempts) == 8
    assert sleeps.delays == [1.0, 2.0, 4.0, 5.0, 1.0, 2.0]  # capped, then reset
    record = await status(store)
    assert (record.failures, record.consecutive_failures, record.delivered) == (6, 0, 2)
    assert record.last_error == "down 0" and record.dead_lettered == 0


def test_backoff_jitter_stays_between_half_and_all_of_the_delay() -> None:
    assert Backoff(1.0, 60.0, lambda: 0.0).delay(3) == 2.0
    assert Backoff(1.0, 60.0, lambda: 1.0).delay(3) == 4.0
    assert Backoff(1.0, 60.0, lambda: 1.0).delay(10_000) == 60.0  # no overflow


async def test_a_page_is_dead_lettered_after_max_attempts(store: MemoryStore) -> None:
    await emit(store, "a", 1, 4)
    sleeps = Sleeps()
    sink = FakeSink(lambda items: SinkError("full") if items[0].seq == 1 else None)
    runner = await make_runner(store, sink, sleeps, batch=2, max_attempts=3, backoff=0.5)
    await drain(runner)
    assert sink.attempts == [["ev:a:1", "ev:a:2"]] * 3 + [["ev:a:3", "ev:a:4"]]
    assert sleeps.delays == [0.5, 1.0]  # no wait after the last attempt
    letters = await store.list_dead_letters("s")
    assert [(d.item.key, d.error, d.attempts) for d in letters] == [
        ("ev:a:1", "full", 3), ("ev:a:2", "full", 3)]
    record = await status(store)
    assert (record.cursor, record.delivered, record.failures, record.dead_lettered,
            record.consecutive_failures) == (4, 2, 3, 2, 0)


async def test_a_rejected_page_is_split_so_only_refused_items_are_dead(
        store: MemoryStore) -> None:
    await emit(store, "a", 1, 4)
    sleeps = Sleeps()
    sink = FakeSink(lambda items: SinkRejected("400 bad item")
                    if any(i.seq == 2 for i in items) else None)
    runner = await make_runner(store, sink, sleeps, batch=4)
    await drain(runner)
    assert sink.attempts == [["ev:a:1", "ev:a:2", "ev:a:3", "ev:a:4"], ["ev:a:1"],
                             ["ev:a:2"], ["ev:a:3"], ["ev:a:4"]]
    assert sleeps.delays == []  # a rejection is not retried
    assert [(d.item.key, d.attempts) for d in await store.list_dead_letters("s")] == [
        ("ev:a:2", 1)]
    record = await status(store)
    assert (record.cursor, record.delivered, record.failures) == (4, 3, 2)


async def test_unexpected_exceptions_of_a_sink_are_retried(store: MemoryStore) -> None:
    await emit(store, "a", 1, 1)
    sink = FakeSink(failing(1, lambda: RuntimeError("bug")))
    runner = await make_runner(store, sink)
    await drain(runner)
    assert sink.delivered == [["ev:a:1"]]
    assert (await status(store)).last_error == "RuntimeError: bug"


async def test_a_filter_moves_the_cursor_past_skipped_items(store: MemoryStore) -> None:
    for seq in range(1, 4):
        await emit(store, "a", seq, seq)
        await emit(store, "b", seq, seq)  # a1 b1 a2 b2 a3 b3: cursors 1..6
    sink = FakeSink()
    runner = await make_runner(store, sink, batch=2, where=FeedFilter(device="a"))
    assert await runner.step()
    assert sink.delivered == [["ev:a:1", "ev:a:2"]]
    assert (await status(store)).cursor == 3  # a full page: up to its last item only
    assert await runner.step()
    assert sink.delivered[-1] == ["ev:a:3"]
    assert (await status(store)).cursor == 6  # a short page: past b3 too
    await emit(store, "b", 4, 6)
    assert not await runner.step()  # nothing matches: the cursor still moves
    record = await status(store)
    assert (record.cursor, record.delivered) == (9, 3)
    await emit(store, "a", 4, 4)
    await drain(runner)
    assert sink.delivered[-1] == ["ev:a:4"]


async def test_marked_dead_letters_are_delivered_again(store: MemoryStore) -> None:
    await emit(store, "a", 1, 3)
    broken = [True]
    sink = FakeSink(lambda items: SinkRejected("no") if broken[0] else None)
    runner = await make_runner(store, sink, batch=1)
    await drain(runner)
    letters = await store.list_dead_letters("s")
    assert len(letters) == 3
    broken[0] = False
    assert await store.retry_dead_letters("s", [letters[0].id, letters[2].id]) == 2
    runner.request_retry()
    await drain(runner)
    assert sink.delivered == [["ev:a:1"], ["ev:a:3"]]
    assert [d.item.key for d in await store.list_dead_letters("s")] == ["ev:a:2"]
    record = await status(store)
    assert (record.delivered, record.dead_letters, record.dead_lettered) == (2, 1, 3)


async def test_a_page_in_flight_when_stopped_is_delivered_again(store: MemoryStore) -> None:
    """At least once: the cursor moves only after ``deliver`` returned."""
    await emit(store, "a", 1, 2)
    entered, release = asyncio.Event(), asyncio.Event()

    class Hanging(FakeSink):
        async def deliver(self, items: Sequence[FeedItem]) -> None:
            self.attempts.append([i.key for i in items])
            entered.set()
            await release.wait()

    first = Hanging()
    runner = await make_runner(store, first, batch=5)
    task = asyncio.create_task(runner.run())
    await entered.wait()
    task.cancel()
    await asyncio.wait([task])
    assert first.closed and (await status(store)).cursor == 0
    second = FakeSink()
    again = SinkRunner(store, FeedNotifier(poll=0.01), runner.config, second,
                       (await status(store)).cursor)
    await drain(again)
    assert second.delivered == [["ev:a:1", "ev:a:2"]] == first.attempts


async def test_stopping_survives_a_swallowed_cancellation_and_a_hung_close(
        store: MemoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sink whose delivery swallows the stop's cancellation (nats-py's publish does when
    the acknowledgement arrives in the same loop iteration, through Python 3.11's
    ``asyncio.wait_for``) and whose close hangs still lets the manager stop."""
    monkeypatch.setattr(runner_module, "CLOSE_TIMEOUT_S", 0.05)
    await emit(store, "a", 1, 1)
    entered = asyncio.Event()

    class Stubborn(FakeSink):
        async def deliver(self, items: Sequence[FeedItem]) -> None:
            entered.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)
            await super().deliver(items)

        async def aclose(self) -> None:
            await asyncio.sleep(30)

    sink = Stubborn()
    monkeypatch.setitem(SINK_TYPES, "fake", lambda config: sink)
    await store.put_sink(SinkConfig("s", "fake"), 1)
    manager = SinkManager(store, FeedNotifier(poll=0.01))
    await manager.start()
    await asyncio.wait_for(entered.wait(), 30)
    closing = asyncio.create_task(manager.aclose())
    done, _ = await asyncio.wait([closing], timeout=10)
    assert closing in done and closing.exception() is None
    assert sink.delivered == [["ev:a:1"]]  # it ran on after the first cancellation


async def test_an_idle_runner_reads_once_per_spacing_not_once_per_commit() -> None:
    """Every commit notifies; the runner still reads the feed at most about twice per
    ``WAKE_SPACING_S`` (the read that delivers and the one that finds nothing), and
    delivers everything."""

    class Counting(MemoryStore):
        reads = 0

        async def read_feed(self, *args: Any, **kwargs: Any) -> list[FeedItem]:
            self.reads += 1
            return await super().read_feed(*args, **kwargs)

    async with Counting() as store:
        sink = FakeSink()
        notifier = FeedNotifier(poll=30.0)  # only notifications wake it
        config = SinkConfig("s", "fake", batch=1000)
        await store.put_sink(config, 1)
        task = spawn(SinkRunner(store, notifier, config, sink, 0).run(), "runner")
        started = time.monotonic()
        for seq in range(1, 101):
            await emit(store, "a", seq, seq)
            notifier.notify()
            await asyncio.sleep(0.002)
        async with asyncio.timeout(30):
            while sum(map(len, sink.delivered)) < 100:
                sink.progress.clear()
                await sink.progress.wait()
        elapsed = time.monotonic() - started
        await cancel_and_wait(task)
    assert [key for page in sink.delivered for key in page] == [
        f"ev:a:{seq}" for seq in range(1, 101)]
    assert store.reads <= 2 * elapsed / runner_module.WAKE_SPACING_S + 5, (store.reads, elapsed)


async def test_run_retries_opening_then_wakes_on_new_items(store: MemoryStore) -> None:
    sleeps = Sleeps()
    sink = FakeSink(open_failures=2)
    runner = await make_runner(store, sink, sleeps, backoff=0.25)
    task = asyncio.create_task(runner.run())
    try:
        await emit(store, "a", 1, 1)
        await asyncio.wait_for(sink.progress.wait(), 30)
        assert sleeps.delays[:2] == [0.25, 0.5]
        assert (await status(store)).failures == 2
    finally:
        task.cancel()
        await asyncio.wait([task])
    assert sink.closed and runner.state == "stopped"


# --- the lease ---------------------------------------------------------------------------------

async def test_only_the_lease_holder_delivers_and_the_other_takes_over(
        store: MemoryStore) -> None:
    await emit(store, "a", 1, 3)
    first_sink, second_sink, sleeps = FakeSink(), FakeSink(), Sleeps()
    first = await make_runner(store, first_sink, batch=2, owner="one", lease_ttl=3.0)
    second = SinkRunner(store, FeedNotifier(poll=0.01), first.config, second_sink, 0,
                        sleep=sleeps, owner="two", lease_ttl=3.0)
    assert await first.step()
    assert not await second.step()
    assert (second.state, sleeps.delays, second_sink.attempts) == ("standby", [1.0], [])
    assert (await status(store)).owner == "one"
    await first.lease.release()
    await second.lease.acquire()  # its next try, without waiting for it
    await drain(second)  # goes on from the stored cursor
    assert first_sink.delivered == [["ev:a:1", "ev:a:2"]]
    assert second_sink.delivered == [["ev:a:3"]]
    assert (await status(store)).owner == "two"


async def test_a_runner_that_lost_its_lease_does_not_move_the_cursor(
        store: MemoryStore) -> None:
    await emit(store, "a", 1, 2)
    sink = FakeSink()
    runner = await make_runner(store, sink, batch=1, owner="one")
    assert await runner.step()
    await store.release_sink_lease("s", "one")  # as if it expired ...
    assert await store.acquire_sink_lease("s", "two", 0, 10**15)  # ... and was taken
    assert not await runner.step()  # delivered the page, but may not move the cursor
    assert sink.attempts == [["ev:a:1"], ["ev:a:2"]]
    assert runner.state == "standby" and not runner.lease.held
    record = await status(store)
    assert (record.cursor, record.delivered, record.owner) == (1, 1, "two")


# --- the manager -------------------------------------------------------------------------------

@pytest.fixture
def fake_type(monkeypatch: pytest.MonkeyPatch) -> list[FakeSink]:
    built: list[FakeSink] = []

    def factory(config: SinkConfig) -> FakeSink:
        if config.options.get("bad"):
            raise MalformedRequest("bad option")
        built.append(FakeSink())
        return built[-1]

    monkeypatch.setitem(SINK_TYPES, "fake", factory)
    return built


async def test_manager_runs_each_unpaused_sink(store: MemoryStore,
                                               fake_type: list[FakeSink]) -> None:
    await store.put_sink(SinkConfig("one", "fake"), 1)
    await store.put_sink(SinkConfig("two", "fake"), 1, paused=True)
    await store.put_sink(SinkConfig("gone", "nonexistent"), 1)
    await store.put_sink(SinkConfig("bad", "fake", {"bad": True}), 1)
    manager = SinkManager(store, FeedNotifier(poll=0.01))
    await manager.start()
    try:
        await emit(store, "a", 1, 1)
        await asyncio.wait_for(fake_type[0].progress.wait(), 30)
        states = {r.name: manager.state(r) for r in await store.list_sinks()}
        assert states["two"] == "paused"
        assert states["gone"] == "cannot start: unknown sink type 'nonexistent'"
        assert states["bad"] == "cannot start: bad option"
        assert states["one"] in ("idle", "delivering")
        await store.put_sink(SinkConfig("two", "fake"), 2)  # resumed
        await manager.apply("two")
        await asyncio.wait_for(fake_type[1].progress.wait(), 30)
        assert fake_type[1].delivered == [["ev:a:1"]]
        await store.delete_sink("one")
        await manager.apply("one")
        assert fake_type[0].closed
    finally:
        await manager.aclose()
    assert fake_type[1].closed


async def test_manager_stores_file_sinks_without_their_secrets(
        store: MemoryStore, fake_type: list[FakeSink], tmp_path: Path) -> None:
    path = tmp_path / "sinks.json"
    path.write_text(json.dumps({"sinks": {"f": {
        "type": "fake", "options": {"token": "${SINK_TOKEN}", "n": [1, "${SINK_TOKEN}x"]}}}}))
    file_sinks = load_sinks_file(path, environ={"SINK_TOKEN": "hunter2"})
    assert file_sinks["f"].config.options == {"token": "hunter2", "n": [1, "hunter2x"]}
    await store.put_sink(SinkConfig("stale", "fake"), 1, origin="file")
    manager = SinkManager(store, FeedNotifier(poll=0.01), file_sinks)
    checked = len(fake_type)  # loading built one to check its options
    await manager.start()
    try:
        stored = await store.get_sink("f")
        assert stored is not None and stored.origin == "file"
        assert stored.config.options == {"token": "${SINK_TOKEN}", "n": [1, "${SINK_TOKEN}x"]}
        stale = await store.get_sink("stale")
        assert stale is not None and manager.state(stale) == "not in the sinks file"
        assert len(fake_type) == checked + 1  # only "f" runs
    finally:
        await manager.aclose()


# --- configuration -----------------------------------------------------------------------------

def test_parse_sink_defaults_and_fields() -> None:
    spec = parse_sink("hook", {"type": "webhook"})
    assert spec.config == SinkConfig("hook", "webhook")
    assert (spec.paused, spec.start) == (False, "beginning")
    spec = parse_sink("hook", {"type": "webhook", "filter": {"fleet": "f", "kind": "state"},
                               "batch": 7, "max_attempts": 2, "backoff": 0.1,
                               "max_backoff": 1, "paused": True, "start": "head"})
    assert spec.config.where == FeedFilter(fleet="f", kind="state")
    assert (spec.config.batch, spec.config.max_attempts, spec.config.backoff,
            spec.config.max_backoff, spec.paused, spec.start) == (7, 2, 0.1, 1.0, True, "head")


@pytest.mark.parametrize(("body", "field"), [
    ([], "sink"), ({"type": "nope"}, "type"), ({"type": ["webhook"]}, "type"),
    ({"type": "webhook", "colour": 1}, "colour"), ({"type": "webhook", "options": 1}, "options"),
    ({"type": "webhook", "filter": {"kind": "x"}}, "filter"),
    ({"type": "webhook", "filter": {"device": 3}}, "filter"),
    ({"type": "webhook", "batch": 0}, "batch"), ({"type": "webhook", "batch": 1.5}, "batch"),
    ({"type": "webhook", "max_attempts": True}, "max_attempts"),
    ({"type": "webhook", "backoff": -1}, "backoff"),
    ({"type": "webhook", "backoff": 5, "max_backoff": 1}, "max_backoff"),
    ({"type": "webhook", "paused": "yes"}, "paused"), ({"type": "webhook", "start": 0}, "start"),
])
def test_parse_sink_names_the_bad_field(body: Any, field: str) -> None:
    with pytest.raises(MalformedRequest) as info:
        parse_sink("hook", body)
    assert info.value.detail == {"sink": "hook", "field": field}


def test_bad_sink_name_is_refused() -> None:
    with pytest.raises(MalformedRequest):
        parse_sink("no spaces", {"type": "webhook"})


def test_secrets_are_redacted_and_kept_when_sent_back() -> None:
    options = {"url": "https://h/x", "secret": "s1", "api_key": "k", "headers": {"A": "1"},
               "dsn": "postgresql://u:pw@db/x", "conninfo": "host=db password=pw user=u",
               "nested": {"password": "p", "n": 1}, "batching": 3}
    shown = redact_options(options)
    assert shown == {"url": "https://h/x", "secret": "***", "api_key": "***",
                     "headers": {"A": "***"}, "dsn": "postgresql://u:***@db/x",
                     "conninfo": "host=db password=*** user=u",
                     "nested": {"password": "***", "n": 1}, "batching": 3}
    # Sent back as shown, a partly redacted value keeps the stored one (it used to store
    # the "***"); a changed value is taken as sent.
    assert keep_redacted({**shown, "url": "https://h/y"}, options) == {
        **options, "url": "https://h/y"}
    assert keep_redacted({**shown, "dsn": "postgresql://u:***@db/y"}, options) == {
        **options, "dsn": "postgresql://u:***@db/y"}


def test_urls_show_host_and_first_path_segment_only() -> None:
    options = {"url": "https://u:pw@h:8443/services/T0/B1/key?token=t&v=2#frag",
               "servers": ["nats://tok@n1:4222", "nats://n2:4222/"], "subject": "a.b"}
    shown = redact_options(options)
    assert shown == {"url": "https://u:***@h:8443/services/***?token=***&v=***#***",
                     "servers": ["nats://***@n1:4222", "nats://n2:4222/"], "subject": "a.b"}
    assert keep_redacted(shown, options) == options


def test_sinks_file_errors_name_the_sink_and_field(tmp_path: Path) -> None:
    path = tmp_path / "sinks.json"
    path.write_text(json.dumps({"sinks": {"hook": {
        "type": "webhook", "options": {"url": "http://h/x", "secret": "${MISSING}"}}}}))
    with pytest.raises(MalformedRequest, match=r"\$\{MISSING\}") as info:
        load_sinks_file(path, environ={})
    assert info.value.detail == {"sink": "hook", "field": "options.secret"}
    path.write_text(json.dumps({"sinks": {"hook": {
        "type": "webhook", "options": {"url": "ftp://h/x", "secret": "s"}}}}))
    with pytest.raises(MalformedRequest, match="http"):
        load_sinks_file(path, environ={})
    path.write_text(json.dumps({"routes": {}}))
    with pytest.raises(MalformedRequest, match="expected"):
        load_sinks_file(path)


# --- the webhook sink --------------------------------------------------------------------------

def webhook(url: str, **options: Any) -> WebhookSink:
    return WebhookSink(SinkConfig("hook", "webhook", {"url": url, "secret": "k", **options}))


@pytest.mark.parametrize(("options", "field"), [
    ({"url": "ftp://x"}, "options.url"), ({"url": "http://u:p@x"}, "options.url"),
    ({"secret": ""}, "options.secret"), ({"timeout": 0}, "options.timeout"),
    ({"headers": {"Bad Name": "x"}}, "options.headers"),
    ({"headers": {"X": "a\nb"}}, "options.headers.X"),
])
def test_webhook_options_are_checked(options: dict[str, Any], field: str) -> None:
    with pytest.raises(MalformedRequest) as info:
        webhook(**{"url": "http://h/x", **options})
    assert info.value.detail["field"] == field


def test_signature_round_trip() -> None:
    body, now = b'{"items":[]}', 1_700_000_000.0
    ts = str(int(now))
    header = sign("secret", body, ts)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert verify_signature("secret", body, header, ts, now=now)
    assert verify_signature("secret", body, header, ts, now=now + 300)
    assert not verify_signature("other", body, header, ts, now=now)
    assert not verify_signature("secret", body + b" ", header, ts, now=now)
    assert not verify_signature("secret", body, None, ts, now=now)
    assert not verify_signature("secret", body, header, None, now=now)
    assert not verify_signature("secret", body, "sha256=é", ts, now=now)
    # the timestamp is signed: changing it (to replay the request later) breaks the signature
    later = str(int(now) + 3600)
    assert not verify_signature("secret", body, header, later, now=now + 3600)
    # and a stale one is refused, unless the receiver accepts any age
    assert not verify_signature("secret", body, header, ts, now=now + 301)
    assert verify_signature("secret", body, header, ts, now=now + 10**6, tolerance=None)
    assert not verify_signature("secret", body, header, "-1", now=now, tolerance=None)


class Target:
    """A local HTTP receiver answering each request with the next scripted status."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        status = self.statuses.pop(0)
        if status == 0:
            await asyncio.sleep(30)  # never answers within the sink's timeout
        headers = {"Location": "http://127.0.0.1:9/"} if 300 <= status < 400 else None
        return web.Response(status=status, text=f"answer {status}", headers=headers)


@pytest.fixture
async def target() -> AsyncIterator[tuple[Target, str]]:
    receiver = Target([])
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    async with local_app(app, shutdown_timeout=0.1) as url:
        yield receiver, f"{url}/hook"


async def test_webhook_posts_a_signed_batch(store: MemoryStore,
                                            target: tuple[Target, str]) -> None:
    receiver, url = target
    await emit(store, "a", 1, 2)
    items = await store.read_feed()
    receiver.statuses = [200]
    sink = webhook(url, headers={"Authorization": "Bearer t"})
    await sink.open()
    try:
        await sink.deliver(items)
    finally:
        await sink.aclose()
    headers, body = receiver.requests[0]
    assert json.loads(body) == {"items": [i.to_json() for i in items]}
    assert verify_signature("k", body, headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER])
    assert headers["Idempotency-Key"] == batch_key(items)
    assert headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == "Bearer t" and headers["X-Crdtsync-Sink"] == "hook"
    assert headers[TIMESTAMP_HEADER].isdigit()


@pytest.mark.parametrize(("status", "error"), [
    (500, SinkError), (503, SinkError), (429, SinkError), (408, SinkError),
    (400, SinkRejected), (404, SinkRejected), (302, SinkRejected), (0, SinkError),
])
async def test_webhook_answers_decide_retry_or_rejection(
        store: MemoryStore, target: tuple[Target, str], status: int,
        error: type[SinkError]) -> None:
    receiver, url = target
    await emit(store, "a", 1, 1)
    receiver.statuses = [status]
    # Only the receiver that never answers (0) needs a short timeout; an answer must not
    # race one on a loaded machine.
    sink = webhook(url, timeout=0.2 if status == 0 else 30.0)
    await sink.open()
    try:
        with pytest.raises(error) as info:
            await sink.deliver(await store.read_feed())
    finally:
        await sink.aclose()
    assert type(info.value) is error
    if status:
        assert len(receiver.requests) == 1  # a redirect is not followed
        assert f"answered {status}" in info.value.message
    else:
        assert "no answer within 0.2 s" in info.value.message


async def test_webhook_unreachable_is_retryable(store: MemoryStore) -> None:
    await emit(store, "a", 1, 1)
    sink = webhook("http://127.0.0.1:9/secret-path")
    await sink.open()
    try:
        with pytest.raises(SinkError) as info:
            await sink.deliver(await store.read_feed())
    finally:
        await sink.aclose()
    assert type(info.value) is SinkError and "secret-path" not in info.value.message


# --- metrics -----------------------------------------------------------------------------------

class _Sinks:
    """A collector of the sink families alone (what ``generate_latest`` needs)."""

    def __init__(self, head: int, sinks: list[SinkRecord]) -> None:
        self.head, self.sinks = head, sinks

    def collect(self) -> Iterator[Metric]:
        return sink_families(self.head, self.sinks)


def test_sink_metrics_text() -> None:
    record = SinkRecord(SinkConfig('we"ird', "webhook"), cursor=7, delivered=5, failures=2,
                        dead_lettered=1, dead_letters=1, last_delivered_at=1_500)
    text = generate_latest(_Sinks(9, [record])).decode()
    assert "# TYPE crdtsync_sink_delivered_total counter" in text.splitlines()
    assert 'crdtsync_sink_lag{sink="we\\"ird"} 2.0' in text.splitlines()  # escaped label
    samples = parse(text)
    for name, expected in (("crdtsync_sink_lag", 2), ("crdtsync_sink_cursor", 7),
                           ("crdtsync_sink_delivered_total", 5),
                           ("crdtsync_sink_failures_total", 2),
                           ("crdtsync_sink_dead_letters_total", 1),
                           ("crdtsync_sink_dead_letters_stored", 1),
                           ("crdtsync_sink_last_delivered_timestamp_seconds", 1.5)):
        assert value(samples, name, sink='we"ird') == expected, name
    idle = SinkRecord(SinkConfig("idle", "webhook"))
    assert not any("last_delivered" in line and "idle" in line
                   for line in generate_latest(_Sinks(0, [idle])).decode().splitlines())
