"""``Server``: run the app on a TCP port as an ``async with`` resource (CLI, demo, tests)."""

from __future__ import annotations

from aiohttp import web

from .app import SERVICES, ServerConfig, Services, create_app
from .store import Store


class Server:
    """The sync server listening on ``config.host:config.port`` (port 0 picks a free one).

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
        site = web.TCPSite(self._runner, self.config.host, self.config.port,
                           backlog=self.config.backlog)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
