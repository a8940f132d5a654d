"""Callers for the stream benchmarks: N inbound Twilio calls, each with a media stream, all driven by
one 20 ms metronome (one task, not N timers, so the callers cost little beside the bridge)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp

from bench.common import add_output_args
from tests.fakes.stream_load import LoadStreamClient, inbound_stream


@contextlib.asynccontextmanager
async def stream_callers(voice_url: str, calls: int, *, account_sid: str,
                         auth_token: str) -> AsyncIterator[tuple[dict[str, LoadStreamClient], aiohttp.ClientSession]]:
    """Yields (call id -> its caller, in call order; the HTTP session they share); stops them all at exit."""
    loop = asyncio.get_running_loop()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    clients: dict[str, LoadStreamClient] = {}
    stop = asyncio.Event()

    async def metronome() -> None:
        start, k = loop.time(), 0
        while not stop.is_set():
            for client in list(clients.values()):
                await client.tick()
            k += 1
            await asyncio.sleep(max(0.0, start + k * 0.02 - loop.time()))

    ticker = asyncio.ensure_future(metronome())
    try:
        for _ in range(calls):
            target = await inbound_stream(session, voice_url, auth_token=auth_token, account_sid=account_sid)
            client = LoadStreamClient(target.url, parameters=target.parameters, call_sid=target.call_sid,
                                      account_sid=account_sid, session=session)
            await client.connect()
            clients[target.parameters["callId"]] = client
            await asyncio.sleep(0.01)
        yield clients, session
    finally:
        stop.set()
        ticker.cancel()
        await asyncio.gather(*(c.stop() for c in clients.values()), return_exceptions=True)
        await session.close()


def callers_parser(doc: str, *, rounds: int) -> argparse.ArgumentParser:
    """The stream benchmarks' common options: --calls (a list: one run each), --rounds, --cpu, --json, --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--calls", default="1,100")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--cpu", type=int, default=0, help="pin this process to one CPU (-1: don't)")
    add_output_args(parser)
    return parser
