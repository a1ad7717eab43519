"""Hostile and unusual Yjs updates (issue 11, findings 1-3): the bounded update reader, the
check of what an update really wrote, nested shared types end to end, and a seeded fuzz
through the real server.

Every server case asserts the typed answer, then that the server still serves and that
nothing acknowledged was lost and nothing of the bad request stored (``Victim`` of
test_bad_input).
"""

from __future__ import annotations

import math
import random
import zlib
from typing import Any

import aiohttp
import pytest
from pycrdt import Array, Doc, Map, Text

from crdtsync import AdminClient, crdt
from crdtsync.errors import CorruptUpdate, InvalidValue
from crdtsync.protocol import decode_response, parse_state_vector
from crdtsync.testing import yjs
from crdtsync.yupdate import read_update
from crdtsync_server import Server
from crdtsync_server.sync import STATE_DOC, doc_key

from .conftest import DeviceFactory
from .test_bad_input import Victim, raw_doc, raw_event, raw_request
from .test_bad_input import http as http  # fixtures, used by name
from .test_bad_input import victim as victim

# --- the reader alone ----------------------------------------------------------------------


def rich_doc(client_id: int = 7) -> Doc[Any]:
    """Every kind of content a crdtsync-conforming Yjs client writes, with history."""
    doc: Doc[Any] = Doc(client_id=client_id)
    state = doc.get("state", type=Map)
    state["n"] = 5
    state["f"] = -2.5
    state["s"] = "naïve 😀"
    state["obj"] = {"list": [1, None, True, {"deep": "x"}], "e": {}}
    state["cfg"] = Map({"mode": "eco", "limits": Array([1, 2])})
    state["note"] = Text("hello 😀")
    doc.get("config", type=Map)["interval"] = 30
    state["n"] = 6
    del state["f"]
    state["note"].insert(len("hello 😀".encode()), "!")  # type: ignore[union-attr] # (bytes)
    return doc


def test_reader_accepts_what_pycrdt_writes() -> None:
    doc = rich_doc()
    full = doc.get_update()
    info = read_update(full, doc="state")
    assert info.missing({}) is None
    assert info.ends == parse_state_vector(doc.get_state())
    before = doc.get_state()
    doc.get("state", type=Map)["n"] = 7
    diff = doc.get_update(before)
    info = read_update(diff, doc="state")
    # The overwrite builds on the old item of "n": complete only where that item exists.
    assert info.missing(parse_state_vector(before)) is None
    assert info.missing({}) is not None


def deep(depth: int) -> bytes:
    return yjs.set_key(9, 0, "x", raw=yjs.nested_array(depth))


def one(content: yjs.Content, **where: Any) -> bytes:
    return yjs.update(yjs.client(9, 0, yjs.item(content, **where)))


