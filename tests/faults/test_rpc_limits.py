"""Limits before work, on real RabbitMQ (issue 13, acceptance c).

1. A conductor-like RPC server in its own process (``peers/rpc_limits_server.py``) receives a
   16 MiB body and a 100,000-deep nesting while other callers keep calling it. Each is refused
   before decoding with a short error reply; the server's memory is read from outside
   (``/proc/<pid>/status``: VmHWM is the peak resident set, reset through ``clear_refs``), its
   event-loop lag is measured inside it, and the longest time no other caller got an answer is
   compared with a quiet run of the same load (``MAX_FREEZE``).
2. The broker configuration Fleet ships (``deploy/rabbitmq/20-fleet-limits.conf``, the one
   place the value lives) makes the broker refuse a 128 MiB publish: a private node started
   with that file refuses it, the publisher gets a clear error, the service never sees it.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MessageRejected,
    MessageTooDeep,
    MessageTooLarge,
    RPCClient,
    RPCServer,
    Target,
    codec,
    expose,
    get_transport,
)
from shared_objects.testing import PeerProcess, RabbitNode
from shared_objects.testing.eventually import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
PEER = Path(__file__).parent / "peers" / "rpc_limits_server.py"
BROKER_LIMITS = ROOT / "deploy" / "rabbitmq" / "20-fleet-limits.conf"
MIB = 1024 * 1024
BIG = 16 * MIB
DEEP = 100_000
# The systemd watchdog (WatchdogSec=30 in deploy/systemd) is far above this; a loop held this
# long would already show in every caller's latency.
MAX_LOOP_LAG = 0.5
LOAD_SECONDS = 3.0
CALLERS = 8
# Before these limits a 16 MiB body held the receiving loop for ~4 s, and every other caller
# waited that long. Wall-clock percentiles cannot tell that from a busy shared machine (p99
# 40 ms quiet vs 145 ms during, with no freeze, on 2 loaded cores), so they are printed, not
# asserted. What is asserted is the freeze itself: the longest stretch in which NONE of the
# CALLERS callers got an answer. Noise slows some calls; only a held loop stops them all. The
# bound is a quarter of the old freeze on top of the same measure in a quiet run.
MAX_FREEZE = 1.0


def _broker_max_message_size() -> int:
    match = re.search(r"^max_message_size\s*=\s*(\d+)\s*$", BROKER_LIMITS.read_text(), re.M)
    assert match, f"no max_message_size in {BROKER_LIMITS}"
    return int(match.group(1))


def _proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _reset_peak(pid: int) -> None:
    # "5" resets VmHWM to the current RSS (proc(5), clear_refs).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture
async def peer(amqp_url: str) -> AsyncIterator[tuple[PeerProcess, MessagingConfig, str]]:
    exchange = f"fleet-test-{uuid.uuid4().hex[:8]}"
    topic = f"conductor-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, str(PEER), "--url", amqp_url, "--exchange", exchange]
    async with PeerProcess([*argv, "--topic", topic], name="limits-server", cwd=str(ROOT)) as p:
        await p.wait_event(lambda e: e.get("event") == "ready", within=30)
        yield p, MessagingConfig(transport_url=amqp_url, control_exchange=exchange), topic


def _longest_silence(started: float, answered: list[float]) -> float:
    """The longest time from ``started`` (or an answer) to the next answer of any caller."""
    times = [started, *sorted(answered)]
    return max(b - a for a, b in itertools.pairwise(times))


async def _load(
    client: RPCClient, seconds: float, answered: list[float] | None = None
) -> list[float]:
    """Latencies of CALLERS callers calling back to back for ``seconds`` (the time of each
    answer appended to ``answered``)."""
    latencies: list[float] = []
    answered = answered if answered is not None else []
    stop = time.monotonic() + seconds

    async def caller(n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            started = time.monotonic()
            await client.call(
                RequestContext(), "object_action", objname="Instance", objmethod="save", args=[n, i]
            )
            answered.append(time.monotonic())
            latencies.append(answered[-1] - started)
            i += 1

    await asyncio.gather(*(caller(n) for n in range(CALLERS)))
    return latencies


def _p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98]


def _hostile_bodies(reply_q: str) -> dict[str, tuple[bytes, str, type[Exception]]]:
    """msg_id -> (body, what, the error its reply must carry); addressed like a real call."""
    big_id, deep_id = uuid.uuid4().hex, uuid.uuid4().hex
    big = codec.encode_message(
        {
            "method": "object_action",
            "args": {"objname": "Instance", "objmethod": "save", "args": "x" * BIG},
            "_msg_id": big_id,
            "_reply_q": reply_q,
        }
    )
    deep = (
        b'{"oslo.version": "2.0", "oslo.message": "{\\"method\\": \\"object_action\\", '
        b'\\"args\\": {\\"args\\": '
        + b"[" * DEEP
        + b"]" * DEEP
        + b'}, \\"_msg_id\\": \\"'
        + deep_id.encode()
        + b'\\", \\"_reply_q\\": \\"'
        + reply_q.encode()
        + b'\\"}"}'
    )
    return {
        big_id: (big, "16 MiB", MessageTooLarge),
        deep_id: (deep, "100000-deep", MessageTooDeep),
    }


async def test_big_and_deep_requests_are_refused_unread_without_hurting_other_callers(
    peer: tuple[PeerProcess, MessagingConfig, str],
) -> None:
    process, config, topic = peer
    async with get_transport(config) as transport:
        client = RPCClient(transport, Target(topic=topic), timeout=10)
        await _load(client, 1.0)  # warm up: connections, reply queue, caches
        quiet_answers: list[float] = []
        quiet_from = time.monotonic()
        quiet_p99 = _p99(await _load(client, LOAD_SECONDS, quiet_answers))
        quiet_silence = _longest_silence(quiet_from, quiet_answers)
        await process.request({"op": "stats"}, within=10)  # resets the lag maximum

        await transport.replies.ensure_listening()
        hostile = _hostile_bodies(transport.replies.queue_name)
        futures = {m: transport.replies.register(m) for m in hostile}
        rss_before = _proc_kb(process.pid, "VmRSS")
        _reset_peak(process.pid)
        exchange = transport.topology.control_exchange(None)

        async def attack() -> None:
            await asyncio.sleep(0.5)  # the load is running
            for body, _, _ in hostile.values():
                await transport.driver.publish(exchange, topic, body)

        answers: list[float] = []
        loaded_from = time.monotonic()
        loaded, _ = await asyncio.gather(_load(client, LOAD_SECONDS, answers), attack())
        silence = _longest_silence(loaded_from, answers)
        replies = {m: await asyncio.wait_for(f, 10) for m, f in futures.items()}
        peak_kb = _proc_kb(process.pid, "VmHWM")
        await asyncio.sleep(2.0)
        rss_after = _proc_kb(process.pid, "VmRSS")
        stats = await process.request({"op": "stats"}, within=10)

    for msg_id, reply in replies.items():
        _, what, error = hostile[msg_id]
        remote = codec.deserialize_remote_exception(reply["failure"], ())
        assert isinstance(remote, error), f"{what}: {remote!r}"
    assert stats["dropped"] == {"too_large": 1, "too_deep": 1}, stats
    assert not any(k.startswith("object_action:error") for k in stats["calls"]), stats
    growth_kb = peak_kb - rss_before
    lasting_kb = rss_after - rss_before
    loaded_p99 = _p99(loaded)
    print(
        f"\nlimits: peak RSS growth {growth_kb / 1024:.1f} MiB for a {BIG // MIB} MiB body "
        f"(lasting {lasting_kb / 1024:.1f} MiB); max loop lag {stats['max_lag_ms']} ms; "
        f"other callers' p99 {quiet_p99 * 1000:.1f} ms quiet, {loaded_p99 * 1000:.1f} ms "
        f"during ({len(loaded)} calls); longest silence {quiet_silence * 1000:.0f} ms quiet, "
        f"{silence * 1000:.0f} ms during"
    )
    assert growth_kb <= 2 * BIG // 1024, f"peak RSS grew {growth_kb} kB"
    assert lasting_kb <= BIG // 1024 // 4, f"RSS stayed {lasting_kb} kB higher"
    assert stats["max_lag_ms"] / 1000 < MAX_LOOP_LAG, stats
    assert silence <= quiet_silence + MAX_FREEZE, (quiet_silence, silence)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[int] = []

    @expose
    async def take(self, ctxt: RequestContext, blob: str) -> None:
        self.seen.append(len(blob))


def test_shipped_broker_cap_sits_between_fleets_limit_and_128_mib() -> None:
    cap = _broker_max_message_size()
    # Fleet's own limit answers the caller first (an error reply); the broker's is the backstop
    # that keeps what no service should buffer off the wire.
    assert MessagingConfig().max_message_bytes < cap < 128 * MIB
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "./deploy/rabbitmq/20-fleet-limits.conf:/etc/rabbitmq/conf.d/" in compose
    assert "20-fleet-limits.conf" in (ROOT / "docs" / "operations.md").read_text()


@pytest.fixture
async def capped_node() -> AsyncIterator[RabbitNode]:
    async with RabbitNode(extra_config=BROKER_LIMITS.read_text()) as node:
        yield node


async def test_shipped_broker_config_refuses_a_128_mib_publish(capped_node: RabbitNode) -> None:
    config = MessagingConfig(
        transport_url=capped_node.url,
        control_exchange=f"fleet-test-{uuid.uuid4().hex[:8]}",
        # Fleet's own limit out of the way: only the broker stands between the body and us.
        max_message_bytes=512 * MIB,
    )
    recorder = Recorder()
    async with get_transport(config) as server_t, get_transport(config) as client_t:
        async with RPCServer(server_t, Target(topic="capped", server="s1"), [recorder]) as server:
            client = RPCClient(client_t, Target(topic="capped"), timeout=30)
            started = time.monotonic()
            with pytest.raises(MessageRejected, match="max_message_size") as info:
                await client.cast(RequestContext(), "take", blob="x" * (128 * MIB))
            took = time.monotonic() - started
            assert str(_broker_max_message_size()) in str(info.value)
            # The publisher's connection survived (only its channel was closed): it goes on.
            await client.cast(RequestContext(), "take", blob="small")
            await eventually(lambda: recorder.seen, 10, what="the small cast handled")
            assert recorder.seen == [len("small")]  # the service never saw the big one
            assert server.stats()["dropped"] == {}
    print(f"\n128 MiB publish refused by the broker in {took:.1f} s: {info.value}")


async def test_the_real_conductor_refuses_big_and_deep_requests_unread(
    cluster_factory: Any,
) -> None:
    """The same attack on a real ``conductor`` process (its own login, PostgreSQL, an agent):
    each body is refused before decoding with a short error reply, the conductor's memory and
    its other callers barely notice, and its log says it in one short line."""
    from shared_objects.objects.service import ServiceList

    async with cluster_factory(hosts=("compute-1",)) as cluster:
        transport = cluster.transport
        assert transport is not None
        conductor_pid = cluster.processes["conductor-1"].process.pid

        async def load(seconds: float, answered: list[float] | None = None) -> list[float]:
            latencies: list[float] = []
            answered = answered if answered is not None else []
            stop = time.monotonic() + seconds

            async def caller() -> None:
                while time.monotonic() < stop:
                    started = time.monotonic()
                    await ServiceList.get_all(cluster.ctxt)
                    answered.append(time.monotonic())
                    latencies.append(answered[-1] - started)

            await asyncio.gather(*(caller() for _ in range(CALLERS)))
            return latencies

        await load(1.0)
        quiet_answers: list[float] = []
        quiet_from = time.monotonic()
        quiet_p99 = _p99(await load(LOAD_SECONDS, quiet_answers))
        quiet_silence = _longest_silence(quiet_from, quiet_answers)
        await transport.replies.ensure_listening()
        hostile = _hostile_bodies(transport.replies.queue_name)
        futures = {m: transport.replies.register(m) for m in hostile}
        rss_before = _proc_kb(conductor_pid, "VmRSS")
        _reset_peak(conductor_pid)
        exchange = transport.topology.control_exchange(None)

        async def attack() -> None:
            await asyncio.sleep(0.5)
            for body, _, _ in hostile.values():
                await transport.driver.publish(exchange, "conductor", body)

        answers: list[float] = []
        loaded_from = time.monotonic()
        loaded, _ = await asyncio.gather(load(LOAD_SECONDS, answers), attack())
        silence = _longest_silence(loaded_from, answers)
        replies = {m: await asyncio.wait_for(f, 10) for m, f in futures.items()}
        peak_kb = _proc_kb(conductor_pid, "VmHWM")
        await asyncio.sleep(2.0)
        rss_after = _proc_kb(conductor_pid, "VmRSS")
        log_lines = cluster.processes["conductor-1"].log_path.read_text().splitlines()

    for msg_id, reply in replies.items():
        _, what, error = hostile[msg_id]
        remote = codec.deserialize_remote_exception(reply["failure"], ())
        assert isinstance(remote, error), f"{what}: {remote!r}"
    refused = [line for line in log_lines if "rpc_message_refused" in line]
    assert len(refused) == 2, refused
    longest = max(len(line) for line in log_lines)
    growth_kb, lasting_kb = peak_kb - rss_before, rss_after - rss_before
    loaded_p99 = _p99(loaded)
    print(
        f"\nreal conductor: peak RSS growth {growth_kb / 1024:.1f} MiB for a {BIG // MIB} MiB "
        f"body (lasting {lasting_kb / 1024:.1f} MiB); other callers' p99 "
        f"{quiet_p99 * 1000:.1f} ms quiet, {loaded_p99 * 1000:.1f} ms during; longest silence "
        f"{quiet_silence * 1000:.0f} ms quiet, {silence * 1000:.0f} ms during; longest log line "
        f"{longest} bytes"
    )
    assert longest < 4096, "a log line carries a body or a traceback"
    assert growth_kb <= 2 * BIG // 1024, f"peak RSS grew {growth_kb} kB"
    assert lasting_kb <= BIG // 1024 // 4, f"RSS stayed {lasting_kb} kB higher"
    # No caller frozen by the bodies (see MAX_FREEZE: a freeze, not a percentile).
    assert silence <= quiet_silence + MAX_FREEZE, (quiet_silence, silence)
