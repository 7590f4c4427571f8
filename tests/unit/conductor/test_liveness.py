"""Cheap liveness: ``report_alive`` batched into one UPDATE, only ever for the caller's own host,
and the agents' fallback to ``Service.heartbeat`` on conductors that lack it."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from compute_agent.liveness import AgentBeat
from conductor.liveness import LivenessBatcher, LivenessEndpoint
from conductor.testing import LocalConductor, local_conductor
from shared_objects import exception, releases
from shared_objects.context import RequestContext
from shared_objects.objects.service import Service, ServiceReporter
from shared_objects.runtime.identity import Identities
from shared_objects.runtime.messaging import MessagingError, RemoteError
from shared_objects.testing.eventually import eventually

COMPUTE = releases.BINARY_COMPUTE


@contextlib.asynccontextmanager
async def as_agent(url: str, host: str, **kwargs: Any) -> AsyncIterator[LocalConductor]:
    async with local_conductor(url, login=f"fleet-host-{host}", **kwargs) as local:
        yield local


async def _register(local: LocalConductor, host: str, binary: str = COMPUTE, **kw: Any) -> None:
    async with local.db_context() as ctxt:
        service = await Service.register(
            ctxt, host, binary, kw.pop("topic", "compute"), kw.pop("version", 3)
        )
        for key, value in kw.items():
            setattr(service, key, value)
        if kw:
            await service.save()


async def _row(local: LocalConductor, host: str) -> Service:
    async with local.db_context() as ctxt:
        return await Service.get_by_host_and_binary(ctxt, host, COMPUTE)


def _agent_ctxt(host: str) -> RequestContext:
    ctxt = RequestContext(caller=f"fleet-host-{host}")
    ctxt.principal = Identities().resolve(ctxt.caller)
    return ctxt


async def test_report_alive_marks_the_callers_own_row_up(sqlite_database_url: str) -> None:
    async with as_agent(sqlite_database_url, "h1") as local:
        await _register(local, "h1")
        before = await _row(local, "h1")
        state = await local.api.report_alive(RequestContext())
        after = await _row(local, "h1")
    assert state == {"disabled": False, "forced_down": False, "live_migrations_waiting": False}
    assert after.report_count == before.report_count + 1
    assert after.last_seen_up is not None and before.last_seen_up is not None
    assert after.last_seen_up >= before.last_seen_up


@pytest.mark.parametrize(
    ("source", "status", "kind", "waiting"),
    [
        ("h1", "queued", "live-migration", True),
        ("h1", "accepted", "live-migration", True),
        ("h1", "running", "live-migration", False),  # started: its source drives it
        ("h1", "queued", "migration", False),
        ("h2", "queued", "live-migration", False),  # another host's
    ],
)
async def test_report_alive_says_whether_a_live_migration_from_the_host_waits(
    sqlite_database_url: str, source: str, status: str, kind: str, waiting: bool
) -> None:
    from shared_objects.objects.migration import Migration

    async with as_agent(sqlite_database_url, "h1") as local:
        await _register(local, "h1")
        assert (await local.api.report_alive(RequestContext()))["live_migrations_waiting"] is False
        async with local.db_context() as ctxt:
            await Migration(
                ctxt,
                uuid="3f2c7f8e-0000-4000-8000-000000000001",
                instance_uuid="3f2c7f8e-0000-4000-8000-000000000002",
                source_compute=source,
                dest_compute="h3",
                status=status,
                migration_type=kind,
            ).create()
        state = await local.api.report_alive(RequestContext())
    assert state["live_migrations_waiting"] is waiting


async def test_beats_of_many_hosts_share_one_statement(sqlite_database_url: str) -> None:
    async with local_conductor(sqlite_database_url) as local:
        hosts = [f"h{i}" for i in range(40)]
        for host in hosts:
            await _register(local, host)
        batcher = LivenessBatcher(local.database, max_delay=0.2)
        endpoint = LivenessEndpoint(batcher)
        replies = await asyncio.gather(*(endpoint.report_alive(_agent_ctxt(h)) for h in hosts))
        await batcher.stop()
        rows = [await _row(local, h) for h in hosts]
    assert batcher.beats == 40 and batcher.flushes == 1
    assert all(r["disabled"] is False and r["forced_down"] is False for r in replies)
    assert {row.report_count for row in rows} == {1}


async def test_disabled_row_is_shown_and_deleted_row_is_not_found(
    sqlite_database_url: str,
) -> None:
    async with local_conductor(sqlite_database_url) as local:
        await _register(local, "off", disabled=True)
        await _register(local, "gone")
        async with local.db_context() as ctxt:
            gone = await Service.get_by_host_and_binary(ctxt, "gone", COMPUTE)
            gone._context = ctxt
            await gone.destroy()
        endpoint = LivenessEndpoint(LivenessBatcher(local.database, max_delay=0.01))
        assert await endpoint.report_alive(_agent_ctxt("off")) == {
            "disabled": True,
            "forced_down": False,
            "live_migrations_waiting": False,
        }
        with pytest.raises(Exception) as caught:
            await endpoint.report_alive(_agent_ctxt("gone"))
    assert isinstance(getattr(caught.value, "exc", None), exception.ServiceNotFound)


async def test_a_host_cannot_beat_for_another(sqlite_database_url: str) -> None:
    async with as_agent(sqlite_database_url, "h1") as local:
        await _register(local, "h1")
        await _register(local, "h2")
        with pytest.raises((MessagingError, TypeError)):
            # Nothing the call carries names a host: an argument is refused, not obeyed.
            await local.api.client.prepare(version="1.1").call(
                RequestContext(), "report_alive", host="h2"
            )
        assert (await _row(local, "h2")).report_count == 0
        assert (await _row(local, "h1")).report_count == 0


@pytest.mark.parametrize("login", ["fleet-operator", "fleet-conductor-x"])
async def test_operators_and_conductors_may_not_report_alive(
    sqlite_database_url: str, login: str
) -> None:
    async with local_conductor(sqlite_database_url, login=login) as local:
        await _register(local, "h1")
        with pytest.raises(exception.Forbidden):
            await local.api.report_alive(RequestContext())
        assert (await _row(local, "h1")).report_count == 0


# --- the cast form (report_alive_cast: the beats between two answered ones) ----------------
# A cast has no reply to carry a refusal: what proves it refused is the conductor's log line
# for it (handler failure or audit) and the rows it did not touch.


async def test_a_host_cannot_beat_for_another_by_cast(sqlite_database_url: str) -> None:
    async with as_agent(sqlite_database_url, "h1") as local:
        await _register(local, "h1")
        await _register(local, "h2")
        with capture_logs() as logs:
            # Nothing a beat carries names a host: an argument is refused, not obeyed.
            await local.api.client.prepare(version="1.1").cast(
                RequestContext(), "report_alive", host="h2"
            )
            await eventually(
                lambda: any(e["event"] == "rpc_handler_failed" and e.get("cast") for e in logs),
                10.0,
                interval=0.02,
                what="the conductor handling the cast",
            )
            assert (await _row(local, "h2")).report_count == 0
            assert (await _row(local, "h1")).report_count == 0
            # The same login's own beat by cast lands, on its own row only.
            await local.api.report_alive_cast(RequestContext())

            async def h1_beat() -> bool:
                return (await _row(local, "h1")).report_count == 1

            await eventually(h1_beat, 10.0, interval=0.02, what="h1's own beat")
        assert (await _row(local, "h2")).report_count == 0


@pytest.mark.parametrize("login", ["fleet-operator", "fleet-conductor-x"])
async def test_operators_and_conductors_may_not_report_alive_by_cast(
    sqlite_database_url: str, login: str
) -> None:
    async with local_conductor(sqlite_database_url, login=login) as local:
        await _register(local, "h1")
        with capture_logs() as logs:
            await local.api.report_alive_cast(RequestContext())
            await eventually(
                lambda: any(
                    e["event"] == "audit"
                    and e["outcome"] == "refused"
                    and e["action"] == "report_alive"
                    and e["caller"] == login
                    for e in logs
                ),
                10.0,
                interval=0.02,
                what="the audited refusal",
            )
        assert (await _row(local, "h1")).report_count == 0


async def test_legacy_shared_login_is_refused() -> None:
    with pytest.raises(exception.Forbidden):
        from conductor.liveness import beating_host
        from shared_objects.runtime.identity import Caller, Role

        beating_host(Caller("shared", Role.AGENT, frozenset({"a", "b"}), legacy=True))


class _FailingDatabase:
    @contextlib.asynccontextmanager
    async def request(self, ctxt: Any) -> AsyncIterator[Any]:
        raise ConnectionRefusedError("database down")
        yield  # pragma: no cover


async def test_database_outage_fails_every_beat_of_the_batch() -> None:
    batcher = LivenessBatcher(_FailingDatabase(), max_delay=0.01)  # type: ignore[arg-type]
    results = await asyncio.gather(batcher.beat("h1"), batcher.beat("h2"), return_exceptions=True)
    assert all(isinstance(r, exception.DatabaseUnavailable) for r in results)


# --- the agent's side: report_alive where conductors have it, else Service.heartbeat -------


async def _beat_as_agent(
    local: LocalConductor, host: str, answer_every: int = 1
) -> tuple[AgentBeat, Service]:
    @contextlib.asynccontextmanager
    async def agent_context() -> AsyncIterator[Any]:
        yield RequestContext()

    beat = AgentBeat(local.api, service_down_time=60.0, answer_every=answer_every)
    reporter = ServiceReporter(
        agent_context, host=host, binary=COMPUTE, topic="compute", version=3, beat=beat
    )
    await reporter.start()
    await reporter.stop()  # no timer: beats are driven by hand below
    await reporter.report()
    await reporter.report()
    return beat, await _row(local, host)


async def test_agent_uses_report_alive_when_every_conductor_has_it(
    sqlite_database_url: str,
) -> None:
    async with as_agent(sqlite_database_url, "h1") as local:
        await _register(local, "c1", releases.BINARY_CONDUCTOR, topic="conductor")
        beat, row = await _beat_as_agent(local, "h1")
        assert local.liveness is not None
        assert beat.cheap is True and local.liveness.beats == 2
    assert row.report_count == 2


async def test_agent_heartbeats_while_an_older_conductor_is_alive(
    sqlite_database_url: str,
) -> None:
    async with as_agent(sqlite_database_url, "h1") as local:
        # A conductor of release 1.1 (service version 2): conductor API 1.0.
        await _register(local, "c-old", releases.BINARY_CONDUCTOR, topic="conductor", version=2)
        await _register(local, "c-new", releases.BINARY_CONDUCTOR, topic="conductor")
        beat, row = await _beat_as_agent(local, "h1")
        assert local.liveness is not None
        assert beat.cheap is False and local.liveness.beats == 0
    assert row.report_count == 2


async def test_agent_falls_back_when_a_conductor_lacks_report_alive(
    sqlite_database_url: str,
) -> None:
    # The services table says every conductor is new, but the one answering is not (a race
    # with an old conductor starting): the beat still lands, the old way.
    async with as_agent(sqlite_database_url, "h1", report_alive=False) as local:
        await _register(local, "c1", releases.BINARY_CONDUCTOR, topic="conductor")
        beat, row = await _beat_as_agent(local, "h1")
    assert beat.cheap is False
    assert row.report_count == 2


async def test_only_every_nth_beat_waits_for_an_answer(sqlite_database_url: str) -> None:
    calls: list[str] = []
    async with as_agent(sqlite_database_url, "h1") as local:
        await _register(local, "c1", releases.BINARY_CONDUCTOR, topic="conductor")
        original_call, original_cast = local.api.report_alive, local.api.report_alive_cast

        async def call(ctxt: Any) -> Any:
            calls.append("call")
            return await original_call(ctxt)

        async def cast(ctxt: Any) -> None:
            calls.append("cast")
            await original_cast(ctxt)

        local.api.report_alive = call  # type: ignore[method-assign]
        local.api.report_alive_cast = cast  # type: ignore[method-assign]
        beat, row = await _beat_as_agent(local, "h1", answer_every=3)
        for _ in range(5):
            await beat(RequestContext(), row)
        liveness = local.liveness
        assert liveness is not None
        await eventually(lambda: liveness.beats == 7)  # the casts land too, unanswered
    assert calls == ["call", "cast", "cast", "call", "cast", "cast", "call"]


class _OldConductor:
    """What a release-1.1 conductor (no authorizer, API 1.0) answers to ``report_alive``."""

    async def report_alive(self, ctxt: Any) -> Any:
        raise RemoteError("UnsupportedVersion", "Endpoint does not support RPC version 1.1")


async def test_unsupported_version_makes_the_agent_heartbeat(sqlite_database_url: str) -> None:
    async with as_agent(sqlite_database_url, "h1") as local:
        await _register(local, "h1")
        beat = AgentBeat(_OldConductor(), service_down_time=60.0)  # type: ignore[arg-type]
        beat.cheap = True
        service = await _row(local, "h1")
        await beat(RequestContext(), service)
    assert beat.cheap is False
    assert (await _row(local, "h1")).report_count == 1


async def test_old_agents_heartbeat_still_works_on_a_new_conductor(
    sqlite_database_url: str,
) -> None:
    async with as_agent(sqlite_database_url, "h1") as local:
        await _register(local, "h1")
        service = await Service.get_by_host_and_binary(RequestContext(), "h1", COMPUTE)
        await service.heartbeat()
        assert (await _row(local, "h1")).report_count == 1


def test_beats_are_spread_over_the_interval_and_never_later() -> None:
    async def nothing() -> Any:  # pragma: no cover
        raise AssertionError

    reporter = ServiceReporter(
        nothing,  # type: ignore[arg-type]
        host="h",
        binary=COMPUTE,
        topic="compute",
        version=3,
        interval=10.0,
        rng=random.Random(1),
    )
    firsts = [reporter.next_wait(first=True) for _ in range(200)]
    nexts = [reporter.next_wait() for _ in range(200)]
    assert min(firsts) < 1.0 and max(firsts) > 9.0  # spread over the whole first interval
    assert all(9.0 <= w <= 10.0 for w in nexts)


def test_the_release_table_names_the_conductor_api_that_has_report_alive() -> None:
    from shared_objects.rpc_clients.conductor import API_VERSION, REPORT_ALIVE_VERSION

    assert releases.CURRENT.conductor_rpc_api == API_VERSION == REPORT_ALIVE_VERSION
    assert releases.by_name("1.1").conductor_rpc_api == "1.0"  # agents fall back below this


async def test_stop_lets_a_beat_on_its_way_land_first(sqlite_database_url: str) -> None:
    # Otherwise the conductor could write it after the agent marked itself down.
    started, landed = asyncio.Event(), []

    async def slow_beat(ctxt: Any, service: Service) -> None:
        started.set()
        await asyncio.sleep(0.3)  # waiting for its batch
        landed.append(service.host)

    @contextlib.asynccontextmanager
    async def agent_context() -> AsyncIterator[Any]:
        yield RequestContext()

    async with as_agent(sqlite_database_url, "h1"):
        reporter = ServiceReporter(
            agent_context,
            host="h1",
            binary=COMPUTE,
            topic="compute",
            version=3,
            interval=0.05,
            beat=slow_beat,
        )
        await reporter.start()
        await asyncio.wait_for(started.wait(), 10)
        await reporter.stop()
    assert landed == ["h1"]


async def _waiting_migration(local: LocalConductor, source: str) -> None:
    from shared_objects.objects.migration import Migration

    async with local.db_context() as ctxt:
        await Migration(
            ctxt,
            uuid="3f2c7f8e-0000-4000-8000-0000000000a1",
            instance_uuid="3f2c7f8e-0000-4000-8000-0000000000a2",
            source_compute=source,
            dest_compute="elsewhere",
            status="accepted",
            migration_type="live-migration",
        ).create()


async def test_agent_sweeps_for_orphans_only_when_its_beat_says_a_migration_waits(
    sqlite_database_url: str,
) -> None:
    await _sweep_follows_the_beat(sqlite_database_url)


async def test_the_waiting_flag_on_postgresql(pg_database_url: str) -> None:
    # PostgreSQL runs the batch with an array parameter, SQLite with IN (...).
    await _sweep_follows_the_beat(pg_database_url)


async def _sweep_follows_the_beat(url: str) -> None:
    async with as_agent(url, "h1") as local:
        await _register(local, "c1", releases.BINARY_CONDUCTOR, topic="conductor")
        beat, row = await _beat_as_agent(local, "h1")
        assert beat.cheap is True and beat.sweep_wanted() is False
        await _waiting_migration(local, "h1")
        await beat(RequestContext(), row)
        assert beat.live_migrations_waiting is True and beat.sweep_wanted() is True


async def test_agent_on_heartbeats_always_sweeps(sqlite_database_url: str) -> None:
    # An older conductor's heartbeat answer says nothing about migrations: look every time.
    async with as_agent(sqlite_database_url, "h1", report_alive=False) as local:
        await _register(local, "c1", releases.BINARY_CONDUCTOR, topic="conductor")
        beat, _ = await _beat_as_agent(local, "h1")
    assert beat.cheap is False and beat.sweep_wanted() is True


async def test_the_sweep_loop_reads_nothing_while_no_sweep_is_wanted() -> None:
    from compute_agent.live_migration import LiveMigrationManager, LiveMigrationSettings

    manager = LiveMigrationManager(
        "h1",
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        settings=LiveMigrationSettings(orphan_check_interval=0.001),
    )
    asked: list[bool] = []
    sweeps: list[int] = []
    wanted = False
    asked_five, swept = asyncio.Event(), asyncio.Event()

    def sweep_wanted() -> bool:
        asked.append(wanted)
        if len(asked) >= 5:
            asked_five.set()
        return wanted

    async def sweep_orphans(ctxt: Any) -> int:
        sweeps.append(len(asked))
        swept.set()
        return 0

    manager.sweep_wanted = sweep_wanted
    manager.sweep.sweep_orphans = sweep_orphans  # type: ignore[method-assign]
    manager.start()
    try:
        async with asyncio.timeout(10):
            await asked_five.wait()
            assert sweeps == []
            wanted = True
            await swept.wait()
    finally:
        await manager.stop()
