"""Templates end to end: defined per fleet and topic in the cloud, delivered in the fleet
document, used by emit, decoded by the server to the same JSON for every reader."""

from __future__ import annotations

from typing import Any

import pytest

from crdtsync import AdminClient, InvalidValue
from crdtsync.errors import MalformedRequest
from crdtsync.templates import Template

from .conftest import DeviceFactory

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