INVALID_UPDATES = [
    pytest.param(deep(33), "state:state.x", id="any-nested-33"),
    pytest.param(deep(20_000), "state:state.x", id="any-nested-20000"),
    pytest.param(yjs.set_key(9, 0, "x", {"a": {"b": [float("nan")]}}), "state:state.x.a.b[0]",
                 id="nan-deep"),
    pytest.param(yjs.set_key(9, 0, "x", math.inf), "state:state.x", id="infinity"),
    pytest.param(yjs.set_key(9, 0, "x", yjs.Float32(math.nan)), "state:state.x",
                 id="float32-nan"),
    pytest.param(yjs.set_key(9, 0, "x", yjs.Varint(2**62)), "state:state.x", id="int-2**62"),
    pytest.param(yjs.set_key(9, 0, "x", yjs.Varint(-(2**53))), "state:state.x",
                 id="int-minus-2**53"),
    pytest.param(yjs.set_key(9, 0, "x", yjs.Undefined()), "state:state.x", id="undefined"),
    pytest.param(yjs.set_key(9, 0, "x", yjs.BigInt(5)), "state:state.x", id="bigint"),
    pytest.param(yjs.set_key(9, 0, "x", [1, b"\x00"]), "state:state.x[1]", id="uint8array"),
    pytest.param(yjs.set_key(9, 0, "x", {"": 1}), "state:state.x", id="empty-object-key"),
    pytest.param(yjs.set_key(9, 0, "x", {"k" * 257: 1}), "state:state.x", id="long-object-key"),
    pytest.param(yjs.set_key(9, 0, "", 1), "state:state", id="empty-map-key"),
    pytest.param(yjs.set_key(9, 0, "x", 1, root=""), "state:", id="root-named-empty"),
    pytest.param(one(yjs.any_content(1, 2), root="list"), "state:list", id="root-array"),
    pytest.param(one(yjs.string_content("hi"), root="text"), "state:text", id="root-text"),
    pytest.param(one(yjs.binary_content(b"\x01"), root="state", key="b"), "state:state.b",
                 id="content-binary"),
    pytest.param(one(yjs.json_content("1"), root="state", key="j"), "state:state.j",
                 id="content-json"),
    pytest.param(one(yjs.embed_content("{}"), root="state", key="e"), "state:state.e",
                 id="content-embed"),
    pytest.param(one(yjs.format_content("bold", "true"), root="state", key="f"),
                 "state:state.f", id="content-format"),
    pytest.param(one(yjs.doc_content("sub"), root="state", key="d"), "state:state.d",
                 id="subdocument"),
    *(pytest.param(one(yjs.type_content(ref, "p"), root="state", key="xml"), "state:state.xml",
                   id=f"type-{ref}") for ref in (3, 4, 5, 6)),
]


@pytest.mark.parametrize(("update", "where"), INVALID_UPDATES)
def test_reader_refuses_values_a_document_may_not_hold(update: bytes, where: str) -> None:
    with pytest.raises(InvalidValue) as caught:
        read_update(update, doc="state")
    assert caught.value.detail["where"].startswith(where)


def nested_maps(depth: int) -> bytes:
    """``state.m = Y.Map`` with a Y.Map inside, ``depth`` levels, in one update."""
    structs = [yjs.item(yjs.type_content(1), root="state", key="m")]
    structs += [yjs.item(yjs.type_content(1), parent=(9, i), key="m") for i in range(depth - 1)]
    return yjs.update(yjs.client(9, 0, *structs))


def test_reader_bounds_nested_types() -> None:
    read_update(nested_maps(32), doc="state")
    with pytest.raises(InvalidValue, match="nested more than 32 levels"):
        read_update(nested_maps(33), doc="state")


CORRUPT_UPDATES = [
    pytest.param(b"\x80\x80\x80\x80\x10", id="2**32-clients-in-5-bytes"),
    pytest.param(yjs.varuint(3) + yjs.varuint(2**40), id="2**40-structs"),
    pytest.param(b"\x01\x01\x09\x00\x28\x01\x05state\x01x\x08\x01\x75\xff\xff\xff\xff\x0f",
                 id="array-claims-2**32-items"),
    pytest.param(b"\x01\x01\x09\x00\x28\x01\x05state\x01x\x08\x01\x77\xff\xff\xff\x7f",
                 id="string-claims-256MB"),
    pytest.param(yjs.set_key(9, 0, "x", 1) + b"\x00", id="trailing-bytes"),
    pytest.param(yjs.set_key(9, 0, "x", 1)[:-1], id="truncated"),
    pytest.param(b"", id="empty"),
    pytest.param(one(yjs.Content(11, b""), root="state", key="x"), id="content-kind-11"),
    pytest.param(yjs.set_key(9, 0, "x", raw=b"\x70"), id="any-tag-112"),
    pytest.param(yjs.update(yjs.client(9, 2**32 - 1, yjs.item(yjs.any_content(1, 2),
                                                               root="state", key="x"))),
                 id="clock-past-2**32"),
    pytest.param(yjs.update(yjs.client(2**53, 0, yjs.item(yjs.any_content(1), root="state",
                                                          key="x"))), id="client-2**53"),
    pytest.param(one(yjs.Content(8, b"\x01\x77\x02\xc3\x28"), root="state", key="x"),
                 id="invalid-utf8"),
    pytest.param(yjs.update(deletes=[(9, [(2**32 - 1, 5)])]), id="delete-past-2**32"),
]


