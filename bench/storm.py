"""Reconnect storm (issue 6 item 2): N devices with 20 offline edits each reconnect at once.

Measures the time from the start of the reconnect until every document has converged on both
sides, and the TCP payload on loopback in both directions (HTTP / websocket framing and
headers included), for crdtsync and, in the same run, for pycrdt-websocket's server speaking
the Yjs sync protocol to one websocket client per device.

- Setup (not timed): every device holds a document whose prior state (10 keys in root map
  ``state``) the server already has. crdtsync: devices provisioned through the admin API, one
  initial sync each. Peer: each room created in the server process with that content (and
  its update observer attached) before any client joins, so pycrdt-websocket's first-join
  race cannot drop an update. Then each device makes 20 edits offline, one transaction each.
- Storm (timed): all devices reconnect at once (at most ``--concurrency`` connections open,
  the same limit for both), each on a new TCP connection through a byte-counting proxy.
  crdtsync: one ``POST /v1/sync`` per device with the same document entries and headers as
  ``crdtsync.Device`` (``HttpTransport``, a fresh session per device); converged when the
  response is applied (the server answers only after committing). Peer: pycrdt's
  ``Provider`` over a ``websockets`` client; converged when the client has the server's sync
  step 2 and the server's broadcast of the client's own edits (sent after the room's
  document integrated them).
- Check (not timed): every server document is compared with its client's.

Both servers run in their own process: ``crdtsync serve`` (SQLite in a temp folder, default
durability) and pycrdt-websocket's ``WebsocketServer`` + ``ASGIServer`` under uvicorn (rooms
in memory, no store). Fresh servers each round, alternating which system goes first.

Each system storms twice per round (``--no-isolate``: once):

- *Shared CPUs* (the figure kept from the start, and the bytes): server, load generator and
  proxy share the machine's CPUs, so the time is close to the CPU of all three together;
  the report says what share of the machine they used. On a 2-CPU machine this cannot show
  the servers alone: crdtsync's clients and proxy cost about as much CPU as its server.
- *Server on a CPU of its own*: the server's threads bound to one CPU, this process (the
  load generator) to another, no proxy (bytes are not counted), and prebuilt clients for
  both systems: every device's bytes (crdtsync: its sync request as ``HttpTransport`` sends
  it, plus ``Connection: close``; the peer: its websocket handshake, then sync step 1 and
  step 2) built before the storm and written on a raw asyncio connection, the answer read
  as it comes (the peer's frames parsed for its step 2 and the echo of its edits) and
  crdtsync's responses applied after the storm. A real fleet's clients run on their own
  machines; this pass keeps them off the server's CPU and out of its way. It reports how
  busy each side was (CPU seconds over wall seconds): the time is the server's when the
  server is near 1.00 and the load generator well below. Other programs on the machine are
  not kept off either CPU.

CPU figures are user + system seconds of one process (psutil, from ``/proc/<pid>/stat``;
children not included): the server process alone, the proxy process, and this process.

    python bench/storm.py [--devices 2000] [--rounds 3] [--concurrency 500] [--no-isolate]
                          [--proxy inline|process] [--clients real|lean]
                          [--write docs/benchmarks.md] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import logging
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgpack
from common import (
    ADMIN_TOKEN,
    Child,
    PgBackends,
    gather_limited,
    machine,
    median,
    nproc,
    percentile,
    provision,
    report,
    spread,
    start_server,
)
from pycrdt import (
    Doc,
    Map,
    Provider,
    YMessageType,
    YSyncMessageType,
    create_sync_message,
    create_update_message,
    handle_sync_message,
    read_message,
)

from crdtsync import AdminClient, crdt
from crdtsync.protocol import (
    DocSync,
    SyncRequest,
    covers,
    decode_response,
    encode_request,
    parse_state_vector,
)
from crdtsync.transport import COMPRESS_THRESHOLD, HttpTransport, compress, zstandard

INITIAL_KEYS = 10
EDITS = 20
EDIT_KEYS = 12
"""Edit j sets key ``k{j % 12}``: 10 overwrites of prior keys, 2 new keys, 8 second writes."""
EMPTY_UPDATE = b"\x00\x00"
SYSTEMS = ("crdtsync", "pycrdt-websocket")
HERE = Path(__file__).resolve()
T = TypeVar("T")


# --- the devices' documents -----------------------------------------------------------------


def value(device: int, key: int, step: int) -> Any:
    """A deterministic value: a temperature, a counter or a mode, by key."""
    n = device * 31 + key * 7 + step * 13
    if key % 3 == 0:
        return round(15.0 + n % 200 / 10, 1)
    if key % 3 == 1:
        return n % 1000
    return ("idle", "run", "charge", "fault")[n % 4]


def initial_doc(device: int, client_id: int) -> Doc[Any]:
    """The document the device and the server both hold before the device goes offline."""
    doc: Doc[Any] = Doc(client_id=client_id)
    state = doc.get("state", type=Map)
    with doc.transaction():
        for k in range(INITIAL_KEYS):
            state[f"k{k}"] = value(device, k, -1)
    return doc


def offline_edits(doc: Doc[Any], device: int) -> None:
    """20 edits, one transaction each, as a device makes them while offline."""
    state = doc.get("state", type=Map)
    for j in range(EDITS):
        with doc.transaction():
            state[f"k{j % EDIT_KEYS}"] = value(device, j % EDIT_KEYS, j)


def state_map(doc: Doc[Any]) -> dict[str, Any]:
    return crdt.to_json(doc).get("state", {})


# --- a TCP proxy that counts payload bytes each way -----------------------------------------


class Proxy:
    """Forwards each accepted connection to ``127.0.0.1:upstream`` on a new connection and
    counts the TCP payload bytes in each direction (``up``: client to server)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.up = 0
        self.down = 0
        self.opened = 0
        self.open = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Leg(self, None), "127.0.0.1", 0,
                                                backlog=4096)
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def stats(self) -> tuple[int, int, int, int]:
        return self.up, self.down, self.opened, self.open


