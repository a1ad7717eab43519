"""The HTTP adapters of the server: aiohttp handlers over the core (``crdtsync_server.core``).

``app.py`` builds the application; every other module is one concern of the API.
"""
