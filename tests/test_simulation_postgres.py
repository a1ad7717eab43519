"""The simulation on PostgreSQL: three server instances, each with its own store (its own
pool, its own instance id, announcements over LISTEN/NOTIFY) on one fresh schema; every
fault, crashes of instances while proxied requests run included; every invariant holds; the
same seed makes the same run as on SQLite; planted bugs are caught (duplicate events in the
PostgreSQL commit, a recovery that interrupts too early or never)."""

from __future__ import annotations

from collections import Counter

import asyncpg
import pytest

from crdtsync.testing import FaultPlan, Simulation
from crdtsync_server.proxied import dispatch

from .services import require_postgres

SEEDS = range(10)


async def test_invariants_hold_on_postgres_with_three_instances() -> None:
    """10 seeds x 150 steps, every fault, three instances: every invariant holds, instances
    crashed (also while a proxied request ran, whose outcome is then ``interrupted`` by
    another instance once the dead one's heartbeat is ``instance_ttl`` old), and each run's
    schema is dropped at its end."""
    url = require_postgres()
    failed, faults, schemas = [], Counter[str](), []
    for seed in SEEDS:
        async with Simulation(devices=3, servers=3, seed=seed, faults=FaultPlan.everything(),
                              database=url) as sim:
            report = await sim.run(150)
            schemas.append(sim.database.schema)
        if not report.ok:
            failed.append(report.describe())
        assert report.syncs_ok > 0 and report.events_delivered > 0, report.describe()
        faults += report.faults
    assert not failed, "\n".join(failed)
    assert sum(n for f, n in faults.items() if f.startswith("crash_server")) >= 20, faults
    assert any(f.startswith("crash_server during proxied request") for f in faults), faults
    assert faults["wake_lost"] and faults["duplicate"] and faults["partition"], faults
    assert len(set(schemas)) == len(SEEDS)
    conn = await asyncpg.connect(url)
    try:
        left = await conn.fetchval("SELECT count(*) FROM information_schema.schemata"
                                   " WHERE schema_name = ANY($1::text[])", schemas)
    finally:
        await conn.close()
    assert left == 0


async def test_a_seed_makes_the_same_run_on_postgres_as_on_sqlite() -> None:
    """The schedule is a function of the seed alone, whatever the backend: the NOTIFY
    announcements that arrive when they like change no answer (the hub catches up with the
    log before answering, the document cache re-reads before serving). Except ``rebuilt``:
    on SQLite a forced rebuild may start from a cached copy one commit behind and lose
    (docs/testing.md, "On PostgreSQL")."""
    url = require_postgres()
    reports = []
    for database in ("sqlite", url):
        async with Simulation(devices=3, servers=3, seed=4, faults=FaultPlan.everything(),
                              database=database) as sim:
            reports.append(await sim.run(150))
    sqlite, postgres = reports
    assert sqlite.ok and postgres.ok, sqlite.describe() + "\n" + postgres.describe()
    del postgres.operations["rebuilt"], sqlite.operations["rebuilt"]
    assert postgres.operations == sqlite.operations
    assert postgres.faults == sqlite.faults
    assert (postgres.syncs_ok, postgres.syncs_failed, postgres.events_delivered,
            postgres.wakes_checked, postgres.woken) == (
        sqlite.syncs_ok, sqlite.syncs_failed, sqlite.events_delivered,
        sqlite.wakes_checked, sqlite.woken)


@pytest.mark.parametrize("planted", ["too_early", "never"])
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_planted_recovery_bug_is_caught(planted: str, backend: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A recovery that ignores ``instance_ttl`` (takes every other instance for gone) is
    caught by ``recovery``; one that never interrupts leaves a crashed instance's request
    ``running`` for ever, caught by ``requests`` and ``live``."""
    database = "sqlite" if backend == "sqlite" else require_postgres()
    recover = dispatch.ProxyRunner.recover

    async def too_early(self: dispatch.ProxyRunner, stale_ms: int = 0) -> int:
        return await recover(self, 0)

    async def never(self: dispatch.ProxyRunner, stale_ms: int = 0) -> int:
        await self.store.heartbeat(self.clock())
        return 0

    monkeypatch.setattr(dispatch.ProxyRunner, "recover",
                        too_early if planted == "too_early" else never)
    async with Simulation(devices=3, servers=3, seed=0, faults=FaultPlan.everything(),
                          database=database) as sim:
        report = await sim.run(60)
    assert report.faults["crash_server during proxied request, before the route call"]
    assert not report.ok
    expected = ("recovery:",) if planted == "too_early" else ("requests:", "live:")
    for name in expected:
        assert any(f.startswith(name) for f in report.failures), report.describe()



def test_simulate_command_on_postgres(capsys: pytest.CaptureFixture[str]) -> None:
    from crdtsync.cli import main

    url = require_postgres()
    code = main(["simulate", "--servers", "3", "--steps", "60", "--seed", "2", "--database",
                 url, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "converged: yes" in out and "invariants: all held" in out
