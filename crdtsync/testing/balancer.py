"""``Balancer``: an HTTP reverse proxy on loopback that sends each request to the next of
several upstream servers (round robin), as a load balancer without sticky sessions does.

Put it in front of several ``crdtsync serve`` instances sharing one database: a device then
talks to a different instance on every request, also on one keep-alive connection. The
body is forwarded as received and the answer is streamed back as it arrives, so long polls
(``/v1/wake``, ``/v1/commands/{id}?wait=``) and the Server-Sent Events feed pass through.

Like a real balancer (nginx's ``proxy_next_upstream error``), a request that could not be
sent because its upstream refused the connection goes to the next upstream; a request that
reached an upstream is never sent twice (its client sees the failure, ``502``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

import aiohttp
from aiohttp import web

_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length",
})


_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
"""Headers aiohttp would add of its own: only the client's own are forwarded."""


class Balancer:
    """Round robin over ``upstreams`` (base URLs such as ``http://127.0.0.1:8001``).

    Use ``async with Balancer(urls) as lb:`` and point clients at :attr:`url`.
    :attr:`served` counts the requests each upstream answered."""

    def __init__(self, upstreams: Sequence[str], *, host: str = "127.0.0.1") -> None:
        if not upstreams:
            raise ValueError("a balancer needs at least one upstream")
        self.upstreams = [u.rstrip("/") for u in upstreams]
        self.host = host
        self.served: Counter[str] = Counter()
        self._next = itertools.cycle(range(len(self.upstreams)))
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> Balancer:
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, connect=2))
        app = web.Application(client_max_size=64 * 1024 * 1024,
                              handler_args={"auto_decompress": False})
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        for _ in self.upstreams:
            upstream = self.upstreams[next(self._next)]
            try:
                upstream_response = await self._session.request(
                    request.method, upstream + request.path_qs, data=body, headers=headers,
                    allow_redirects=False, skip_auto_headers=_AUTO_HEADERS)
            except aiohttp.ClientConnectorError:
                continue  # never reached it: the next upstream may take the request
            except aiohttp.ClientError as exc:
                return web.Response(status=502, text=f"upstream failed: {exc}")
            async with upstream_response:
                self.served[upstream] += 1
                return await self._relay(request, upstream_response)
        return web.Response(status=502, text="no upstream accepted the connection")

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse
                     ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in _HOP_BY_HOP:
                response.headers.add(key, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except aiohttp.ClientError:
            # The upstream died mid-answer: cut the client's connection too, as a real
            # balancer does, so the client cannot take a truncated answer for a whole one.
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response
