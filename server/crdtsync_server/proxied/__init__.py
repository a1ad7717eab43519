"""Proxied requests: a device asks the cloud to call a configured route for it.

``routes`` holds the route table and the :class:`~.routes.Executor` port, ``dispatch`` the
:class:`~.dispatch.ProxyRunner` (each request at most once, outcomes stored for the device),
``executor`` the HTTP adapter that performs routes with aiohttp.
"""