class _Leg(asyncio.Protocol):
    """One side of a proxied connection; ``client`` is None for the side facing the client."""

    def __init__(self, proxy: Proxy, client: _Leg | None) -> None:
        self.proxy = proxy
        self.other = client
        self.to_server = client is not None
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.to_server:
            assert self.other is not None and self.other.transport is not None
            self.other.other = self
            if self.other.transport.is_closing():
                transport.close()
            else:
                self.other.transport.resume_reading()
            return
        self.proxy.opened += 1
        self.proxy.open += 1
        transport.pause_reading()
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _Leg(self.proxy, self), "127.0.0.1",
                                         self.proxy.upstream)
        except OSError:
            assert self.transport is not None
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.to_server:
            self.proxy.down += len(data)
        else:
            self.proxy.up += len(data)
        assert self.other is not None and self.other.transport is not None
        self.other.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other is None or other.transport is None:
            return False
        if other.eof:
            other.transport.close()
            return False
        if other.transport.can_write_eof():
            other.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.to_server:
            self.proxy.open -= 1
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


# --- child processes ------------------------------------------------------------------------


def can_isolate() -> bool:
    """Whether this process may use at least two CPUs (Linux affinity), one for the server
    and one for the load generator."""
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def pin(pid: int, cpus: set[int]) -> None:
    """Bind every thread of process ``pid`` (0: this one) to ``cpus``; threads it starts
    later inherit the binding from the thread that starts them."""
    for tid in os.listdir(f"/proc/{pid or os.getpid()}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def server_cpu_of_its_own(server: Child) -> Iterator[None]:
    """The server on the first CPU this process may use, this process (the load
    generator) on the second, for the duration; this process's binding restored after.
    Other programs on the machine are not kept off either CPU."""
    mine = os.sched_getaffinity(0)
    first, second = sorted(mine)[:2]
    pin(server.pid, {first})
    pin(0, {second})
    try:
        yield
    finally:
        pin(0, mine)


def listen_drops() -> int:
    """Connections the kernel dropped because a listen queue was full (Linux, all sockets:
    here only the proxy and the server listen). Each costs the client a SYN retransmit
    (1 s, then 3 s ...)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(row.get("ListenDrops", 0))
    return 0


class ProxyHandle:
    """The counting proxy, in this process (``inline``) or in a child process."""

    def __init__(self, mode: str, tmp: Path) -> None:
        self.mode = mode
        self.tmp = tmp
        self.inline: Proxy | None = None
        self.child: Child | None = None
        self.port = 0

    async def start(self, upstream: int) -> None:
        if self.mode == "inline":
            self.inline = Proxy(upstream)
            self.port = await self.inline.start()
            return
        self.child = Child("proxy", [sys.executable, str(HERE), "--proxy-server", str(upstream)],
                           self.tmp / "proxy.log")
        match = await self.child.start(r"READY (\d+)", stdin=True)
        self.port = int(match.group(1))

    async def stats(self) -> tuple[int, int, int, int]:
        if self.inline is not None:
            return self.inline.stats()
        assert self.child is not None
        seen = self.child.output().count("STATS")
        self.child.stdin.write(b"stats\n")
        self.child.stdin.flush()
        for _ in range(200):
            lines = re.findall(r"STATS (\d+) (\d+) (\d+) (\d+)", self.child.output())
            if len(lines) > seen:
                up, down, opened, live = (int(x) for x in lines[-1])
                return up, down, opened, live
            await asyncio.sleep(0.02)
        raise RuntimeError("proxy process does not answer")

    def cpu(self) -> float:
        return self.child.cpu() if self.child is not None else 0.0

    async def stop(self) -> None:
        if self.inline is not None:
            self.inline.close()
        if self.child is not None:
            await self.child.stop()


async def proxy_main(upstream: int) -> None:
    """``--proxy-server PORT``: run the proxy; answer ``stats`` lines on stdin."""
    proxy = Proxy(upstream)
    port = await proxy.start()
    print(f"READY {port}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"stats":
            print("STATS {} {} {} {}".format(*proxy.stats()), flush=True)
    proxy.close()


# --- the peer's server: pycrdt-websocket under uvicorn --------------------------------------


async def peer_server_main(rooms_file: str) -> None:
    """``--peer-server FILE``: pycrdt-websocket's ``WebsocketServer`` behind its
    ``ASGIServer`` under uvicorn, with one pre-created, started and observed room per entry
    of FILE (msgpack ``{path: update}``). ``GET /_dump`` answers every room's state."""
    import uvicorn
    from pycrdt.websocket import ASGIServer, WebsocketServer, YRoom, exception_logger

    with open(rooms_file, "rb") as f:  # noqa: ASYNC230 - before serving anything
        rooms: dict[str, bytes] = msgpack.unpackb(f.read())
    log = logging.getLogger("storm.peer")
    websocket_server = WebsocketServer(auto_clean_rooms=False, exception_handler=exception_logger,
                                       log=log)
    asgi = ASGIServer(websocket_server)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            body = msgpack.packb({name: room.ydoc.get_update()
                                  for name, room in websocket_server.rooms.items()})
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/msgpack")]})
            await send({"type": "http.response.body", "body": body})
            return
        await asgi(scope, receive, send)

    async with websocket_server:
        created = []
        for name, update in rooms.items():
            doc: Doc[Any] = Doc()
            doc.apply_update(update)
            room = YRoom(ready=True, ydoc=doc, exception_handler=exception_logger, log=log)
            websocket_server.rooms[name] = room
            await websocket_server.start_room(room)
            created.append(room)
        for room in created:  # the update observer is attached: no first-join race
            await room.ydoc_observed.wait()
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="off")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"READY {port}", flush=True)
        await task


