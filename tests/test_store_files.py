"""The :class:`FileStore` contract: files by owner, direction and name, and uploads in
progress. Runs against every backend of ``tests/store_backends.py`` (the ``store`` fixture).

An upload is invisible until :meth:`finish_upload` turns it into a file, in one transaction
with exactly one ``file`` feed item; a quota refusal writes nothing; a resumed upload (same
device, name and SHA-256) is the stored one."""

from __future__ import annotations

import pytest

from crdtsync.errors import NotFound, QuotaExceeded
from crdtsync_server.store import FileRecord, Store, UploadRecord
from crdtsync_server.store.feed import FeedFilter
from crdtsync_server.store.files import DOWN, UP

from .store_backends import add_device

SHA_A = "a" * 64
SHA_B = "b" * 64


def upload(upload_id: str = "u1", name: str = "cam.jpg", sha256: str = SHA_A, size: int = 100,
           device: str = "dev-1") -> UploadRecord:
    return UploadRecord(upload_id, device, name, sha256, size, {"k": [1, "x"]}, 10)


async def test_upload_is_invisible_until_finished(store: Store) -> None:
    await add_device(store)
    stored, replaced = await store.begin_upload(upload(), quota=None)
    assert stored == upload() and replaced == []
    assert await store.get_upload("u1") == upload()
    assert await store.list_files("d:dev-1") == []
    assert await store.read_feed(limit=100) == []
    record, old = await store.finish_upload("u1", 50)
    assert old is None
    assert record == FileRecord("d:dev-1", UP, "cam.jpg", SHA_A, 100, {"k": [1, "x"]}, 50)
    assert await store.get_upload("u1") is None
    assert await store.list_files("d:dev-1") == [record]
    assert await store.get_file("d:dev-1", UP, "cam.jpg") == record
    items = await store.read_feed(limit=100, where=FeedFilter(kind="file"))
    assert len(items) == 1 and items[0].device == "dev-1" and items[0].key.startswith("fi:")
    assert items[0].body == {"name": "cam.jpg", "size": 100, "sha256": SHA_A,
                             "meta": {"k": [1, "x"]}, "url": "/v1/devices/dev-1/files/cam.jpg"}
    with pytest.raises(NotFound):
        await store.finish_upload("u1", 60)
    assert len(await store.read_feed(limit=100)) == 1


async def test_resume_replace_and_drop(store: Store) -> None:
    await add_device(store)
    await store.begin_upload(upload(), quota=None)
    again, replaced = await store.begin_upload(upload("u2"), quota=None)
    assert again.id == "u1" and replaced == []  # same name and digest: resumed
    other, replaced = await store.begin_upload(upload("u3", sha256=SHA_B), quota=None)
    assert other.id == "u3" and replaced == ["u1"]
    assert await store.get_upload("u1") is None
    assert await store.drop_upload("u3") is True
    assert await store.drop_upload("u3") is False
    with pytest.raises(NotFound):
        await store.begin_upload(upload(device="nobody"), quota=None)


async def test_quota_refuses_with_nothing_written(store: Store) -> None:
    await add_device(store)
    await store.begin_upload(upload("u1", "a.bin", size=60), quota=100)
    await store.finish_upload("u1", 5)
    await store.begin_upload(upload("u2", "b.bin", SHA_B, size=30), quota=100)
    with pytest.raises(QuotaExceeded) as caught:
        await store.begin_upload(upload("u3", "c.bin", "c" * 64, size=11), quota=100)
    assert caught.value.detail == {"quota": 100, "used": 90, "size": 11}
    assert await store.get_upload("u3") is None
    # replacing a.bin does not count the old a.bin
    stored, _ = await store.begin_upload(upload("u4", "a.bin", "d" * 64, size=70), quota=100)
    assert stored.id == "u4"


async def test_replace_file_returns_old_digest(store: Store) -> None:
    await add_device(store)
    await store.begin_upload(upload("u1"), quota=None)
    await store.finish_upload("u1", 5)
    await store.begin_upload(upload("u2", sha256=SHA_B), quota=None)
    record, old = await store.finish_upload("u2", 6)
    assert old == SHA_A and record.sha256 == SHA_B
    assert await store.digests_in_use([SHA_A, SHA_B]) == {SHA_B}
    assert len(await store.read_feed(limit=100, where=FeedFilter(kind="file"))) == 2


async def test_down_files_by_owner_and_digest(store: Store) -> None:
    await add_device(store)
    fleet_file = FileRecord("f:west", DOWN, "fw.bin", SHA_A, 9, None, 1)
    mine = FileRecord("d:dev-1", DOWN, "cfg.json", SHA_B, 3, {"v": 2}, 2)
    assert await store.put_file(fleet_file) is None
    assert await store.put_file(mine) is None
    assert await store.find_file(["d:dev-1", "f:west"], DOWN, SHA_A) == fleet_file
    assert await store.find_file(["d:dev-1"], DOWN, SHA_A) is None
    assert await store.find_file(["d:dev-1"], UP, SHA_B) is None
    assert await store.list_files("d:dev-1", DOWN) == [mine]
    assert await store.list_files("d:dev-1", UP) == []
    newer = FileRecord("f:west", DOWN, "fw.bin", SHA_B, 4, None, 3)
    assert await store.put_file(newer) == SHA_A
    assert await store.get_file("f:west", DOWN, "fw.bin") == newer
    assert await store.delete_file("f:west", DOWN, "fw.bin") == newer
    assert await store.delete_file("f:west", DOWN, "fw.bin") is None
    assert await store.read_feed(limit=100) == []  # only finished uploads enter the feed


async def test_list_pages_by_name(store: Store) -> None:
    await add_device(store)
    for name in ("c", "a", "b"):
        await store.put_file(FileRecord("d:dev-1", DOWN, name, SHA_A, 1, None, 1))
    assert [f.name for f in await store.list_files("d:dev-1")] == ["a", "b", "c"]
    assert [f.name for f in await store.list_files("d:dev-1", after="a", limit=1)] == ["b"]


async def test_purge(store: Store) -> None:
    await add_device(store)
    await store.begin_upload(upload("u1", "old.bin"), quota=None)
    await store.finish_upload("u1", 5)
    await store.begin_upload(upload("u2", "new.bin", SHA_B), quota=None)
    await store.finish_upload("u2", 50)
    await store.begin_upload(upload("u3", "stale.bin", "c" * 64), quota=None)  # created 10
    await store.put_file(FileRecord("d:dev-1", DOWN, "fw", "d" * 64, 1, None, 1))
    digests, uploads = await store.purge_files(before=20, uploads_before=20)
    assert digests == [SHA_A] and uploads == ["u3"]
    assert [f.name for f in await store.list_files("d:dev-1")] == ["fw", "new.bin"]
    assert await store.digests_in_use([SHA_A, SHA_B, "c" * 64, "d" * 64]) == {
        SHA_B, "d" * 64}
