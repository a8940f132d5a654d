"""Turn overhead: from a final transcript to the first outbound media frame of the reply.

    python bench/turn_overhead.py --calls 1,100 [--rounds 5] [--json]

In one process pinned to one CPU: a real bridge (tests.harness.run_bridge: Twilio carrier, the one
aiohttp server) and N Twilio media streams (tests/fakes/stream_load.py, each obtained through a
signed inbound webhook and sending 20 ms frames of silence at real-time cadence). Each call's voice
is the real CallVoice/MediaPipeline with two instant engines: an STT whose `final(text)` reports a final
transcript at once, and a TTS that yields 1 s of 24 kHz audio in one chunk at once. So the path timed is
the real one: STT event -> CallManager (speech event, auto-response) -> offline responder -> CallVoice.say
-> TTS -> MediaPipeline.play (resample 24k->8k, encode, frame, pace) -> WebSocket transport.

Each round, every call gets one final transcript (spread over 200 ms), then the round waits until all
replies have played. Two times per turn: until the first reply frame is handed to the WebSocket
(`server`), and until the caller receives it (`caller`, same process and loop).
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.callers import callers_parser, stream_callers  # noqa: E402
from bench.common import finish, loadavg, machine, pin_cpu, table  # noqa: E402
from bridge.calls import CallEvent  # noqa: E402
from bridge.voice import CallVoice  # noqa: E402
from media.stt.base import SttEngine, SttEvent, SttSession  # noqa: E402
from media.tts.base import TtsEngine  # noqa: E402
from tests.fakes.audio import fake_speech  # noqa: E402
from tests.fakes.stream_load import LoadStreamClient, percentile  # noqa: E402
from tests.harness import run_bridge  # noqa: E402

TTS_RATE = 24000
REPLY_AUDIO = fake_speech("instant reply audio, fifty chars of tone, one sec!", TTS_RATE)  # 1.0 s


class InstantStt(SttEngine):
    name = "instant"

    def __init__(self) -> None:
        self.sessions: list[InstantSession] = []

    def open(self, *, sample_rate: int, on_event: Callable[[SttEvent], None], wire_format: Any = None) -> SttSession:
        session = InstantSession(on_event)
        self.sessions.append(session)
        return session


class InstantSession(SttSession):
    def __init__(self, on_event: Callable[[SttEvent], None]) -> None:
        self.on_event = on_event

    async def start(self) -> None:
        return None

    def feed(self, pcm: bytes) -> None:
        return None

    def final(self, text: str) -> None:
        self.on_event(SttEvent("final", text))

    async def close(self) -> None:
        return None


class InstantTts(TtsEngine):
    name = "instant"
    sample_rate = TTS_RATE

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        yield REPLY_AUDIO


class TimedTransport:
    """The stream's WebSocket transport, noting when each media frame is handed to it."""

    def __init__(self, inner: Any, clock: Callable[[], float]) -> None:
        self.inner = inner
        self.format = inner.format
        self.supports_marks = inner.supports_marks
        self.reports_dtmf = inner.reports_dtmf
        self.clock = clock
        self.sent: list[float] = []

    async def send_media(self, payload: bytes) -> None:
        self.sent.append(self.clock())
        await self.inner.send_media(payload)

    async def send_mark(self, name: str) -> None:
        await self.inner.send_mark(name)

    async def send_clear(self) -> None:
        await self.inner.send_clear()


def config(account_sid: str, auth_token: str, calls: int) -> dict[str, Any]:
    return {
        "provider": "twilio", "fromNumber": "+15550001234", "inboundPolicy": "open", "inboundGreeting": "",
        "maxConcurrentCalls": calls + 10, "maxDurationSeconds": 3600,
        "twilio": {"accountSid": account_sid, "authToken": auth_token, "apiBaseUrl": "http://127.0.0.1:9"},
        "streaming": {"enabled": True, "provider": "none", "maxConnections": calls + 10,
                      "maxPendingConnectionsPerIp": 64, "maxPendingConnections": 256},
        "webhookSecurity": {"maxInFlightPerIp": 64},
        "tts": {"provider": "espeak"}, "responseModel": "offline",
    }