@pytest.mark.parametrize("update", CORRUPT_UPDATES)
def test_reader_refuses_bytes_that_are_not_an_update(update: bytes) -> None:
    with pytest.raises(CorruptUpdate):
        read_update(update, doc="state")


def test_missing_tells_what_an_update_builds_on() -> None:
    builds_on = yjs.update(yjs.client(9, 0, yjs.item(yjs.any_content(1), origin=(5, 3))))
    assert read_update(builds_on).missing({5: 3}) == (5, 3)
    assert read_update(builds_on).missing({5: 4}) is None
    later = yjs.update(yjs.client(9, 4, yjs.item(yjs.any_content(1), root="state", key="x")))
    assert read_update(later).missing({9: 3}) == (9, 3)
    assert read_update(later).missing({9: 4}) is None
    holed = yjs.update(yjs.client(9, 0, yjs.item(yjs.any_content(1), root="state", key="x"),
                                  yjs.skip(2),
                                  yjs.item(yjs.any_content(2), root="state", key="y")))
    assert read_update(holed).missing({9: 10}) is not None
    own = yjs.update(yjs.client(9, 0, yjs.item(yjs.any_content(1), root="state", key="x"),
                                yjs.item(yjs.any_content(2), origin=(9, 0))))
    assert read_update(own).missing({}) is None
    # A run from below the receiver's clock to above it: resend from the receiver's clock.
    assert read_update(own).missing({9: 1}) == (9, 1)
    assert read_update(own).missing({9: 2}) is None  # a pure replay: Yrs skips it whole


# --- through the server --------------------------------------------------------------------


async def post_update(victim: Victim, http: aiohttp.ClientSession, update: bytes,
                      **request: Any) -> Any:
    return await victim.post(http, raw_request(docs=[raw_doc(update)], **request))


@pytest.mark.parametrize("depth", [1_000, 20_000, 1_000_000])
async def test_deeply_nested_value_is_refused_and_the_server_lives(
        victim: Victim, http: aiohttp.ClientSession, depth: int) -> None:
    """~40 KB nested 20,000 deep killed the process (SIGSEGV in pycrdt); 2 MB at 1,000,000
    inside ``apply_update``; 1,000-10,000 answered 500."""
    body = raw_request(docs=[raw_doc(deep(depth))], ev=[raw_event(2)])
    # Compressed, as a client would send it (2 MB of nesting deflates to a few KB).
    reply = await victim.post(http, zlib.compress(body), headers={"Content-Encoding": "deflate"})
    assert (reply.status, reply.code()) == (400, "invalid_value")
    assert reply.detail()["where"].startswith("state:state.x[0]")
    await victim.assert_survived()


async def test_update_declaring_2_32_clients_is_refused(victim: Victim,
                                                        http: aiohttp.ClientSession) -> None:
    reply = await post_update(victim, http, b"\x80\x80\x80\x80\x10")
    assert (reply.status, reply.code()) == (400, "corrupt_update")
    await victim.assert_survived()


def overwrite(victim: Victim, value: Any) -> bytes:
    """A foreign client's overwrite of ``state.a``: an item whose origin is the device's
    item for ``a`` (clock 0), as every diff after the first sync is. Alone in a scratch
    document it stays pending, which is how it bypassed the old check."""
    content = yjs.any_content(value) if not isinstance(value, bytes) else \
        yjs.any_content(raw=value)
    return yjs.update(yjs.client(31337, 0, yjs.item(content, origin=(victim.dev.doc.client_id,
                                                                     0))),
                      deletes=[(victim.dev.doc.client_id, [(0, 1)])])


@pytest.mark.parametrize("value", [
    pytest.param(math.nan, id="nan"), pytest.param(yjs.Varint(2**62), id="int-2**62"),
    pytest.param(b"\x74\x01\x00", id="bytes"), pytest.param(yjs.Undefined(), id="undefined"),
    pytest.param(yjs.nested_array(20_000), id="nested-20000")])
