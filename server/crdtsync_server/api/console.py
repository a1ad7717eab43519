"""The web console: static HTML, JS modules and CSS served at ``/console`` (package data in
``crdtsync_server/console``). Serving them needs no token: the page asks for the admin token
and sends it on its own API calls (``Authorization`` header), never in a URL. Every answer
carries a strict Content-Security-Policy (no inline script or style, calls to this origin
only). See docs/console.md."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

routes = web.RouteTableDef()

ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "api.js": "text/javascript",
    "metrics.js": "text/javascript",
    "console.css": "text/css",
}
"""The files the console is made of, with their content types (nothing else is served)."""

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def asset(name: str) -> web.Response:
    """One console file with the security headers; 404 for a name not in :data:`ASSETS`."""
    content_type = ASSETS.get(name)
    if content_type is None:
        raise web.HTTPNotFound(reason=f"no console file {name!r}")
    body = resources.files("crdtsync_server").joinpath("console", name).read_bytes()
    return web.Response(body=body, content_type=content_type, charset="utf-8",
                        headers=SECURITY_HEADERS)


@routes.get("/console")
async def console_page(request: web.Request) -> web.Response:
    """The console's single page (its views are chosen by the URL fragment)."""
    return asset("index.html")


@routes.get("/console/{name}")
async def console_asset(request: web.Request) -> web.Response:
    return asset(request.match_info["name"])
