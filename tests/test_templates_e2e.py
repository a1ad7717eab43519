"""Templates end to end: defined per fleet and topic in the cloud, delivered in the fleet
document, used by emit, decoded by the server to the same JSON for every reader."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgpack
import pytest

from crdtsync import AdminClient, InvalidValue
from crdtsync.errors import MalformedRequest
from crdtsync.protocol import DEFAULT_LIMITS, MEDIA_TYPE, SYNC_PATH
from crdtsync.templates import Template
from crdtsync_server import Server

from .conftest import DeviceFactory
from .test_templates import repeated_text_batch

READING = {"temp": "float32", "hum": "uint8", "voltage": "float32", "ts": "uint32",
           "motion": "bool"}


async def put_template(admin: AdminClient, fleet: str, topic: str,
                       definition: dict[str, Any]) -> dict[str, Any]:
    return await admin.request(  # type: ignore[no-any-return]
        "PUT", f"/v1/fleets/{fleet}/templates/{topic}", json=definition)


async def events(admin: AdminClient, device: str) -> list[dict[str, Any]]:
    return [e async for e in admin.iter_events(device=device)]


async def fleet_device(make_device: DeviceFactory, admin: AdminClient, device_id: str,
                       fleet: str = "sensors") -> Any:
    if not any(f["id"] == fleet for f in (await admin.list_fleets())["fleets"]):
        await admin.add_fleet(fleet)
    dev = await make_device(device_id)
    await admin.set_fleet(device_id, fleet)
    await dev.sync()
    return dev


async def test_templated_events_are_smaller_and_decode_to_the_same_json(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    plain = await fleet_device(make_device, admin, "plain", fleet="untemplated")
    dev = await fleet_device(make_device, admin, "d1")
    entry = await put_template(admin, "sensors", "readings", READING)
    assert entry["hash"] == Template(READING).hash.hex()
    await dev.sync()  # the template arrives in the fleet document
    readings = [{"temp": 21.5 + i / 4, "hum": 40 + i % 3, "voltage": 3.75,
                 "ts": 1764000000 + 60 * i, "motion": i % 5 == 0} for i in range(50)]
    for reading in readings:
        await dev.emit("readings", reading)
        await plain.emit("readings", reading)
    templated_report = await dev.sync()
    plain_report = await plain.sync()
    assert templated_report.events_acked == plain_report.events_acked == 50
    assert templated_report.bytes_up * 3 < plain_report.bytes_up
    stored = [e["body"] for e in await events(admin, "d1")]
    assert stored == readings  # these values are exact in float32
    assert [e["body"] for e in await events(admin, "plain")] == readings


async def test_a_body_that_does_not_fit_fails_at_emit(make_device: DeviceFactory,
                                                      admin: AdminClient) -> None:
    dev = await fleet_device(make_device, admin, "d1")
    await put_template(admin, "sensors", "readings", READING)
    await dev.sync()
    good = {"temp": 1.0, "hum": 1, "voltage": 1.0, "ts": 1, "motion": False}
    for bad in ({**good, "hum": 300}, {k: v for k, v in good.items() if k != "ts"},
                {**good, "extra": 1}, {**good, "motion": "yes"}):
        with pytest.raises(InvalidValue):
            await dev.emit("readings", bad)
    assert dev.pending_events == 0
    await dev.emit("other-topic", {"anything": [1, 2]})  # untemplated topics still work
    await dev.sync()
    assert [e["topic"] for e in await events(admin, "d1")] == ["other-topic"]


async def test_template_changed_while_events_are_queued(make_device: DeviceFactory,
                                                        admin: AdminClient) -> None:
    dev = await fleet_device(make_device, admin, "d1")
    await put_template(admin, "sensors", "t", {"a": "uint8"})
    await dev.sync()
    await dev.emit("t", {"a": 7})  # queued under version 1
    await put_template(admin, "sensors", "t", {"a": "uint16", "b": "bool"})
    await dev.sync()  # carries the v1 event, fetches v2
    await dev.emit("t", {"a": 700, "b": True})
    await dev.sync()
    assert [e["body"] for e in await events(admin, "d1")] == [{"a": 7}, {"a": 700, "b": True}]


async def test_device_without_the_template_sends_plain_events(make_device: DeviceFactory,
                                                              admin: AdminClient) -> None:
    dev = await fleet_device(make_device, admin, "d1")
    await dev.emit("readings", {"temp": 1.5})  # before the template reached the device
    await put_template(admin, "sensors", "readings", READING)
    await dev.sync()
    assert [e["body"] for e in await events(admin, "d1")] == [{"temp": 1.5}]


async def test_bad_templates_and_unknown_fleets_are_typed_errors(admin: AdminClient) -> None:
    from crdtsync.errors import NotFound

    await admin.add_fleet("f")
    with pytest.raises(InvalidValue):
        await put_template(admin, "f", "t", {"a": "uint9"})
    with pytest.raises(InvalidValue):  # a lone surrogate in a field name: was a 500
        await put_template(admin, "f", "t", {"a\ud800": "uint8"})
    with pytest.raises(MalformedRequest):
        await put_template(admin, "f", "bad topic", {"a": "uint8"})
    with pytest.raises(NotFound):
        await put_template(admin, "nope", "t", {"a": "uint8"})


async def test_bytes_fields_reach_readers_as_base64(make_device: DeviceFactory,
                                                    admin: AdminClient) -> None:
    import base64

    dev = await fleet_device(make_device, admin, "d1")
    await put_template(admin, "sensors", "frames", {"id": "uint16", "raw": "bytes:8"})
    await dev.sync()
    await dev.emit("frames", {"id": 7, "raw": b"\x00\x01\xfe"})
    await dev.emit("blobs", {"raw": b"\xff"})  # untemplated bytes too
    with pytest.raises(InvalidValue):
        await dev.emit("frames", {"id": 8, "raw": b"x" * 9})  # over bytes:8
    await dev.sync()
    bodies = [e["body"] for e in await events(admin, "d1")]
    assert bodies == [{"id": 7, "raw": base64.b64encode(b"\x00\x01\xfe").decode()},
                      {"raw": base64.b64encode(b"\xff").decode()}]


# --- hostile and edge input (issue 11: findings 6 and 11) ----------------------------------


async def post_sync(server: Server, token: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    """POST a hand-made sync request; returns the status and the decoded answer."""
    body = msgpack.packb({"v": 1, "t": "sync", "dev": "d1", **fields}, use_bin_type=True)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": MEDIA_TYPE}
    async with aiohttp.ClientSession() as http, http.post(
            server.url + SYNC_PATH, data=body, headers=headers) as resp:
        return resp.status, msgpack.unpackb(await resp.read())


async def templated_device(make_device: DeviceFactory, admin: AdminClient,
                           definition: dict[str, Any]) -> tuple[Any, str, Template]:
    """Device d1 in fleet "sensors" whose topic "t" has ``definition``; its token."""
    dev = await fleet_device(make_device, admin, "d1")
    await put_template(admin, "sensors", "t", definition)
    await dev.sync()
    return dev, make_device.tokens["d1"], Template(definition)  # type: ignore[attr-defined]


async def assert_nothing_stored_and_serving(dev: Any, admin: AdminClient) -> None:
    assert await events(admin, "d1") == []
    assert (await admin.device("d1"))["last_seq"] == 0
    await dev.emit("t", {"s0": "ok"})
    assert (await dev.sync()).events_acked == 1
    assert [e["body"] for e in await events(admin, "d1")] == [{"s0": "ok"}]


async def test_a_small_batch_of_huge_events_is_refused(make_device: DeviceFactory,
                                                       admin: AdminClient,
                                                       server: Server) -> None:
    """Finding 6: 66 KB of batch stored 1,000 events of 65 KB (about 1,000x amplification).
    The decoded size of a request is capped (max_decoded_bytes) before anything is built."""
    dev, token, template = await templated_device(make_device, admin, {"s0": "string"})
    batch = repeated_text_batch(template, 1000, 65_000)
    status, answer = await post_sync(server, token, tev=[["t", batch]])
    assert (status, answer["code"]) == (413, "body_too_large")
    assert answer["detail"] == {"max_decoded_bytes": DEFAULT_LIMITS.max_decoded_bytes}
    await assert_nothing_stored_and_serving(dev, admin)


async def test_plain_events_count_towards_the_decoded_cap(make_device: DeviceFactory,
                                                          admin: AdminClient,
                                                          server: Server) -> None:
    dev, token, template = await templated_device(make_device, admin, {"s0": "string"})
    per_event = template.body_size({"s0": "x" * 65_000})
    fits = DEFAULT_LIMITS.max_decoded_bytes // per_event  # templated events alone fit
    plain = [[1, "other", 0, msgpack.packb("y" * 65_000)]]  # and push them over together
    status, answer = await post_sync(server, token, ev=plain, tev=[
        ["t", repeated_text_batch(template, fits, 65_000, first_seq=2)]])
    assert (status, answer["code"]) == (413, "body_too_large")
    await assert_nothing_stored_and_serving(dev, admin)


async def test_one_templated_event_over_the_body_limit_is_refused(make_device: DeviceFactory,
                                                                 admin: AdminClient,
                                                                 server: Server) -> None:
    """A batch of one event with two 40,000-byte strings: 80 KB decoded, over the 64 KiB
    every plain event is held to."""
    dev, token, template = await templated_device(make_device, admin,
                                                  {"s0": "string", "s1": "string"})
    status, answer = await post_sync(server, token,
                                     tev=[["t", repeated_text_batch(template, 1, 40_000)]])
    assert (status, answer["code"]) == (400, "invalid_value")
    assert answer["detail"] == {"seq": 1, "max_event_body": DEFAULT_LIMITS.max_event_body}
    await put_template(admin, "sensors", "t", {"s0": "string"})
    await dev.sync()
    await assert_nothing_stored_and_serving(dev, admin)


async def test_device_refuses_a_body_that_decodes_over_the_limit(make_device: DeviceFactory,
                                                                 admin: AdminClient) -> None:
    """57 KB as sent, 66 KB once the cloud decodes it (each integer in a float field becomes
    a 9-byte float 64): refused at emit, not by the cloud for ever after."""
    dev, _, template = await templated_device(make_device, admin,
                                              {"s": "string", "v": "float64[1000]"})
    body = {"s": "x" * 57_000, "v": [0] * 1000}
    assert len(msgpack.packb(body)) < DEFAULT_LIMITS.max_event_body < template.body_size(body)
    with pytest.raises(InvalidValue, match="decodes to"):
        await dev.emit("t", body)
    assert dev.pending_events == 0
    await dev.emit("t", {**body, "s": "x" * 50_000})
    assert (await dev.sync()).events_acked == 1


async def test_a_plain_event_on_a_templated_topic_is_stored_as_sent(
        make_device: DeviceFactory, admin: AdminClient, server: Server) -> None:
    """The escape hatch (docs/protocol.md 15b): templates are optional for a client, and an
    event queued before its topic had a template must not wedge the device's outbox, so `ev`
    is held to the rules of plain events only, whatever the topic."""
    _, token, _ = await templated_device(make_device, admin, READING)
    status, answer = await post_sync(server, token, ev=[
        [1, "t", 5, msgpack.packb({"temp": "warm", "extra": [1, 2]})]])
    assert (status, answer["ack"]) == (200, 1)
    assert [e["body"] for e in await events(admin, "d1")] == [{"temp": "warm", "extra": [1, 2]}]


@pytest.mark.parametrize("name", ["flaot32", "number", "double", "text"])
async def test_template_typos_are_refused_with_the_valid_types(admin: AdminClient,
                                                               name: str) -> None:
    """Finding 11: these became string:65535 fields, and devices then refused readings."""
    await admin.add_fleet("f")
    with pytest.raises(InvalidValue) as info:
        await put_template(admin, "f", "t", {"temp": name, "hum": "uint8"})
    assert info.value.status == 400
    assert info.value.detail["field"] == "temp" and info.value.detail["type"] == name
    assert "float32" in info.value.detail["valid"] and "float32" in info.value.message
    assert await admin.request("GET", "/v1/fleets/f/templates") == {}


async def test_a_template_no_event_can_fit_is_refused(admin: AdminClient) -> None:
    await admin.add_fleet("f")
    huge = {f"{i:0>250}": "bool" for i in range(300)}  # 300 keys of 250 chars: 76 KB a body
    with pytest.raises(InvalidValue) as info:
        await put_template(admin, "f", "t", huge)
    assert info.value.detail == {"min_body_size": Template(huge).min_body_size,
                                 "max_event_body": DEFAULT_LIMITS.max_event_body}


async def test_device_sends_fewer_events_when_they_decode_over_the_cap(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    """500 queued events of 1 KB that decode to 9 KB each (4.5 MB, over max_decoded_bytes):
    the reference device halves its batch on 413 body_too_large and delivers them all."""
    dev, _, template = await templated_device(make_device, admin, {"v": "float64[1000]"})
    body = {"v": [0] * 1000}
    count = 500
    assert count * template.body_size(body) > DEFAULT_LIMITS.max_decoded_bytes
    await dev.emit_many([("t", body)] * count)
    report = await dev.sync()
    assert report.events_acked == count and dev.pending_events == 0
    assert dev.max_events_per_sync < count  # it did have to shrink
    assert len(await events(admin, "d1")) == count
