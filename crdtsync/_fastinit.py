"""``fast_init``: a quicker ``__init__`` for the frozen dataclasses built on every sync.

A frozen dataclass's generated ``__init__`` sets each field with ``object.__setattr__`` (a
global and an attribute lookup, then a generic call, per field). With ``slots=True`` each
field's slot descriptor can set it directly, which takes about 40 % less: 3.1 -> 1.9 µs for
a device record, 1.1 -> 0.6 µs for a key stamp. The records one sync builds on the server
(its request, documents, stamps, writes, results, answer) cost about 5 % of its CPU before.

Where the C accelerator is built (``crdtsync._speedups``), one call of a slot filler sets
every slot instead: a four-field record 440 -> about 250 ns.

The replacement keeps the signature, the defaults and the default factories; the class
stays frozen (its ``__setattr__`` is untouched). It refuses what it does not reproduce:
``__post_init__``, ``InitVar``, ``init=False`` and keyword-only fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from ._accel import speedups

T = TypeVar("T")


def slot_filler(cls: type, names: tuple[str, ...]) -> Callable[..., None] | None:
    """``filler(obj, *values)`` setting ``names`` of ``cls`` in one C call, where
    ``crdtsync._speedups`` is built (else ``None``: each slot's descriptor sets it)."""
    return None if speedups is None else speedups.slot_filler(cls, names)


ORIGINAL_INITS: dict[type, Callable[..., None]] = {}
"""Each class :func:`fast_init` changed, with the ``__init__`` dataclasses generated for it
(tests compare the two)."""


def fast_init(cls: type[T]) -> type[T]:
    """Give ``cls``, a ``@dataclass(frozen=True, slots=True)``, an ``__init__`` that sets its
    slots directly (see the module). Apply it above ``@dataclass``."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} is not a frozen dataclass with slots")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has __post_init__, which fast_init does not call")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if len(fields) != len(vars(cls)["__dataclass_fields__"]) or any(
            not f.init or f.kw_only for f in fields):
        raise TypeError(f"{cls.__name__} has InitVar, init=False or keyword-only fields")
    ORIGINAL_INITS[cls] = cls.__init__
    cls.__init__ = _init_for(cls, fields)  # type: ignore[method-assign]
    return cls


def _init_for(cls: type, fields: tuple[dataclasses.Field[Any], ...]) -> Callable[..., None]:
    namespace: dict[str, Any] = {"_MISSING": dataclasses.MISSING}
    params, values = [], []
    for n, f in enumerate(fields):
        value = f.name
        if f.default is not dataclasses.MISSING:
            namespace[f"_default{n}"] = f.default
            params.append(f"{f.name}=_default{n}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory{n}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
            value = f"_factory{n}() if {f.name} is _MISSING else {f.name}"
        else:
            params.append(f.name)
        values.append(value)
    filler = slot_filler(cls, tuple(f.name for f in fields)) if fields else None
    if filler is not None:  # one C call sets them all
        namespace["_fill"] = filler
        body = [f"    _fill(self, {', '.join(values)})"]
    else:  # each slot's descriptor sets it
        for n, f in enumerate(fields):
            namespace[f"_set{n}"] = getattr(cls, f.name).__set__
        body = [f"    _set{n}(self, {value})" for n, value in enumerate(values)]
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body or ["    pass"])
    exec(source, namespace)  # our own field names, as dataclasses does
    init: Callable[..., None] = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init
