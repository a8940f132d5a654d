"""Soak: hundreds of short calls through a real server on the mock carrier leave every per-call table bounded.

VOICECALL_SOAK_CALLS=5000 runs a longer soak (default: 300 calls, a few seconds).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from bridge import manager_core
from bridge.client import RpcClient
from bridge.runtime import Runtime
from tests.harness import rpc_client, run_bridge, wait_for

SOAK_CALLS = int(os.environ.get("VOICECALL_SOAK_CALLS", "300"))
KEPT = 40  # ended calls kept in memory for this run (the default is 1000)
CFG = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550009999", "responseModel": "none",
       "inboundPolicy": "open", "maxConcurrentCalls": 50,
       "streaming": {"enabled": True, "provider": "none"},
       # Answer never comes within the test: outbound calls end while ringing (busy, or hung up by us).
       "mock": {"ringDelayMs": 0, "answerDelayMs": 600_000, "calleeScript": [], "calleeHangupAfterMs": 0}}


def per_call_sizes(runtime: Runtime) -> dict[str, int]:
    """How many entries each per-call structure of the manager and the mock carrier holds."""
    m: Any = runtime.manager
    c: Any = runtime.carrier
    sizes = {f"manager.{name}": len(getattr(m, name)) for name in (
        "calls", "_by_provider_id", "_ended", "_turns", "_timers", "_hangup_retries", "_voices",
        "_media_waiters", "_machine", "_replies", "_consults")}
    sizes |= {f"mock.{name}": len(getattr(c, name)) for name in (
        "callees", "ended", "_personas", "_scripts", "_timers")}
    return sizes


async def one_round(client: RpcClient, n: int) -> list[str]:
    """Three short calls: busy, hung up while ringing (a machine persona), inbound ended at once."""
    busy = await client.call("voicecall.initiate", {"to": f"+1555{n:07d}0002", "message": "hi", "mode": "notify"})
    ringing = await client.call("voicecall.initiate", {"to": f"+1555{n:07d}0005", "message": "hi",
                                                       "mode": "notify"})
    await client.call("voicecall.end", {"callId": ringing["callId"]})
    inbound = await client.call("mock.inject", {"from": f"+1666{n:07d}", "script": []})
    assert inbound["accepted"], inbound
    await client.call("voicecall.end", {"callId": inbound["callId"]})
    return [busy["callId"], ringing["callId"], inbound["callId"]]


async def test_soak_per_call_state_stays_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Captured warnings would keep each call's exception (and its frames) alive: that is pytest's memory.
    caplog.set_level(logging.ERROR)
    async with run_bridge(CFG, tmp_path) as runtime:
        runtime.manager.ended_calls_kept = KEPT
        client = rpc_client(runtime)

        async def run(first: int, rounds: int) -> list[str]:
            ids: list[str] = []
            for n in range(first, first + rounds, 10):
                batch = await asyncio.gather(*(one_round(client, k) for k in range(n, min(n + 10, first + rounds))))
                ids += [i for r in batch for i in r]
            await wait_for(lambda: not runtime.manager.active_calls(), timeout=20)
            return ids

        first_ids = await run(0, 30)  # warm-up: the bounded histories fill
        warm = per_call_sizes(runtime)
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            rounds = SOAK_CALLS // 3
            await run(1000, rounds)
            gc.collect()  # media bridges of ended calls sit in reference cycles until a collection
            per_call = (tracemalloc.get_traced_memory()[0] - before) / (rounds * 3)
        finally:
            tracemalloc.stop()
        after = per_call_sizes(runtime)
        print(f"soak: {rounds * 3} calls, memory per call {per_call:.0f} B, sizes {after}")
        # Inbound mock calls carry two provider ids (the offer's and the answer's): the map is at most 2 per call.
        assert warm.pop("manager._by_provider_id") <= 2 * KEPT >= after.pop("manager._by_provider_id")
        assert after == warm, {k: (warm[k], after[k]) for k in warm if warm[k] != after[k]}
        assert after["manager.calls"] == KEPT and after["mock._personas"] == 0
        # A leaked media bridge alone is ~17 kB; what remains is the dedupe-id set (capped) and allocator noise.
        assert per_call < 8192

        # Evicted: a clear "not found"; the store still has every call.
        old = await client.call("voicecall.status", {"callId": first_ids[0]})
        assert old == {"found": False}
        listed = await client.call("voicecall.list", {"limit": 1000})
        assert len(listed["calls"]) == KEPT
    log = (tmp_path / "calls.jsonl").read_text()
    assert first_ids[0] in log


async def test_restart_loads_only_the_newest_ended_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with run_bridge(CFG, tmp_path) as runtime:
        client = rpc_client(runtime)
        ids = [i for n in range(6) for i in await one_round(client, n)]
        await wait_for(lambda: not runtime.manager.active_calls(), timeout=20)
        ended_at = {i: runtime.manager.calls[i].endedAt for i in ids}
    monkeypatch.setattr(manager_core, "ENDED_CALLS_KEPT", 5)
    async with run_bridge(CFG, tmp_path) as runtime:
        client = rpc_client(runtime)
        newest = sorted(ids, key=lambda i: ended_at[i] or 0)[-5:]
        assert sorted(runtime.manager.calls) == sorted(newest)
        assert (await client.call("voicecall.status", {"callId": newest[0]}))["found"] is True
        oldest = min(ids, key=lambda i: ended_at[i] or 0)
        assert await client.call("voicecall.status", {"callId": oldest}) == {"found": False}