async def test_incremental_update_is_checked_too(victim: Victim, http: aiohttp.ClientSession,
                                                 value: Any) -> None:
    reply = await post_update(victim, http, overwrite(victim, value), ev=[raw_event(2)])
    assert (reply.status, reply.code()) == (400, "invalid_value")
    assert reply.detail()["where"].startswith("state:")
    await victim.assert_survived()


async def test_an_update_rewriting_known_ids_is_not_applied(victim: Victim,
                                                            http: aiohttp.ClientSession) -> None:
    """A forged (or corrupted) history: other content under ids the server has, running past
    its clock. Yrs would keep the straddling slice under the update's own root while its
    encoding places it under the server's item: server and devices would disagree for ever
    (found by the envelope fuzz in test_real_faults). Not applied; the device recovers."""
    first = yjs.update(yjs.client(31337, 0, yjs.item(yjs.any_content(1), root="state",
                                                     key="x")))
    assert (await post_update(victim, http, first)).status == 200
    forged = yjs.update(yjs.client(31337, 0, yjs.item(yjs.any_content(7, 8, 9), root="other",
                                                      key="y")))
    reply = await post_update(victim, http, forged, ev=[raw_event(2)])
    assert reply.status == 200
    assert parse_state_vector(decode_response(reply.body).docs[0].sv)[31337] == 1
    state = await victim.admin.state("d1")
    assert state == {"state": {"a": 1, "x": 1}}
    await victim.dev.sync()
    assert crdt.to_json(victim.dev.doc) == state


async def test_valid_incremental_update_from_another_client_applies(
        victim: Victim, http: aiohttp.ClientSession) -> None:
    reply = await post_update(victim, http, overwrite(victim, 41))
    assert reply.status == 200
    assert await victim.admin.state("d1") == {"state": {"a": 41}}
    await victim.dev.sync()
    assert victim.dev.state["a"] == 41


async def test_update_building_on_missing_items_is_not_applied(
        victim: Victim, http: aiohttp.ClientSession) -> None:
    """It would stay pending, unchecked, and integrate later: it is not applied, and the
    answer's state vector shows the sender what the server has (it resends from there)."""
    orphan = yjs.update(yjs.client(31337, 0, yjs.item(yjs.any_content("x"),
                                                      origin=(555, 7))))
    reply = await post_update(victim, http, orphan, ev=[raw_event(2)])
    assert reply.status == 200
    answer = decode_response(reply.body)
    assert parse_state_vector(answer.docs[0].sv).get(31337, 0) == 0
    assert answer.acked == 2  # the rest of the request is committed as usual
    assert await victim.admin.state("d1") == {"state": {"a": 1}}


async def test_an_update_building_on_a_cloud_write_made_since_the_last_answer_applies(
        victim: Victim, http: aiohttp.ClientSession, server: Server) -> None:
    """The state vector answered to a device is kept for the next sync's check of what an
    update builds on, until the document changes: a cloud write made in between counts, so
    an update that builds on it is applied (with a kept vector from before the write, the
    server would take it for one that builds on a missing item and not apply it)."""
    await victim.dev.sync()  # its answer's state vector is kept
    await victim.admin.patch_state("d1", {"a": 2})
    key = doc_key("d1", STATE_DOC)
    async with server.services.sync.docs.lock("d1"):
        clocks = parse_state_vector((await server.services.sync.docs.get(key)).doc.get_state())
    cloud = next(client for client in clocks if client != victim.dev.doc.client_id)
    written = (cloud, clocks[cloud] - 1)  # the cloud's item for "a"
    update = yjs.update(yjs.client(31337, 0, yjs.item(yjs.any_content(3), origin=written)),
                        deletes=[(cloud, [(written[1], 1)])])
    reply = await post_update(victim, http, update, ev=[raw_event(2)])
    assert reply.status == 200
    assert parse_state_vector(decode_response(reply.body).docs[0].sv)[31337] == 1
    assert await victim.admin.state("d1") == {"state": {"a": 3}}


