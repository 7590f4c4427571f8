"""The test helpers themselves: CallStream's bookkeeping and PeerProcess's JSON-lines protocol."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shared_objects.testing import CallStream, PeerError, PeerProcess


async def test_call_stream_records_results_errors_and_hangs_by_index() -> None:
    async def call(i: int) -> int:
        if i % 10 == 3:
            raise ValueError(i)
        if i == 7:
            await asyncio.sleep(10)  # a call that hangs past the deadline
        return i * 2

    stream = CallStream(call, deadline=0.3)
    started = time.monotonic()
    outcomes = await stream.run(20, concurrency=4)
    assert time.monotonic() - started < 3
    assert [o.index for o in outcomes] == list(range(20))
    assert [o.index for o in stream.hung] == [7]
    assert sorted(o.index for o in stream.failed) == [3, 13]
    assert all(isinstance(o.error, ValueError) for o in stream.failed)
    assert all(o.result == o.index * 2 for o in stream.succeeded)
    assert len(stream.succeeded) == 17
    assert stream.hung[0].elapsed >= 0.3


async def test_call_stream_wait_finished_lets_a_fault_be_injected_mid_stream() -> None:
    stream = CallStream(lambda i: asyncio.sleep(0.01, result=i), deadline=1.0)
    running = asyncio.create_task(stream.run(100, concurrency=2))
    await stream.wait_finished(10, within=5)
    assert 10 <= len(stream.outcomes) < 100
    await running
    assert len(stream.succeeded) == 100


@pytest.fixture
def echo_peer(tmp_path: Path) -> list[str]:
    script = tmp_path / "peer.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            print(json.dumps({"event": "ready"}), flush=True)
            print("not json", flush=True)
            for line in sys.stdin:
                command = json.loads(line)
                if command.get("op") == "crash":
                    sys.stderr.write("peer crashed on purpose\\n")
                    sys.exit(3)
                print(json.dumps({"id": command["id"], "echo": command["value"]}), flush=True)
            """
        )
    )
    return [sys.executable, str(script)]


async def test_peer_process_matches_replies_to_requests_and_keeps_events(
    echo_peer: list[str],
) -> None:
    async with PeerProcess(echo_peer, name="echo") as peer:
        await peer.wait_event(lambda e: e.get("event") == "ready", within=10)
        replies = [await peer.request({"value": v}, within=10) for v in ("a", "b")]
        assert [r["echo"] for r in replies] == ["a", "b"]
        assert {"event": "unparsed", "line": "not json\n"} in peer.events
    assert peer.returncode == 0  # closing stdin let it exit by itself


async def test_peer_process_reports_an_early_exit_with_its_stderr(echo_peer: list[str]) -> None:
    async with PeerProcess(echo_peer, name="echo") as peer:
        await peer.send({"op": "crash", "id": 1})
        with pytest.raises(PeerError, match="peer crashed on purpose"):
            await peer.wait_event(lambda e: e.get("id") == 1, within=10)
    assert peer.returncode == 3


async def test_peer_process_kill_ends_a_peer_that_ignores_stdin(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text("import time\nwhile True:\n    time.sleep(1)\n")
    peer = PeerProcess([sys.executable, str(script)], name="stubborn")
    async with peer:
        with pytest.raises(PeerError, match="0/1 expected events"):
            await peer.wait_event(lambda e: True, within=0.5)
        with pytest.raises(PeerError, match="already started"):
            await peer.start()
        await peer.kill()
    assert peer.returncode == -9
