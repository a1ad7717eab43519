"""The PostgreSQL backend (``postgresql://`` URLs): :class:`PostgresStore`, for several
server instances on one database. Needs ``asyncpg`` (``pip install 'crdtsync[postgres]'``)."""

from .store import PostgresStore

__all__ = ["PostgresStore"]