async def measure(calls: int, rounds: int) -> dict[str, Any]:
    import secrets


    loop = asyncio.get_running_loop()
    account_sid, auth_token = "AC" + secrets.token_hex(16), secrets.token_hex(16)
    stt, tts = InstantStt(), InstantTts()
    voices: dict[str, tuple[CallVoice, TimedTransport, InstantSession]] = {}
    server_ms: list[float] = []
    caller_ms: list[float] = []
    missed = 0
    with tempfile.TemporaryDirectory(prefix="bench-turn-") as tmp:
        async with run_bridge(config(account_sid, auth_token, calls), Path(tmp)) as runtime:
            settings = runtime.settings

            def factory(call: Any, transport: Any, emit: Callable[[CallEvent], None]) -> CallVoice:
                timed = TimedTransport(transport, loop.time)
                voice = CallVoice(call_id=call.callId, transport=timed, tts=tts, stt_engine=stt, emit=emit,
                                  pipeline_rate=settings.pipelineSampleRate, barge_in=settings.streaming.bargeIn)
                voices[call.callId] = (voice, timed, stt.sessions[-1])
                return voice

            runtime.manager._voice_factory = factory  # noqa: SLF001 - the benchmark's engines, the real voice
            voice_url = settings.publicUrl or ""
            async with stream_callers(voice_url, calls, account_sid=account_sid,
                                      auth_token=auth_token) as (callers, _):
                clients = list(callers.items())
                async with asyncio.timeout(20):
                    while len(voices) < calls:
                        await asyncio.sleep(0.05)
                await asyncio.sleep(1.0)
                for r in range(rounds):
                    turns: list[tuple[float, TimedTransport, LoadStreamClient]] = []

                    async def one(call_id: str, client: LoadStreamClient, turns: list[Any], text: str) -> None:
                        await asyncio.sleep(random.random() * 0.2)
                        _, timed, sess = voices[call_id]
                        turns.append((loop.time(), timed, client))
                        sess.final(text)

                    await asyncio.gather(*(one(cid, c, turns, f"round {r} please") for cid, c in clients))
                    await asyncio.sleep(1.0 + 0.6)  # 1 s of reply audio, played out
                    async with asyncio.timeout(15):  # until every reply is done (mark echoed)
                        while any(runtime.manager.get_call(cid).state == "speaking" for cid, _ in clients):
                            await asyncio.sleep(0.05)
                    for t0, timed, client in turns:
                        first_sent = next((t for t in timed.sent if t >= t0), None)
                        first_heard = next((t for t in client.recv_times if t >= t0), None)
                        if first_sent is None or first_heard is None:
                            missed += 1
                            continue
                        server_ms.append((first_sent - t0) * 1000)
                        caller_ms.append((first_heard - t0) * 1000)
    return {"calls": calls, "turns": len(server_ms), "missed": missed,
            "server_p50_ms": percentile(server_ms, 50), "server_p99_ms": percentile(server_ms, 99),
            "server_max_ms": max(server_ms) if server_ms else float("nan"),
            "caller_p50_ms": percentile(caller_ms, 50), "caller_p99_ms": percentile(caller_ms, 99),
            "caller_max_ms": max(caller_ms) if caller_ms else float("nan"), "loadavg": loadavg()}


def main(argv: list[str] | None = None) -> int:
    args = callers_parser(__doc__, rounds=5).parse_args(argv)
    pin_cpu(args.cpu)
    random.seed(1)
    points = []
    for n in (int(x) for x in args.calls.split(",")):
        started = time.monotonic()
        points.append(asyncio.run(measure(n, args.rounds)))
        print(f"[turn] {n} calls: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    data = {"benchmark": "turn_overhead", "machine": machine(), "rounds": args.rounds, "points": points}
    print(table(["calls", "turns", "missed", "server p50", "server p99", "server max", "caller p50", "caller p99",
                 "caller max", "load1"],
                [[p["calls"], p["turns"], p["missed"], p["server_p50_ms"], p["server_p99_ms"], p["server_max_ms"],
                  p["caller_p50_ms"], p["caller_p99_ms"], p["caller_max_ms"], p["loadavg"][0]] for p in points]))
    print("(ms from the final transcript to the first reply frame handed to the WebSocket / heard by the caller)")
    return finish("turn_overhead", data, args)


if __name__ == "__main__":
    sys.exit(main())
