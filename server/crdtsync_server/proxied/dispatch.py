"""``ProxyRunner``: performs devices' proxied requests, each at most once.

A request stored by a sync commit is ``pending``; the runner claims it (``pending`` ->
``running``, atomically in the store, so two workers or two processes never both run it),
calls its route through an :class:`~crdtsync_server.proxied.routes.Executor`, and stores the
outcome (``done``). The sync that brought the request waits up to a short budget so a fast
target's outcome rides on the same response; slower ones arrive on a later sync. A process
that dies while a request runs leaves it ``running``; once that process is gone (a clean
stop, or no heartbeat for ``instance_ttl``) the next :meth:`ProxyRunner.recover` of any
instance finishes it with the error ``interrupted`` instead of calling the target a second
time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence

from crdtsync import hlc
from crdtsync._aio import cancel_and_wait
from crdtsync.errors import BodyTooLarge
from crdtsync.protocol import DEFAULT_LIMITS, Limits, item_body

from ..store import DownlinkStore, SettingsStore
from ..store.records import ProxyRequest
from .routes import (
    ROUTE_RESPONSE_TOO_LARGE,
    Executor,
    Route,
    RouteOutcome,
    RouteTable,
    load_routes_file,
)

log = logging.getLogger("crdtsync.server")

INTERRUPTED = {"ok": False, "status": None, "body": None, "error": "interrupted",
               "message": "the server stopped while the request ran; it is not run twice",
               "attempts": 1}


ROUTES_SETTING = "routes"


async def load_route_table(store: SettingsStore, routes_file: str | None) -> RouteTable:
    """Routes set through the API (persisted in the store's settings), then the routes of
    ``routes_file``, which win for the aliases they define."""
    table = RouteTable()
    saved = await store.get_setting(ROUTES_SETTING)
    for alias, obj in (json.loads(saved) if saved else {}).items():
        table.put(Route.from_json(alias, obj))
    if routes_file:
        for route in (await asyncio.to_thread(load_routes_file, routes_file)).values():
            table.put(route)
            table.from_file.add(route.alias)
    return table


async def remember_route(store: SettingsStore, route: Route | None, alias: str) -> None:
    """Persist a route set through the API (``None``: forget ``alias``). Only API routes are
    stored; routes of the routes file stay in the file (with their ``${ENV}`` secrets)."""
    saved = await store.get_setting(ROUTES_SETTING)
    routes = json.loads(saved) if saved else {}
    if route is None:
        routes.pop(alias, None)
    else:
        routes[alias] = route.to_json(redact=False)
    await store.set_setting(ROUTES_SETTING, json.dumps(routes))


class ProxyRunner:
    """Runs proxied requests in background tasks owned by the server app. An outcome over
    ``limits.max_item_body`` (a device would not take it) is stored as the failure
    ``route_response_too_large`` instead."""

    def __init__(self, store: DownlinkStore, routes: RouteTable, executor: Executor,
                 limits: Limits = DEFAULT_LIMITS, *,
                 clock: Callable[[], int] = hlc.wall_ms) -> None:
        self.store = store
        self.clock = clock
        """The server's wall clock in ms (``ServerConfig.clock``): when requests were claimed
        and finished."""
        self.routes = routes
        self.executor = executor
        self.limits = limits
        self._tasks: set[asyncio.Task[None]] = set()
        self.outcomes: dict[str, int] = {}
        """Requests this runner finished, by outcome: ``ok``, the route's error code, or
        ``interrupted`` (a metric)."""

    async def recover(self, stale_ms: int = 0) -> int:
        """Prove this instance alive, then finish as ``interrupted`` the requests left
        ``running`` by an instance without a heartbeat for ``stale_ms`` (a dead process:
        this one before a restart, or another instance on the same database). Run at start
        and then periodically (``Maintenance``)."""
        now = self.clock()
        await self.store.heartbeat(now)
        count = await self.store.interrupt_running(INTERRUPTED, now, stale_ms)
        if count:
            self._count("interrupted", count)
            log.warning("%d proxied requests of a server instance that is gone (stopped or"
                        " restarted) were finished as interrupted", count)
        return count

    async def run(self, device: str, ids: Sequence[str], budget: float) -> None:
        """Claim the requests ``ids`` of ``device`` that are still pending, then perform them
        in the background, waiting at most ``budget`` seconds.

        Claiming happens before this returns, so before the sync answers: a request the
        device saw accepted is never left pending by a process that died afterwards (it is
        ``running``, and a restart turns it into ``interrupted``). Ids already claimed or
        finished are skipped, which makes replays harmless."""
        claimed = [r for r in [await self.store.claim_request(device, i, self.clock()) for i in ids]
                   if r is not None]
        tasks = [self._spawn(request) for request in claimed]
        if tasks and budget > 0:
            await asyncio.wait(tasks, timeout=budget)

    def _spawn(self, request: ProxyRequest) -> asyncio.Task[None]:
        task = asyncio.create_task(self._perform(request),
                                   name=f"crdtsync-proxy-{request.device}-{request.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _perform(self, request: ProxyRequest) -> None:
        outcome = await self.executor.perform_alias(self.routes, request.route, request.device,
                                                    request.body)
        outcome = self._deliverable(request, outcome)
        await self.store.finish_request(request.device, request.id, outcome.to_json(),
                                        self.clock())
        self._count("ok" if outcome.ok else str(outcome.error), 1)

    def _count(self, outcome: str, n: int) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + n

    def _deliverable(self, request: ProxyRequest, outcome: RouteOutcome) -> RouteOutcome:
        """``outcome``, or ``route_response_too_large`` if a device could not take it."""
        try:
            item_body(outcome.to_json(), self.limits, what="outcome")
        except BodyTooLarge as exc:
            return RouteOutcome.failure(
                ROUTE_RESPONSE_TOO_LARGE,
                f"route {request.route!r}: the answer is {exc.detail['size']} bytes as an "
                f"outcome, over the {self.limits.max_item_body} bytes a device takes",
                status=outcome.status, attempts=outcome.attempts)
        return outcome

    async def aclose(self, grace: float = 5.0) -> None:
        """Let running requests finish for ``grace`` seconds, then cancel the rest (they
        stay ``running`` and become ``interrupted`` at the next start)."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            await cancel_and_wait(*pending)