# --- results --------------------------------------------------------------------------------


@dataclass
class Run:
    """One system's storm in one round."""

    system: str
    devices: int
    elapsed: float = 0.0
    """Start of the reconnect to the last device converged."""
    all_closed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    """Per device: its connection opened (a slot free) to converged."""
    up: int = 0
    down: int = 0
    connections: int = 0
    errors: list[str] = field(default_factory=list)
    mismatched: int = 0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    proxy_cpu: float = 0.0
    database_cpu: float = 0.0
    """PostgreSQL backends serving the servers (0 on SQLite)."""
    setup: float = 0.0
    listen_drops: int = 0
    isolated: bool = False
    """The server had a CPU of its own, the load generator the other, no proxy."""

    @property
    def total(self) -> int:
        return self.up + self.down

    def busy(self, cpu: float) -> float:
        """``cpu`` seconds as a share of one CPU over the storm (start to all closed)."""
        return cpu / self.all_closed if self.all_closed else float("nan")

    @property
    def ok(self) -> bool:
        return not self.errors and not self.mismatched and self.connections >= self.devices


async def storm(run: Run, clients: Sequence[T], sync: Callable[[T], Awaitable[float]],
                proxy: ProxyHandle | None, servers: Child | Sequence[Child], concurrency: int,
                limit: float, database: PgBackends | None = None) -> None:
    """Reconnect every client at once (``concurrency`` at a time) and time it. ``sync``
    returns the ``perf_counter()`` at which its client converged (before it disconnects).
    Without ``proxy`` (clients connect to the servers directly) no bytes are counted and
    every client counts as one connection. ``servers``: their CPU summed; ``database``:
    the backends serving them (``run.database_cpu``)."""
    servers = [servers] if isinstance(servers, Child) else list(servers)

    def server_cpu() -> float:
        return sum(s.cpu() for s in servers)

    gc.collect()
    up0, down0, opened0, _ = await proxy.stats() if proxy is not None else (0, 0, 0, 0)
    if database is not None:
        await database.refresh()
    cpu0 = (server_cpu(), time.process_time(), proxy.cpu() if proxy is not None else 0.0,
            database.seconds() if database is not None else 0.0)
    drops0 = listen_drops()
    sem = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    converged: list[float] = []

    async def one(client: T) -> None:
        async with sem:
            began = time.perf_counter()
            try:
                async with asyncio.timeout(limit):
                    at = await sync(client)
            except Exception as exc:
                run.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            converged.append(at)
            run.latencies.append(at - began)

    await asyncio.gather(*(one(c) for c in clients))
    run.all_closed = time.perf_counter() - start
    run.elapsed = (max(converged) - start) if converged else float("nan")
    if proxy is None:
        run.connections = len(clients)
    else:
        for _ in range(500):  # let the proxy see every close
            up, down, opened, live = await proxy.stats()
            if live == 0:
                break
            await asyncio.sleep(0.02)
        run.up, run.down, run.connections = up - up0, down - down0, opened - opened0
        run.proxy_cpu = proxy.cpu() - cpu0[2]
    run.server_cpu = server_cpu() - cpu0[0]
    run.client_cpu = time.process_time() - cpu0[1]
    if database is not None:
        await database.refresh()
        run.database_cpu = database.seconds() - cpu0[3]
    run.listen_drops = listen_drops() - drops0


# --- crdtsync -------------------------------------------------------------------------------