@pytest.mark.parametrize(("update", "where"), [
    pytest.param(one(yjs.any_content(1, 2), root="list"), "state:list", id="root-array"),
    pytest.param(one(yjs.string_content("hi"), root="text"), "state:text", id="root-text"),
    pytest.param(yjs.set_key(9, 0, "x", 1, root=""), "state:", id="root-named-empty"),
    pytest.param(yjs.set_key(9, 0, "x", yjs.Undefined()), "state:state.x", id="undefined"),
    pytest.param(yjs.set_key(9, 0, "x", yjs.BigInt(2**40)), "state:state.x", id="bigint"),
    pytest.param(nested_maps(33), "state:state.m", id="y-maps-nested-33"),
])
async def test_structures_a_state_document_cannot_hold(victim: Victim,
                                                       http: aiohttp.ClientSession,
                                                       update: bytes, where: str) -> None:
    reply = await post_update(victim, http, update, ev=[raw_event(2)])
    assert (reply.status, reply.code()) == (400, "invalid_value")
    assert reply.detail()["where"].startswith(where)
    await victim.assert_survived()


async def test_nesting_across_updates_is_checked_in_the_real_document(
        victim: Victim, http: aiohttp.ClientSession) -> None:
    """32 levels of Y.Map in one update are fine; one more level inside them, sent later,
    is only visible in the real document: refused there, nothing kept."""
    reply = await post_update(victim, http, nested_maps(32))
    assert reply.status == 200
    deeper = yjs.update(yjs.client(10, 0, yjs.item(yjs.any_content([1]), parent=(9, 31),
                                                   key="leaf")))
    reply = await post_update(victim, http, deeper, ev=[raw_event(2)])
    assert (reply.status, reply.code()) == (400, "invalid_value")
    state = await victim.admin.state("d1")
    inner = state["state"]["m"]
    for _ in range(31):
        inner = inner["m"]
    assert inner == {}
    assert (await victim.admin.device("d1"))["last_seq"] == 1


async def assert_serves(victim: Victim) -> None:
    """The real device still syncs state and events (whatever else the state holds)."""
    victim.dev.state["b"] = 2
    assert await victim.dev.emit("t", {"n": 2}) == 2
    report = await victim.dev.sync()
    assert report.events_acked == 1 and victim.dev.pending_events == 0
    assert (await victim.admin.state("d1"))["state"]["b"] == 2


class JsLikeClient:
    """A device that writes nested shared types the way a Yjs client naturally does."""

    def __init__(self, victim: Victim, http: aiohttp.ClientSession) -> None:
        self.victim, self.http = victim, http
        self.doc: Doc[Any] = Doc(client_id=4242)
        self.server_sv = b"\x00"

    async def sync(self) -> None:
        update = self.doc.get_update(self.server_sv)
        reply = await self.victim.post(self.http, raw_request(docs=[raw_doc(
            update, sv=self.doc.get_state())]))
        assert reply.status == 200, reply.body
        answer = decode_response(reply.body).docs[0]
        if answer.update:
            self.doc.apply_update(answer.update)
        self.server_sv = answer.sv


async def test_nested_shared_types_work_end_to_end(victim: Victim, http: aiohttp.ClientSession,
                                                   make_device: DeviceFactory) -> None:
    """Y.Map, Y.Array and Y.Text inside the state map: GET state, the feed, the projection
    and the reference device all see JSON; edits inside them are changes of their key."""
    js = JsLikeClient(victim, http)
    await js.sync()
    state = js.doc.get("state", type=Map)
    state["cfg"] = Map({"mode": "eco", "limits": Array([1, 2])})
    state["note"] = Text("hi")
    await js.sync()
    expected = {"a": 1, "cfg": {"mode": "eco", "limits": [1, 2]}, "note": "hi"}
    assert (await victim.admin.state("d1"))["state"] == expected
    _, after = await victim.admin.feed(limit=1000)

    state["cfg"]["mode"] = "boost"  # type: ignore[index]
    state["cfg"]["limits"].append(3)  # type: ignore[index]
    state["note"].insert(2, " there")  # type: ignore[union-attr]
    await js.sync()
    expected = {"a": 1, "cfg": {"mode": "boost", "limits": [1, 2, 3]}, "note": "hi there"}
    assert (await victim.admin.state("d1"))["state"] == expected
    items, _ = await victim.admin.feed(after)
    changes = [i for i in items if i["kind"] == "state"]
    assert changes and changes[-1]["changes"] == {
        "state": {"cfg": expected["cfg"], "note": "hi there"}}
    projected = {r["key"]: r["value"] for r in await victim.admin.projection("d1")
                 if r["map"] == "state"}
    assert projected == expected
    await victim.dev.sync()
    assert victim.dev.state["cfg"] == expected["cfg"]
    assert victim.dev.state["note"] == "hi there"
    await assert_serves(victim)


