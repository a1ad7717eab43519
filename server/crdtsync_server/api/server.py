"""``Server``: run the app on a TCP port as an ``async with`` resource (CLI, demo, tests)."""

from __future__ import annotations

import gc

from aiohttp import web

from ..config import ServerConfig
from ..core import Services
from ..store import Store
from .app import create_app
from .deadlines import GuardedSite
from .keys import HEADS, SERVICES


class Server:
    """The sync server listening on ``config.host:config.port`` (port 0 picks a free one),
    with the slow-client deadlines of :mod:`crdtsync_server.api.deadlines`.

    ``async with Server(config) as server`` starts it; ``server.url`` is where devices
    connect; leaving the block stops it and closes the store.
    """

    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        self.config = config
        self.app = create_app(config, store)
        self._runner: web.AppRunner | None = None
        self.port = config.port

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def services(self) -> Services:
        return self.app[SERVICES]

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        # handler_cancellation: a long poll or feed stream whose client left is cancelled
        # instead of waiting out its timeout.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     handler_cancellation=True)
        await self._runner.setup()
        # The listener guards each connection with the app's request-head deadline.
        site = GuardedSite(self._runner, self.config.host, self.config.port,
                           backlog=self.config.backlog, deadline=self.app[HEADS],
                           reuse_port=self.config.worker is not None)
        try:
            await site.start()
        except BaseException:  # a taken port: close what setup opened (store, tasks)
            await self.aclose()
            raise
        self.port = site.port
        tune_gc(self.config.gc_young)

    async def aclose(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


def tune_gc(young: int) -> None:
    """Freeze what is alive (the start-up's modules, routes, caches: never scanned again) and
    collect the young generation only once ``young`` more container objects were allocated
    than freed (``ServerConfig.gc_young``); nothing when ``young`` is 0. Reference counting
    still frees everything that is not in a cycle at once; cycles wait for the next
    collection."""
    if young <= 0:
        return
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)