class CrdtsyncClient:
    """One device as ``crdtsync.Device`` would sync it, with its documents in memory: its
    own ``state`` document (diffed against the state vector the server last answered) and
    its copies of the read-only ``fleet`` and ``project`` documents (state vectors only)."""

    def __init__(self, index: int, device_id: str, doc: Doc[Any]) -> None:
        self.index = index
        self.id = device_id
        self.doc = doc
        self.token = ""
        self.server_sv = b""
        self.shared: dict[str, tuple[Doc[Any], int]] = {
            "fleet": (Doc(client_id=doc.client_id), 0),
            "project": (Doc(client_id=doc.client_id), 0)}

    def request(self) -> tuple[bytes, bytes]:
        local_sv = self.doc.get_state()
        update = (self.doc.get_update(self.server_sv) if self.server_sv
                  else self.doc.get_update())
        parts = [DocSync("state", local_sv, b"" if update == EMPTY_UPDATE else update)]
        parts += [DocSync(name, copy.get_state(), b"", gen)
                  for name, (copy, gen) in self.shared.items()]
        return encode_request(SyncRequest(device=self.id, docs=tuple(parts))), local_sv

    def apply(self, raw: bytes, sent_sv: bytes) -> None:
        for part in decode_response(raw).docs:
            if part.doc == "state":
                if part.update:
                    crdt.apply_remote(self.doc, part.update)
                self.server_sv = part.sv
                if not covers(parse_state_vector(part.sv), parse_state_vector(sent_sv)):
                    raise RuntimeError(f"{self.id}: the server lacks part of the update")
            elif part.doc in self.shared:
                copy, gen = self.shared[part.doc]
                if part.gen != gen:
                    copy = Doc(client_id=self.doc.client_id)
                if part.update:
                    crdt.apply_remote(copy, part.update, name=part.doc)
                self.shared[part.doc] = (copy, part.gen)


async def crdtsync_sync(client: CrdtsyncClient, transport: HttpTransport) -> float:
    """One sync round trip; returns when it was applied (``perf_counter()``)."""
    body, sent_sv = client.request()
    client.apply(await transport.exchange(body), sent_sv)
    return time.perf_counter()


async def offline_clients(url: str, ids: Sequence[int]) -> list[CrdtsyncClient]:
    """One device per client id in ``ids``: provisioned on the server at ``url``, synced
    once (its prior state), then with its offline edits made (the storm's setup)."""
    clients = [CrdtsyncClient(i, f"storm-{i:05d}", initial_doc(i, cid))
               for i, cid in enumerate(ids)]
    tokens = await provision(url, [c.id for c in clients], 32)
    for c in clients:
        c.token = tokens[c.id]
    async with aiohttp.ClientSession() as session:
        async def first_sync(c: CrdtsyncClient) -> None:
            await crdtsync_sync(c, HttpTransport(url, c.token, session=session))
        await gather_limited(clients, first_sync, 32)
    for c in clients:
        offline_edits(c.doc, c.index)
    return clients


async def crdtsync_storm(run: Run, clients: Sequence[CrdtsyncClient], urls: Sequence[str],
                         servers: Child | Sequence[Child], proxy: ProxyHandle | None, *,
                         concurrency: int, limit: float, lean: bool = False,
                         database: PgBackends | None = None) -> None:
    """The crdtsync storm (:func:`storm`, ``concurrency`` connections at a time, ``limit``
    s per device): client ``i`` reconnects to ``urls[i % len]`` (one request each, so this
    is round robin per request) on a new connection: its own session, or with ``lean`` one
    shared session without keep-alive."""
    shared = (aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0))
              if lean else None)

    async def reconnect(c: CrdtsyncClient) -> float:
        # A fresh session (real) or no keep-alive (lean): a new connection either way.
        transport = HttpTransport(urls[c.index % len(urls)], c.token, session=shared)
        try:
            return await crdtsync_sync(c, transport)
        finally:
            await transport.aclose()

    try:
        await storm(run, clients, reconnect, proxy, servers, concurrency, limit, database)
    finally:
        if shared is not None:
            await shared.close()


async def count_mismatched(url: str, clients: Sequence[CrdtsyncClient], run: Run) -> None:
    """Compare every device's document with the server's copy (``run.mismatched``)."""
    async with AdminClient(url, ADMIN_TOKEN) as admin:
        async def check(c: CrdtsyncClient) -> None:
            if (await admin.state(c.id)).get("state") != state_map(c.doc):
                run.mismatched += 1
        await gather_limited(clients, check, 32)


async def run_crdtsync(ids: list[int], tmp: Path, args: argparse.Namespace,
                       isolated: bool = False) -> Run:
    """One crdtsync storm: through the counting proxy, or ``isolated`` (see
    :func:`isolation`)."""
    run = Run("crdtsync", len(ids), isolated=isolated)
    started = time.perf_counter()
    server: Child | None = None
    proxy = None if isolated else ProxyHandle(args.proxy, tmp)
    try:
        server = await start_server(tmp, db="storm.db")
        clients = await offline_clients(server.url, ids)
        if proxy is not None:
            await proxy.start(server.port)
        run.setup = time.perf_counter() - started
        url = server.url if proxy is None else f"http://127.0.0.1:{proxy.port}"
        with isolation(server, isolated):
            if isolated:
                await raw_crdtsync_storm(run, clients, server, args.concurrency, args.timeout)
            else:
                await crdtsync_storm(run, clients, [url], server, proxy,
                                     concurrency=args.concurrency, limit=args.timeout,
                                     lean=args.clients == "lean")
        await count_mismatched(server.url, clients, run)
    finally:
        if proxy is not None:
            await proxy.stop()
        if server is not None:
            await server.stop()
    return run


