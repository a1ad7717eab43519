"""The in-memory store: :class:`MemoryStore`, one part per storage role (see
``store/memory/store.py``)."""

from .store import MemoryStore

__all__ = ["MemoryStore"]
