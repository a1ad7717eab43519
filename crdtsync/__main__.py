"""``python -m crdtsync``: the ``crdtsync`` command (see :mod:`crdtsync.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