def isolation(server: Child, isolated: bool) -> contextlib.AbstractContextManager[None]:
    """For an ``isolated`` storm, the server on a CPU of its own (see
    :func:`server_cpu_of_its_own`); else nothing."""
    return server_cpu_of_its_own(server) if isolated else contextlib.nullcontext()


# --- the peer: pycrdt-websocket, a pycrdt Provider per device over `websockets` -------------


class PeerChannel:
    """pycrdt's ``Channel`` over a ``websockets`` client connection, watching for
    convergence: the client has applied the server's sync step 2, and has received the
    server's broadcast of the client's own edits (the room broadcasts what its document
    integrated). A message counts once the provider has handled it, that is when the
    provider asks for the next one, so ``converged_at`` is comparable with crdtsync's
    "response applied"."""

    def __init__(self, ws: Any, path: str, client_id: int) -> None:
        self.ws = ws
        self._path = path
        self.client_id = client_id
        self.step2 = False
        self.echo = False
        self._last: bytes = b""
        self.converged = asyncio.Event()
        self.converged_at = 0.0

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> PeerChannel:
        return self

    async def __anext__(self) -> bytes:
        from websockets.exceptions import ConnectionClosed

        self._handled(self._last)
        try:
            message = await self.ws.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None
        self._last = bytes(message)
        return self._last

    async def recv(self) -> bytes:
        return await self.__anext__()

    async def send(self, message: bytes) -> None:
        await self.ws.send(message)

    def _handled(self, message: bytes) -> None:
        if len(message) < 2 or message[0] != YMessageType.SYNC:
            return
        if message[1] == YSyncMessageType.SYNC_STEP2:
            self.step2 = True
        elif message[1] == YSyncMessageType.SYNC_UPDATE:
            # Only this client writes to its room, so an update the room broadcasts is the
            # client's step 2 as the room's document integrated it; check it is ours.
            self.echo = self.echo or first_client(read_message(message[2:])) == self.client_id
        if self.step2 and self.echo and not self.converged.is_set():
            self.converged_at = time.perf_counter()
            self.converged.set()


async def lean_sync(ws: Any, doc: Doc[Any]) -> float:
    """``--peer-client lean``: the Yjs sync exchange written out, without pycrdt's
    ``Provider`` (no task group, no event stream): send step 1, answer the server's step 1
    with step 2, apply what comes; converged as for :class:`PeerChannel`."""
    await ws.send(create_sync_message(doc))
    step2 = echo = False
    async for message in ws:
        if message[0] != YMessageType.SYNC:
            continue
        reply = handle_sync_message(message[1:], doc)
        if reply is not None:
            await ws.send(reply)
        if message[1] == YSyncMessageType.SYNC_STEP2:
            step2 = True
        elif message[1] == YSyncMessageType.SYNC_UPDATE:
            echo = echo or first_client(read_message(message[2:])) == doc.client_id
        if step2 and echo:
            return time.perf_counter()
    raise ConnectionError("closed before converging")


def first_client(update: bytes) -> int:
    """The client id of the first block group of a Yjs v1 update (0 if it has none)."""
    values, pos = [], 0
    while len(values) < 3 and pos < len(update):
        num, shift = 0, 0
        while True:
            byte = update[pos]
            pos += 1
            num |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(num)
    return values[2] if len(values) == 3 and values[0] else 0


@dataclass
class PeerClient:
    index: int
    path: str
    doc: Doc[Any]


# --- prebuilt clients: the isolated storms' load generator ----------------------------------
#
# The isolated storm measures the server, so its load generator must cost as little as it can:
# with lean aiohttp / websockets clients it took about as much CPU per device as crdtsync's
# server (0.69 against 0.72 ms), and the server sat idle a fifth of the storm waiting for it.
# Here every device's bytes are built before the storm (what the device would send, exactly:
# its request, or its websocket handshake and Yjs messages); during the storm a device only
# connects, writes them and reads the answer on a raw asyncio stream. Answers are checked
# after the storm: crdtsync's response decoded and applied (the server's state vector must
# cover the device's), the peer's frames parsed as they arrive (its step 2 and the echo of
# the device's own edits).