# --- seeded fuzz through the server ----------------------------------------------------------

TYPED_4XX = {"corrupt_update", "invalid_value", "malformed_request"}


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "float", "str", "bool", "none"] + (["list", "dict"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-(2**40), 2**40)
    if kind == "float":
        return rng.uniform(-1e6, 1e6)
    if kind == "str":
        return "".join(rng.choice("ab😀é\u0000") for _ in range(rng.randint(0, 5)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}


def random_edit(rng: random.Random, doc: Doc[Any]) -> None:
    """A random edit of ``doc``, a device's copy of its state document."""
    state = doc.get("state", type=Map)
    op = rng.randrange(5)
    key = f"k{rng.randrange(6)}"
    if op == 0:
        state[key] = random_value(rng)
    elif op == 1 and key in state:
        del state[key]
    elif op == 2:
        state[key] = Map({"x": random_value(rng), "t": Text("ab")})
    elif op == 3:
        state[key] = Array([random_value(rng), random_value(rng)])
    else:
        nested = [state[k] for k in state if isinstance(state[k], (Map, Array, Text))]
        if nested:
            target = rng.choice(nested)
            if isinstance(target, Map):
                target[f"i{rng.randrange(3)}"] = random_value(rng)
            elif isinstance(target, Array):
                target.append(random_value(rng))
            else:
                target += "z😀"


HOSTILE = [deep(50), deep(5_000), b"\x80\x80\x80\x80\x10", nested_maps(40),
           *(p.values[0] for p in INVALID_UPDATES), *(p.values[0] for p in CORRUPT_UPDATES)]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not out:
            break
        pos = rng.randrange(len(out))
        choice = rng.random()
        if choice < 0.4:
            out[pos] = rng.randrange(256)
        elif choice < 0.6:
            del out[pos]
        elif choice < 0.8:
            out.insert(pos, rng.choice([0x00, 0x7F, 0x80, 0xFF, rng.randrange(256)]))
        else:
            del out[pos:]
    return bytes(out)


async def test_fuzzed_updates_get_200_or_a_typed_400(victim: Victim, http: aiohttp.ClientSession,
                                                     server: Server, admin: AdminClient) -> None:
    """Valid, truncated, mutated and hostile updates (every content kind, deep, huge counts,
    nested types), seeded: every answer is 200 or a typed 400, never a 5xx; GET state stays
    200 with JSON data; the server keeps serving the real device."""
    rng = random.Random(11)
    mirror: Doc[Any] = Doc(client_id=777)
    server_sv = b"\x00"
    seen: dict[str, int] = {}
    for round_ in range(400):
        random_edit(rng, mirror)
        valid = mirror.get_update(server_sv)
        pick = rng.random()
        if pick < 0.35:
            update = valid
        elif pick < 0.55:
            update = valid[: rng.randrange(len(valid) + 1)]
        elif pick < 0.85:
            update = mutate(rng, valid if rng.random() < 0.7 else rng.choice(HOSTILE))
        else:
            update = rng.choice(HOSTILE)
        body = raw_request(docs=[{"d": "state", "g": 0, "sv": mirror.get_state(),
                                  "u": update, "c": zlib.crc32(update)}] if update else [])
        reply = await victim.post(http, body)
        if reply.status == 200:
            seen["200"] = seen.get("200", 0) + 1
            answer = decode_response(reply.body).docs
            if answer and answer[0].update:
                mirror.apply_update(answer[0].update)
            server_sv = answer[0].sv if answer else server_sv
        else:
            assert reply.status == 400, (round_, reply.status, reply.body)
            assert reply.code() in TYPED_4XX, (round_, reply.code())
            seen[reply.code()] = seen.get(reply.code(), 0) + 1
            if update is valid:
                raise AssertionError(f"round {round_}: a valid update was refused")
        if round_ % 25 == 0:  # readable, as JSON data within the limits
            crdt.check_changes(await admin.state("d1"), name="state")
    # Both outcomes happened plenty: the fuzz exercised acceptance and every refusal path.
    assert seen.get("200", 0) > 100 and seen.get("invalid_value", 0) > 10
    assert seen.get("corrupt_update", 0) > 10
    state = await admin.state("d1")
    crdt.check_changes(state, name="state")
    assert state["state"]["a"] == 1  # the victim's acknowledged key was never touched
    await assert_serves(victim)


def nest(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(("body", "where"), [
    pytest.param({"a": nest(40)},
                 "event 2 body.a[0]", id="depth"),
    pytest.param({"k" * 257: 1}, "event 2 body", id="key-length"),
    pytest.param({"a": {"": 1}}, "event 2 body.a", id="empty-key"),
])
async def test_invalid_value_always_says_where(victim: Victim, http: aiohttp.ClientSession,
                                               body: Any, where: str) -> None:
    """protocol.md 3.2 promises ``detail.where``; depth and key errors had none."""
    reply = await victim.post(http, raw_request(ev=[raw_event(2, body)]))
    assert (reply.status, reply.code()) == (400, "invalid_value")
    assert reply.detail()["where"].startswith(where)
    await victim.assert_survived()


async def test_a_large_valid_update_is_read_off_the_loop_and_applied(
        victim: Victim, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from crdtsync_server import sync

    threads: list[int] = []
    real = asyncio.to_thread

    async def counting(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        threads.append(len(args[0]))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(sync.asyncio, "to_thread", counting)
    doc: Doc[Any] = Doc(client_id=5150)
    big = {f"k{i}": {"v": [i, i / 2, f"reading {i}"]} for i in range(3000)}
    doc.get("state", type=Map).update(big)  # type: ignore[attr-defined]
    update = doc.get_update()
    assert len(update) > sync.OFF_LOOP_BYTES
    reply = await post_update(victim, http, update)
    assert reply.status == 200
    assert threads == [len(update)]
    state = (await victim.admin.state("d1"))["state"]
    assert state["k2999"] == {"v": [2999, 1499.5, "reading 2999"]} and len(state) == 3001


def test_check_event_body_refuses_msgpack_extension_records() -> None:
    """``msgpack.ExtType`` is a named tuple: it is not an array of two values."""
    import msgpack

    from crdtsync.values import check_event_body

    with pytest.raises(InvalidValue) as caught:
        check_event_body({"x": [1, msgpack.ExtType(5, b"")]})
    assert caught.value.detail["where"] == "event body.x[1]"


async def test_a_document_poisoned_by_an_older_version_stays_readable_and_repairable(
        victim: Victim, server: Server) -> None:
    """Before the reader, NaN and bytes could be stored (incremental updates were not
    checked); then GET state answered 500 for ever and PATCH answered 500 "nothing was
    committed" although it had committed. The JSON view shows such values as null and
    base64 text, and a PATCH deleting the key repairs the document."""
    from crdtsync_server.store import DocWrite, SyncWrite

    legacy: Doc[Any] = Doc(client_id=31337)
    legacy.apply_update(victim.dev.doc.get_update())
    poisoned = legacy.get("state", type=Map)
    poisoned["nan"] = math.nan
    poisoned["bytes"] = b"\x00\x01"
    await server.services.store.commit(SyncWrite(
        device=None, time=1, docs=[DocWrite("d1/state", legacy.get_update(), 0)]))
    server.services.docs.evict("d1/state")  # as after a restart
    assert await victim.admin.state("d1") == {"state": {"a": 1, "nan": None, "bytes": "AAE="}}
    assert await victim.admin.patch_state("d1", {"nan": None, "bytes": None}) == {"a": 1}
    assert await victim.admin.state("d1") == {"state": {"a": 1}}
    await victim.assert_serving()
