"""The :class:`DeviceStore` contract: devices, their tokens, fleets and ``last_sync``.

Runs against every backend of ``tests/store_backends.py`` (the ``store`` fixture). A test whose
``store`` is annotated with the role needs nothing else of a backend; one annotated
:class:`Store` also needs another role to set up what it checks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from crdtsync.errors import AlreadyExists, NotFound
from crdtsync_server.store import DeviceRecord, DeviceStore, FleetRecord, Store, SyncWrite

from .store_backends import add_device, evs, queue

# --- devices -----------------------------------------------------------------------------


async def test_device_roundtrip(store: DeviceStore) -> None:
    record = DeviceRecord(
        id="dev-1", token_hash="h", created=10, last_sync=20, last_seq=5, events_lost=1,
        meta={"site": "north", "tags": ["a", "b"], "n": 3}, down_seq=7, down_done=4,
    )
    await store.add_device(record)
    assert await store.get_device("dev-1") == record
    assert await store.get_device("dev-2") is None


async def test_duplicate_device_is_refused(store: DeviceStore) -> None:
    await add_device(store)
    with pytest.raises(AlreadyExists):
        await store.add_device(DeviceRecord(id="dev-1", token_hash="other", created=99))
    device = await store.get_device("dev-1")
    assert device is not None and (device.token_hash, device.created) == ("hash-dev-1", 1)


async def test_list_devices_pages_by_id(store: DeviceStore) -> None:
    for name in ["dev-c", "dev-a", "dev-e", "dev-b", "dev-d"]:
        await add_device(store, name)
    first = await store.list_devices(limit=2)
    assert [d.id for d in first] == ["dev-a", "dev-b"]
    second = await store.list_devices(after=first[-1].id, limit=2)
    assert [d.id for d in second] == ["dev-c", "dev-d"]
    assert [d.id for d in await store.list_devices(after="dev-d")] == ["dev-e"]
    assert await store.list_devices(after="dev-e") == []
    assert await store.list_devices(limit=0) == []
    assert [d.id for d in await store.list_devices()] == [f"dev-{c}" for c in "abcde"]


async def test_device_by_token_finds_the_device_of_a_hash(store: Store) -> None:
    one = await add_device(store, "dev-1", meta={"k": 1})
    await add_device(store, "dev-2")
    assert await store.device_by_token("hash-dev-1") == one
    found = await store.device_by_token("hash-dev-2")
    assert found is not None and found.id == "dev-2"
    assert await store.device_by_token("hash-dev-3") is None
    assert await store.device_by_token("") is None
    # Hashes of random tokens never collide; shared ones (tests, benches) find the lowest id.
    for device in ("dev-9", "dev-0"):
        await store.add_device(DeviceRecord(device, "shared", created=1))
    assert (await store.device_by_token("shared")).id == "dev-0"  # type: ignore[union-attr]
    await store.delete_device("dev-0", [])
    assert (await store.device_by_token("shared")).id == "dev-9"  # type: ignore[union-attr]
    await store.update_device("dev-9", token_hash="own")
    assert await store.device_by_token("shared") is None


async def test_update_device_replaces_the_token_hash_at_once(store: DeviceStore) -> None:
    record = await add_device(store, last_seq=4, meta={"site": "north"})
    rotated = await store.update_device("dev-1", token_hash="new-hash")
    assert rotated == dataclasses.replace(record, token_hash="new-hash")
    assert await store.get_device("dev-1") == rotated
    assert await store.device_by_token("hash-dev-1") is None  # the old hash finds nothing
    assert await store.device_by_token("new-hash") == rotated


async def test_update_device_disables_and_enables(store: DeviceStore) -> None:
    record = await add_device(store)
    assert not record.disabled
    disabled = await store.update_device("dev-1", disabled=True)
    assert disabled == dataclasses.replace(record, disabled=True)
    assert await store.device_by_token("hash-dev-1") == disabled  # still found: refused later
    assert await store.update_device("dev-1") == disabled  # nothing given: nothing changes
    assert await store.update_device("dev-1", disabled=False) == record
    assert await store.get_device("dev-1") == record


async def test_update_device_refuses_an_unknown_device(store: DeviceStore) -> None:
    with pytest.raises(NotFound) as info:
        await store.update_device("ghost", token_hash="h", disabled=True)
    assert info.value.detail == {"device": "ghost"}
    assert await store.device_by_token("h") is None


# --- fleets ------------------------------------------------------------------------------


async def add_fleet(store: DeviceStore, fleet_id: str = "north", **kw: Any) -> FleetRecord:
    record = FleetRecord(id=fleet_id, created=5, **kw)
    await store.add_fleet(record)
    return record


async def test_fleet_roundtrip(store: DeviceStore) -> None:
    record = await add_fleet(store, meta={"region": "eu", "tags": ["a"], "n": 2})
    assert await store.get_fleet("north") == record
    assert record.to_json() == {"id": "north", "created": 5,
                                "meta": {"region": "eu", "tags": ["a"], "n": 2}}
    assert await store.get_fleet("south") is None


async def test_fleet_meta_is_a_copy(store: DeviceStore) -> None:
    meta: dict[str, Any] = {"tags": ["a"]}
    await add_fleet(store, meta=meta)
    meta["tags"].append("b")
    fleet = await store.get_fleet("north")
    assert fleet is not None and fleet.meta == {"tags": ["a"]}


async def test_duplicate_fleet_is_refused(store: DeviceStore) -> None:
    await add_fleet(store, meta={"v": 1})
    with pytest.raises(AlreadyExists) as info:
        await store.add_fleet(FleetRecord(id="north", created=99, meta={"v": 2}))
    assert info.value.detail == {"fleet": "north"}
    assert await store.get_fleet("north") == FleetRecord("north", 5, {"v": 1})


async def test_list_fleets_pages_by_id(store: DeviceStore) -> None:
    for name in ["f-c", "f-a", "f-d", "f-b"]:
        await add_fleet(store, name)
    first = await store.list_fleets(limit=3)
    assert [f.id for f in first] == ["f-a", "f-b", "f-c"]
    assert [f.id for f in await store.list_fleets(after=first[-1].id)] == ["f-d"]
    assert await store.list_fleets(after="f-d") == []
    assert await store.list_fleets(limit=0) == []
    with pytest.raises(ValueError):
        await store.list_fleets(limit=-1)


async def test_new_device_has_no_fleet(store: DeviceStore) -> None:
    await add_device(store)
    device = await store.get_device("dev-1")
    assert device is not None and (device.fleet, device.fleet_gen) == (None, 0)


async def test_add_device_in_a_fleet(store: DeviceStore) -> None:
    await add_fleet(store)
    record = await add_device(store, fleet="north", fleet_gen=3)
    assert await store.get_device("dev-1") == record
    assert await store.devices_in_fleet("north") == [record]


async def test_add_device_in_unknown_fleet_is_refused(store: DeviceStore) -> None:
    with pytest.raises(NotFound) as info:
        await add_device(store, fleet="nowhere")
    assert info.value.detail == {"fleet": "nowhere"}
    assert await store.get_device("dev-1") is None


async def test_set_device_fleet_bumps_gen_on_change_only(store: DeviceStore) -> None:
    await add_fleet(store, "north")
    await add_fleet(store, "south")
    await add_device(store, meta={"k": "v"}, last_seq=4)
    steps = [("north", 1), ("north", 1), ("south", 2), (None, 3), (None, 3), ("north", 4)]
    for fleet, gen in steps:
        returned = await store.set_device_fleet("dev-1", fleet, now=100)
        assert (returned.fleet, returned.fleet_gen) == (fleet, gen)
        assert await store.get_device("dev-1") == returned
    assert (returned.meta, returned.last_seq, returned.token_hash) == ({"k": "v"}, 4,
                                                                       "hash-dev-1")


async def test_set_device_fleet_refuses_unknown_device_or_fleet(store: DeviceStore) -> None:
    await add_fleet(store)
    await add_device(store)
    await store.set_device_fleet("dev-1", "north", now=1)
    with pytest.raises(NotFound) as info:
        await store.set_device_fleet("dev-1", "nowhere", now=2)
    assert info.value.detail == {"fleet": "nowhere"}
    with pytest.raises(NotFound) as info:
        await store.set_device_fleet("ghost", "north", now=2)
    assert info.value.detail == {"device": "ghost"}
    with pytest.raises(NotFound):
        await store.set_device_fleet("ghost", None, now=2)
    device = await store.get_device("dev-1")
    assert device is not None and (device.fleet, device.fleet_gen) == ("north", 1)
    assert await store.get_device("ghost") is None


async def test_devices_in_fleet_pages_by_id(store: DeviceStore) -> None:
    await add_fleet(store, "north")
    await add_fleet(store, "south")
    for name in ["dev-c", "dev-a", "dev-e", "dev-b", "dev-d", "dev-x"]:
        await add_device(store, name)
    for name in ["dev-c", "dev-a", "dev-e", "dev-d"]:
        await store.set_device_fleet(name, "north", now=1)
    await store.set_device_fleet("dev-b", "south", now=1)
    first = await store.devices_in_fleet("north", limit=2)
    assert [d.id for d in first] == ["dev-a", "dev-c"]
    assert all((d.fleet, d.fleet_gen) == ("north", 1) for d in first)
    assert [d.id for d in await store.devices_in_fleet("north", after="dev-c")] == [
        "dev-d", "dev-e"]
    assert [d.id for d in await store.devices_in_fleet("south")] == ["dev-b"]
    assert await store.devices_in_fleet("north", limit=0) == []
    assert await store.devices_in_fleet("nowhere") == []
    await store.set_device_fleet("dev-c", None, now=2)
    assert [d.id for d in await store.devices_in_fleet("north")] == ["dev-a", "dev-d", "dev-e"]


async def test_sync_commit_keeps_the_fleet(store: Store) -> None:
    await add_fleet(store)
    await add_device(store)
    await store.set_device_fleet("dev-1", "north", now=1)
    await store.commit(SyncWrite("dev-1", time=10, events=evs(1, 2)))
    await queue(store, now=11)
    device = await store.get_device("dev-1")
    assert device is not None
    assert (device.fleet, device.fleet_gen, device.last_seq, device.down_seq) == (
        "north", 1, 2, 1)


async def test_touch_devices_moves_last_sync_forward_only(store: DeviceStore) -> None:
    await add_device(store, "dev-1")
    await add_device(store, "dev-2")
    await store.touch_devices({"dev-1": 100, "dev-2": 50, "nobody": 10})
    await store.touch_devices({"dev-1": 90})  # older: ignored
    one, two = await store.get_device("dev-1"), await store.get_device("dev-2")
    assert one is not None and one.last_sync == 100
    assert two is not None and two.last_sync == 50
    assert await store.get_device("nobody") is None