async def raw_exchange(port: int, data: bytes,
                       read: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                      Awaitable[bytes]],
                       bye: bytes = b"") -> tuple[float, bytes]:
    """Connect to ``127.0.0.1:port``, write ``data``, ``read`` the answer (it may write
    more), write ``bye``; returns when the answer was complete (``perf_counter()``) and the
    answer. The connection is closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        answer = await read(reader, writer)
        at = time.perf_counter()
        if bye:
            writer.write(bye)
        return at, answer
    finally:
        writer.close()


async def read_to_end(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> bytes:
    return await reader.read(-1)


def raw_crdtsync_request(client: CrdtsyncClient, port: int) -> tuple[bytes, bytes]:
    """The bytes ``HttpTransport`` would send for ``client``'s sync (its headers, its body
    compressed as it would be) plus ``Connection: close``; and the state vector sent."""
    body, sent_sv = client.request()
    coding = ""
    if len(body) >= COMPRESS_THRESHOLD:
        packed = compress(body, "zstd" if zstandard is not None else "deflate")
        if len(packed) < len(body):
            body = packed
            coding = f"Content-Encoding: {'zstd' if zstandard is not None else 'deflate'}\r\n"
    head = (f"POST /v1/sync HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {client.token}\r\n{coding}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body, sent_sv


async def raw_crdtsync_storm(run: Run, clients: Sequence[CrdtsyncClient], server: Child,
                             concurrency: int, limit: float) -> None:
    """The isolated crdtsync storm with prebuilt requests; each response applied after."""
    built = {c.id: raw_crdtsync_request(c, server.port) for c in clients}
    answers: dict[str, bytes] = {}

    async def reconnect(c: CrdtsyncClient) -> float:
        at, answers[c.id] = await raw_exchange(server.port, built[c.id][0], read_to_end)
        return at

    await storm(run, clients, reconnect, None, server, concurrency, limit)
    for c in clients:
        head, _, body = answers.get(c.id, b"").partition(b"\r\n\r\n")
        try:
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            c.apply(body, built[c.id][1])
        except Exception as exc:
            run.errors.append(f"{c.id}: {type(exc).__name__}: {exc}"[:200])


def ws_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One masked client frame (RFC 6455), FIN set."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def raw_peer_request(client: PeerClient, port: int, server_sv: bytes) -> tuple[bytes, bytes]:
    """What the lean peer client sends, prebuilt: the websocket handshake (no compression
    offered: bytes are not counted here); then, once the handshake is answered (RFC 6455
    4.1), sync step 1 and, without waiting for the room's step 1, the step 2 it would
    answer with (the room holds ``server_sv``; sending it at once saves the peer a round
    trip)."""
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (f"GET {client.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    step2 = create_update_message(client.doc.get_update(server_sv))
    step2 = bytes([YMessageType.SYNC, YSyncMessageType.SYNC_STEP2]) + step2[2:]
    return handshake.encode(), ws_frame(create_sync_message(client.doc)) + ws_frame(step2)


def peer_reader(client_id: int, frames: bytes
                ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bytes]]:
    """Reads the handshake answer, writes ``frames``, then reads frames until the room's
    step 2 and the echo of the device's own edits have come (as :func:`lean_sync` decides);
    returns ``b"ok"``."""
    async def read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        writer.write(frames)
        step2 = echo = False
        while not (step2 and echo):
            first, second = await reader.readexactly(2)
            n = second & 0x7F
            if n >= 126:
                n = int.from_bytes(await reader.readexactly(2 if n == 126 else 8), "big")
            message = await reader.readexactly(n)
            if first & 0x0F == 0x8:
                raise ConnectionError(f"closed before converging: {message[2:]!r}")
            if first & 0x0F != 0x2 or len(message) < 2 or message[0] != YMessageType.SYNC:
                continue
            if message[1] == YSyncMessageType.SYNC_STEP2:
                step2 = True
            elif message[1] == YSyncMessageType.SYNC_UPDATE:
                echo = echo or first_client(read_message(message[2:])) == client_id
        return b"ok"
    return read


CLOSE_FRAME = ws_frame((1000).to_bytes(2, "big"), opcode=0x8)



async def run_peer(ids: list[int], tmp: Path, args: argparse.Namespace,
                   isolated: bool = False) -> Run:
    """One pycrdt-websocket storm: through the counting proxy, or ``isolated`` (see
    :func:`isolation`)."""
    from websockets.asyncio.client import connect

    run = Run("pycrdt-websocket", len(ids), isolated=isolated)
    started = time.perf_counter()
    rooms = tmp / "rooms.msgpack"
    server = Child("pycrdt-websocket server", [sys.executable, str(HERE), "--peer-server",
                                               str(rooms)], tmp / "peer.log")
    proxy = None if isolated else ProxyHandle(args.proxy, tmp)
    lean = args.clients == "lean"
    try:
        clients = [PeerClient(i, f"/storm-{i:05d}", initial_doc(i, cid))
                   for i, cid in enumerate(ids)]
        write_bytes(rooms, msgpack.packb({c.path: c.doc.get_update() for c in clients}))
        match = await server.start(r"READY (\d+)", patience=120)
        port = int(match.group(1))
        held = {c.path: c.doc.get_state() for c in clients}  # what each room holds
        for c in clients:
            offline_edits(c.doc, c.index)
        if proxy is not None:
            await proxy.start(port)
        run.setup = time.perf_counter() - started
        target = port if proxy is None else proxy.port
        built = {c.path: raw_peer_request(c, target, held[c.path])
                 for c in clients} if isolated else {}

        async def reconnect(c: PeerClient) -> float:
            if isolated:
                handshake, frames = built[c.path]
                at, _ = await raw_exchange(target, handshake,
                                           peer_reader(c.doc.client_id, frames), CLOSE_FRAME)
                return at
            async with connect(f"ws://127.0.0.1:{target}{c.path}", open_timeout=60) as ws:
                if lean:
                    return await lean_sync(ws, c.doc)
                channel = PeerChannel(ws, c.path, c.doc.client_id)
                async with Provider(c.doc, channel):
                    await channel.converged.wait()
            return channel.converged_at

        with isolation(server, isolated):
            await storm(run, clients, reconnect, proxy, server, args.concurrency, args.timeout)
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/_dump") as resp:
            dump = msgpack.unpackb(await resp.read())
        for c in clients:
            remote: Doc[Any] = Doc()
            remote.apply_update(dump[c.path])
            if (state_map(remote) != state_map(c.doc)
                    or parse_state_vector(remote.get_state())
                    != parse_state_vector(c.doc.get_state())):
                run.mismatched += 1
    finally:
        if proxy is not None:
            await proxy.stop()
        await server.stop()
    return run


def write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


# --- report ---------------------------------------------------------------------------------


LIBS = ("pycrdt", "pycrdt-websocket", "aiohttp", "uvicorn", "websockets", "httptools")


def render(rounds: list[dict[str, Run]], isolated: list[dict[str, Run]],
           args: argparse.Namespace) -> str:
    """The report: the storm through the proxy (time, bytes, every process's CPU), the
    storm with the server on a CPU of its own (when run), and every storm by round."""
    lines = [
        f"Machine: {machine(LIBS, sqlite=False, sep='; ')}; load average before the run "
        f"{args.load_before:.1f}.",
        f"{args.devices:,} devices x {EDITS} offline edits, {len(rounds)} round(s) (order "
        f"alternating), at most {args.concurrency} connections at once. Median over rounds, "
        "(min-max) when more than one.",
        "",
        f"Shared CPUs (proxy {args.proxy}, {args.clients} clients): server, load generator "
        "and proxy on the same CPUs; time to all converged, bytes.",
        "",
        *table(rounds, args, shared_rows),
    ]
    if isolated:
        lines += ["", "Server on a CPU of its own (no proxy, prebuilt requests on raw "
                  "connections from the other CPU): "
                  "the time and CPU of the server when clients are not in its way.", "",
                  *table(isolated, args, isolated_rows)]
    lines += ["", "Per storm:", "",
              "| round | system | CPUs | time (s) | bytes up | bytes down | connections | "
              "listen drops | server CPU (s) | load gen. CPU (s) | errors | mismatched |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rounds, 1):
        passes = [r, isolated[i - 1]] if isolated else [r]
        for name in (SYSTEMS if i % 2 else SYSTEMS[::-1]):
            for x in (p[name] for p in passes):
                wire = "| - | - |" if x.isolated else f"| {x.up:,} | {x.down:,} |"
                lines.append(f"| {i} | {name} | {'own' if x.isolated else 'shared'} | "
                             f"{x.elapsed:.2f} {wire} {x.connections:,} | "
                             f"{x.listen_drops} | {x.server_cpu:.2f} | {x.client_cpu:.2f} | "
                             f"{len(x.errors)} | {x.mismatched} |")
    return "\n".join(lines)


Row = tuple[str, Callable[[Run], float], str, float | None]
"""A figure of a report table: name, value of one storm, format, goal for the ratio."""


def shared_rows(args: argparse.Namespace) -> list[Row]:
    n = args.devices
    rows: list[Row] = [
        ("time to all converged (s)", lambda r: r.elapsed, ".2f", 1 / 3),
        ("bytes on the wire, both ways", lambda r: r.total, ",.0f", 0.75),
        ("bytes per device, up", lambda r: r.up / n, ",.0f", None),
        ("bytes per device, down", lambda r: r.down / n, ",.0f", None),
        ("per-device latency, median (ms)", lambda r: median(r.latencies) * 1000, ".0f", None),
        ("per-device latency, p99 (ms)",
         lambda r: percentile(r.latencies, 0.99) * 1000, ".0f", None),
        ("all connections closed (s)", lambda r: r.all_closed, ".2f", None),
        ("listen-queue drops (1 s SYN retries)", lambda r: r.listen_drops, ".0f", None),
        ("server CPU during the storm (s)", lambda r: r.server_cpu, ".2f", None),
        ("load generator CPU (s)", lambda r: r.client_cpu, ".2f", None),
    ]
    if args.proxy == "process":
        rows.append(("proxy CPU (s)", lambda r: r.proxy_cpu, ".2f", None))
    rows.append(("all three, share of the machine's CPUs",
                 lambda r: r.busy(r.server_cpu + r.client_cpu + r.proxy_cpu) / nproc(),
                 ".2f", None))
    return rows


def isolated_rows(args: argparse.Namespace) -> list[Row]:
    return [
        ("time to all converged (s)", lambda r: r.elapsed, ".2f", 1 / 3),
        ("server CPU during the storm (s)", lambda r: r.server_cpu, ".2f", 1 / 3),
        ("server CPU per device (ms)", lambda r: r.server_cpu / r.devices * 1000, ".3f",
         None),
        ("server busy (CPU s / wall s, 1.00 = its CPU full)",
         lambda r: r.busy(r.server_cpu), ".2f", None),
        ("load generator busy (CPU s / wall s)", lambda r: r.busy(r.client_cpu), ".2f", None),
        ("per-device latency, median (ms)", lambda r: median(r.latencies) * 1000, ".0f", None),
    ]


def table(rounds: list[dict[str, Run]], args: argparse.Namespace,
          rows: Callable[[argparse.Namespace], list[Row]]) -> list[str]:
    """A markdown table of ``rows``: each system's median (min-max) and the ratio
    crdtsync / peer within each round, checked against the row's goal."""
    ours = [r["crdtsync"] for r in rounds]
    peer = [r["pycrdt-websocket"] for r in rounds]
    lines = ["| figure | crdtsync | pycrdt-websocket | crdtsync / peer | goal |",
             "|---|---:|---:|---:|---|"]
    for name, fn, fmt, goal in rows(args):
        a, b = [fn(r) for r in ours], [fn(r) for r in peer]
        ratios = [x / y for x, y in zip(a, b, strict=True) if y]
        verdict = ""
        if goal is not None:
            verdict = f"<= {goal:.2f}: {'holds' if median(ratios) <= goal else 'missed'}"
        ratio = spread(ratios, ".2f") if len(ratios) == len(a) else "-"
        lines.append(f"| {name} | {spread(a, fmt)} | {spread(b, fmt)} | {ratio} | {verdict} |")
    return lines


# --- main -----------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # run finally:s
    args.load_before = os.getloadavg()[0]
    print(f"Machine: {machine(LIBS, sqlite=False, sep='; ')}", flush=True)
    isolate = args.isolate and can_isolate()
    if args.isolate and not isolate:
        print("fewer than 2 CPUs usable: no storm with the server on a CPU of its own",
              flush=True)
    runners = {"crdtsync": run_crdtsync, "pycrdt-websocket": run_peer}
    rounds: list[dict[str, Run]] = []
    isolated: list[dict[str, Run]] = []
    for round_no in range(args.rounds):
        rng = random.Random(args.seed + round_no)
        ids = [rng.randrange(1, crdt.MAX_CLIENT_ID + 1) for _ in range(args.devices)]
        results: list[dict[str, Run]] = [{}, {}]
        order = SYSTEMS if round_no % 2 == 0 else SYSTEMS[::-1]
        for name in order:
            for alone in (False, True) if isolate else (False,):
                with tempfile.TemporaryDirectory(prefix="storm-") as tmp:
                    run = await runners[name](ids, Path(tmp), args, alone)
                results[int(alone)][name] = run
                print_run(round_no, run, args.devices)
        rounds.append(results[0])
        if isolate:
            isolated.append(results[1])
    text = render(rounds, isolated, args)
    report(text, args.write, "storm")
    return 0 if all(r.ok for rr in rounds + isolated for r in rr.values()) else 1


def print_run(round_no: int, run: Run, devices: int) -> None:
    """One progress line per storm, and its first errors."""
    cpus = "own CPU" if run.isolated else "shared "
    print(f"round {round_no + 1} {run.system:>16} {cpus}: {run.elapsed:6.2f} s to converge, "
          f"{run.up:,} B up + {run.down:,} B down = {run.total:,} B "
          f"({run.total / devices:,.0f} B/device), {run.connections} connections, "
          f"server CPU {run.server_cpu:.2f} s, load CPU {run.client_cpu:.2f} s, "
          f"proxy CPU {run.proxy_cpu:.2f} s, setup {run.setup:.1f} s, "
          f"listen drops {run.listen_drops}, errors {len(run.errors)}, "
          f"mismatched {run.mismatched}", flush=True)
    for error in sorted(set(run.errors))[:5]:
        print(f"    error: {error}", flush=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=500,
                        help="connections open at once, both systems (default 500)")
    parser.add_argument("--proxy", choices=("inline", "process"), default="process",
                        help="the byte-counting proxy in this process or its own")
    parser.add_argument("--clients", choices=("real", "lean"), default="real",
                        help="real: each crdtsync device its own HttpTransport and session, "
                             "each peer device pycrdt's Provider; lean: one aiohttp session "
                             "without keep-alive for crdtsync, the Yjs exchange written out "
                             "for the peer (same bytes, less load-generator CPU)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="skip the second storm of each system with the server on a CPU "
                             "of its own")
    parser.add_argument("--timeout", type=float, default=120.0, help="per device, seconds")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="50 devices, 1 round (CI smoke)")
    parser.add_argument("--write", type=Path, help="replace the generated block of this file")
    parser.add_argument("--peer-server", help=argparse.SUPPRESS)
    parser.add_argument("--proxy-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_server:
        logging.basicConfig(level=logging.WARNING)
        asyncio.run(peer_server_main(args.peer_server))
        return
    if args.proxy_server:
        asyncio.run(proxy_main(args.proxy_server))
        return
    if args.quick:
        args.devices, args.rounds = 50, 1
    try:
        sys.exit(asyncio.run(main(args)))
    except asyncio.CancelledError:  # SIGTERM: children stopped by the finally blocks
        sys.exit(143)


if __name__ == "__main__":
    cli()
