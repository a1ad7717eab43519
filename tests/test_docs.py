"""The docs stay true: the conflict-simulation example of docs/testing.md runs as written
and stays under 30 lines; docs/protocol.md names every error code (section 12) and every
envelope key the codec reads or writes (sections 3, 3.1, 4 and 5), taken from the code."""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from crdtsync import errors, protocol

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


async def test_testing_md_example_runs_and_is_short() -> None:
    source = python_blocks(DOCS / "testing.md")[0]
    assert len(source.strip().splitlines()) < 30
    namespace: dict[str, Any] = {}
    exec(compile(source, "docs/testing.md", "exec"), namespace)
    tests = [v for k, v in namespace.items() if k.startswith("test_")]
    assert len(tests) == 1
    await tests[0]()


# --- docs/protocol.md stays true to the code ----------------------------------------------


PROTOCOL_MD = DOCS / "protocol.md"


def section(heading: str) -> str:
    """The text of the protocol.md section whose heading starts with ``heading`` (for
    example ``"## 12."``), up to the next heading of any level."""
    text = PROTOCOL_MD.read_text()
    match = re.search(rf"^{re.escape(heading)}.*?$(.*?)(?=^#{{2,3}} )", text, flags=re.S | re.M)
    assert match, f"no section {heading!r} in docs/protocol.md"
    return match.group(1)


def table_keys(text: str) -> set[str]:
    """The names in backticks in the first cell of each table row of ``text``."""
    cells = re.findall(r"^\|([^|\n]*)\|", text, flags=re.M)
    return {name for cell in cells for name in re.findall(r"`([^`]+)`", cell)}


def error_classes() -> list[type[errors.CrdtsyncError]]:
    """Every error class of crdtsync.errors, the base included."""
    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.CrdtsyncError)]


def test_every_error_code_is_in_the_errors_table() -> None:
    """Every code that crosses the wire (a class with an HTTP status) is in the table of
    section 12, with that status; the local ones are named in section 12 too; every class is
    drawn in the docstring tree of crdtsync.errors."""
    text = section("## 12.")
    rows = {code: row for row in re.findall(r"^\|.*$", text, flags=re.M)
            for code in re.findall(r"`([^`]+)`", row.split("|")[1])}
    for cls in error_classes():
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__}: not in the tree"
        if cls.status:
            assert cls.code in rows, f"{cls.code!r} is not in the table of section 12"
            assert str(cls.status) in rows[cls.code].split("|")[2], (cls.code, cls.status)
        else:
            assert f"`{cls.code}`" in text, f"local error {cls.code!r} is not in section 12"


class Recording(dict[str, Any]):
    """A decoded map that records which keys the decoder looked up."""

    def __init__(self, data: dict[str, Any], seen: set[str]) -> None:
        super().__init__(data)
        self.seen = seen

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.seen.add(str(key))
        return super().__contains__(key)


UPDATE = bytes.fromhex("0101f0b0950a00280105737461746501610177016200")
"""A Yjs v1 update: ``state["a"] = "b"`` by client 21321840."""


def full_request() -> protocol.SyncRequest:
    """A request with every field set, so that the encoder writes every key it knows."""
    sample = {
        "device": "d1",
        "docs": (protocol.DocSync("state", b"\x00", UPDATE, 1, adopt=True, stamps=(
            protocol.StampedWrite("state", "a", 1 << 16, "b"),)),),
        "clock": 1,
        "events": (protocol.Event(1, "t", 5, {"a": 1}),),
        "purged": 1, "down_done": 1, "awaiting": 1,
        "results": (protocol.Result(1, True, {"x": 1}),),
        "calls": (protocol.ProxyCall("r1", "weather", {"city": "Oslo"}),),
        "outcomes_acked": ("r0",),
        "batches": (protocol.TemplateBatch("t", bytes(12)),),
    }
    fields = {f.name for f in dataclasses.fields(protocol.SyncRequest)}
    assert fields == set(sample), f"give a sample for the new fields {fields - set(sample)}"
    return protocol.SyncRequest(**sample)  # type: ignore[arg-type]


def full_response() -> protocol.SyncResponse:
    """A response with every field set, so that the encoder writes every key it knows."""
    sample = {
        "docs": (protocol.DocSync("state", b"\x00", UPDATE, 1),),
        "acked": 1, "time": 2, "down_done": 1, "accepted": ("r1",),
        "conflicts": (protocol.Conflict("state", "a", protocol.WriteInfo("cloud", 2, 1),
                                        protocol.WriteInfo("device", 1, None, True)),),
        "down": (protocol.DownItem(1, "message", "t", {"a": 1}),
                 protocol.DownItem(2, "command", "m", {"b": 2}, 5)),
        "outcomes": (protocol.Outcome("r1", {"ok": True, "status": 200, "body": None,
                                             "error": None, "message": "", "attempts": 1}),),
    }
    fields = {f.name for f in dataclasses.fields(protocol.SyncResponse)}
    assert fields == set(sample), f"give a sample for the new fields {fields - set(sample)}"
    return protocol.SyncResponse(**sample)  # type: ignore[arg-type]


def keys_written(data: bytes) -> tuple[set[str], set[str]]:
    """The keys of an encoded message and of its document entries."""
    obj = msgpack.unpackb(data, raw=False)
    return set(obj), {key for entry in obj.get("docs", []) for key in entry}


def keys_read(decode: Callable[[bytes], Any], data: bytes,
              monkeypatch: pytest.MonkeyPatch) -> tuple[set[str], set[str]]:
    """The keys ``decode(data)`` looks up in the message and in its document entries."""
    top: set[str] = set()
    entries: set[str] = set()
    unpack = protocol._unpack

    def recording_unpack(raw: bytes) -> dict[str, Any]:
        obj = Recording(unpack(raw), top)
        if isinstance(obj.get("docs"), list):
            dict.__setitem__(obj, "docs", [Recording(d, entries) for d in obj["docs"]])
        top.clear()
        return obj

    with monkeypatch.context() as patch:
        patch.setattr(protocol, "_unpack", recording_unpack)
        decode(data)
    return top, entries


def test_every_envelope_key_is_in_the_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key the codec writes or reads in a request, a response, a document entry or an
    error frame is a row of the table of section 3, 4, 3.1 or 5."""
    request, response = full_request(), full_response()
    encoded_request = protocol.encode_request(request)
    encoded_response = protocol.encode_response(response)
    assert protocol.decode_request(encoded_request).docs == request.docs
    req_written, req_entries = keys_written(encoded_request)
    resp_written, resp_entries = keys_written(encoded_response)
    req_read, req_entries_read = keys_read(protocol.decode_request, encoded_request,
                                           monkeypatch)
    resp_read, resp_entries_read = keys_read(protocol.decode_response, encoded_response,
                                             monkeypatch)
    frame = msgpack.unpackb(protocol.encode_error(errors.SeqGap("gap", {"seq": 3})))
    frame_read: set[str] = set()
    protocol.decode_error_obj(Recording(frame, frame_read))
    expected = {
        "## 3. ": req_written | req_read,
        "### 3.1 ": req_entries | resp_entries | req_entries_read | resp_entries_read,
        "## 4. ": resp_written | resp_read,
        "## 5. ": set(frame) | frame_read,
    }
    assert {"tev", "rqw", "u", "c", "out", "retry"} <= set().union(*expected.values())
    for heading, keys in expected.items():
        missing = keys - table_keys(section(heading))
        assert not missing, f"keys missing from the table of {heading.strip()}: {missing}"
