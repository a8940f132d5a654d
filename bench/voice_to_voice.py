"""Voice to voice: from the end of the caller's speech to the first reply audio the caller receives.

    python bench/voice_to_voice.py --calls 1,100 --modes batch,streaming [--rounds 3] [--json]

N concurrent calls over Twilio media streams (tests/fakes/stream_load.py: signed inbound webhook,
TwiML <Stream>, 20 ms u-law frames at real-time cadence from one metronome; the callers run in their
own process, as a carrier would be) into a real bridge
(tests.harness.run_bridge: Twilio carrier, the one aiohttp server, the real CallManager, CallVoice,
MediaPipeline and conversation engine). Each round every caller speaks a line (1 s of tone speech,
then silence); the time runs from the caller sending its last speech frame to the caller receiving
the first frame of the reply.

Engines are fakes at configurable latencies, in their OWN process (pinned to another CPU when
there is one) so their work does not count as the bridge's:
- STT: in the bridge process, fed the wire audio like the OpenAI Realtime engine (u-law as is); an
  energy detector finds the end of speech and the final transcript comes `--stt-ms` after it.
- model: tests/fakes/openai_server.py chat completions, `--ttft-ms` to the first token, then
  `--tokens-per-s`, a reply of `--reply-tokens` word tokens (streamed, or whole for batch).
- TTS: the same fake's /v1/audio/speech through the bridge's OpenAI TTS engine, `--tts-ms` to the
  first byte.

The floor is what the engines alone need: STT final + first token + the tokens until the first
speakable piece is complete (streaming) or the whole reply (batch) + TTS first byte. "above" is
the bridge's time on top of it.
`--mode s2s` is the hook for speech-to-speech (filled in by the realtime work).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Server,
    cpu_seconds,
    finish,
    free_port,
    loadavg,
    machine,
    pinned,
    table,
)
from bench.turn_timeline import (
    SEGMENTS,
    SUMS,
    CallSteps,
    EngineFloor,
    Steps,
    TimedTts,
    chat_tag,
    summary,
    time_model,
    turn_segments,
)
from bridge.calls import CallEvent
from bridge.cli import event_loop_factory
from bridge.conversation.segmenter import Segmenter
from bridge.gc_policy import settle_startup_heap
from bridge.voice import CallVoice
from media.stt.base import SttEngine, SttEvent, SttSession
from tests.fakes.openai_server import tokens
from tests.fakes.stream_load import (
    LoadStreamClient,
    StreamTarget,
    caller_frames,
    inbound_stream,
    percentile,
)
from tests.fakes.twilio_server import sid
from tests.harness import run_bridge

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

DEFAULT_PIPECAT_PY = "/work/venvs/pipecat/bin/python"
REPLY_WORDS = ["Sure,", "I", "can", "help", "with", "that.", "Your", "table", "for", "two", "is", "booked", "for", "Thursday", "at", "seven,", "and", "we", "will", "send", "you", "a", "short", "confirmation", "text", "in", "a", "minute", "or", "two", "today."]
SPEECH_S = 1.0
ROUND_TIMEOUT_S = 20.0  # a reply not heard this long after the speech counts as missed
LOUD_RMS = 500.0

REALTIME_KEY = "sk-rt-test"  # the realtime fake's key
S2S_VAD_THRESHOLD = 0.3  # bridge and pipecat send the same server-VAD settings
S2S_REPLY = "Fifty characters of reply tone, one second of audio"  # the realtime fake: 20 ms per character
FAKES = """
import asyncio, sys
from bridge.gc_policy import settle_startup_heap
from tests.fakes.openai_server import FakeOpenAI, ChatReply
from tests.fakes.openai_realtime_server import FakeOpenAIRealtime, Reply
async def main():
    reply = sys.argv[4]
    fake = FakeOpenAI(chat_reply=lambda body: ChatReply(reply), chat_ttft_s=float(sys.argv[1]),
                      chat_tokens_per_s=float(sys.argv[2]), speech_first_byte_s=float(sys.argv[3]),
                      speech_chunk_bytes=4800)
    await fake.start()
    realtime = FakeOpenAIRealtime(replies=[Reply(sys.argv[5])], first_delta_delay_s=float(sys.argv[6]),
                                  delta_interval_s=float(sys.argv[7]))
    await realtime.start()
    settle_startup_heap()  # as the bridge's server does: no long full collections in the fakes either
    print(fake.port, realtime.port, flush=True)
    await asyncio.Event().wait()
from bridge.cli import event_loop_factory
with asyncio.Runner(loop_factory=event_loop_factory("auto")) as runner:  # light: their lateness is the harness's
    runner.run(main())
"""


def reply_text(n_tokens: int) -> str:
    words = (REPLY_WORDS * (n_tokens // len(REPLY_WORDS) + 1))[:n_tokens]
    text = " ".join(words)
    return text if text.endswith((".", "!", "?")) else text.rstrip(",") + "."


def first_piece_tokens(text: str, min_clause_chars: int = 30) -> int:
    """How many tokens the model must have sent before the segmenter hands out the first piece."""
    seg = Segmenter(min_clause_chars=min_clause_chars)
    toks = tokens(text)
    for i, tok in enumerate(toks, 1):
        if seg.push(tok):
            return i
    return len(toks)


def engine_floor(mode: str, args: argparse.Namespace, text: str) -> EngineFloor:
    gap = 1000 / args.tokens_per_s
    n = len(tokens(text)) if mode == "batch" else first_piece_tokens(text)
    return EngineFloor(stt=args.stt_ms, model=args.ttft_ms, piece=(n - 1) * gap, tts=args.tts_ms)


def floor_ms(mode: str, args: argparse.Namespace, text: str) -> float:
    floor = engine_floor(mode, args, text)
    return floor.stt + floor.model + floor.piece + floor.tts


class WireStt(SttEngine):
    """The STT fake: wire u-law in; a final transcript `delay_s` after the end of the caller's speech."""

    name = "bench-wire"

    def __init__(self, delay_s: float, steps: Steps) -> None:
        self.delay_s = delay_s
        self.steps = steps

    def open(self, *, sample_rate: int, on_event: Callable[[SttEvent], None], wire_format: Any = None) -> SttSession:
        return _WireSession(on_event, self.delay_s, self.steps.new_call())


class _WireSession(SttSession):
    wants_wire = True

    def __init__(self, on_event: Callable[[SttEvent], None], delay_s: float, steps: CallSteps) -> None:
        self.on_event = on_event
        self.delay_s = delay_s
        self.steps = steps  # its number goes in the caller's words: the bench can tell whose a chat request is
        self.loop = asyncio.get_running_loop()
        self.speaking = False
        self.last_loud = 0.0
        self.finals = 0

    async def start(self) -> None:
        return None

    def feed(self, pcm: bytes) -> None:
        return None

    def feed_wire(self, payload: bytes) -> None:
        loud = audioop.rms(audioop.ulaw2lin(payload, 2), 2) > LOUD_RMS
        now = time.monotonic()
        if loud:
            self.speaking, self.last_loud = True, now
        elif self.speaking:
            self.speaking = False
            self.finals += 1
            text = f"I would like a table please, {chat_tag(self.steps.number, self.finals)}."
            self.loop.call_later(max(0.0, self.last_loud + self.delay_s - time.monotonic()), self._final, text)

    def _final(self, text: str) -> None:
        self.steps.final.append(time.monotonic())
        self.on_event(SttEvent("final", text))

    async def close(self) -> None:
        return None


class StampedVoice(CallVoice):
    """Stamps the reply's first frame written to the caller's socket (bench/turn_timeline.py)."""

    steps: CallSteps | None = None

    def on_first_audio(self, label: str | None) -> None:
        super().on_first_audio(label)
        if self.steps is not None:
            self.steps.frame_out.append(time.monotonic())


class Caller(LoadStreamClient):
    """Notes when its last queued speech frame went out."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.speech_end: float | None = None

    async def tick(self) -> None:
        last = len(self._outbox) == 1
        await super().tick()
        if last:
            self.speech_end = time.monotonic()


def config(account_sid: str, auth_token: str, calls: int, fakes_url: str, mode: str) -> dict[str, Any]:
    return {
        "provider": "twilio", "fromNumber": "+15550001234", "inboundPolicy": "open", "inboundGreeting": "",
        "maxConcurrentCalls": calls + 10, "maxDurationSeconds": 3600,
        # hang-ups at the end go to the fakes' server: an instant 404 (= the call is gone), no retries
        "twilio": {"accountSid": account_sid, "authToken": auth_token, "apiBaseUrl": fakes_url.rsplit("/v1", 1)[0]},
        "streaming": {"enabled": True, "provider": "none", "maxConnections": calls + 10, "bargeIn": False,
                      "maxPendingConnectionsPerIp": 64, "maxPendingConnections": 256},
        "webhookSecurity": {"maxInFlightPerIp": 64},
        "tts": {"provider": "openai", "openai": {"apiKey": "sk-test-123", "baseUrl": fakes_url}},
        "responseModel": "openai/gpt-4o-mini", "responseBaseUrl": fakes_url, "responseApiKey": "sk-test-123",
        "agent": {"responseMode": mode, "consult": False},
    }


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    """The callers (run in their own process): N Twilio streams; each round every caller speaks,
    then waits for the reply to arrive and end; latency = first reply frame - last speech frame."""
    import aiohttp

    speech = caller_frames(SPEECH_S, seed=3)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    clients: list[Caller] = []
    latencies: list[float] = []
    spans: list[list[list[float] | None]] = []  # [client][round]: (last speech frame sent, first reply frame read)
    call_ids: list[str | None] = []  # the bridge's call id of each client (None for a peer)
    missed = 0
    stop = asyncio.Event()

    async def metronome() -> None:
        start, k = time.monotonic(), 0
        while not stop.is_set():
            for client in clients:
                await client.tick()
            k += 1
            await asyncio.sleep(max(0.0, start + k * 0.02 - time.monotonic()))

    def replied(client: Caller) -> bool:
        end = client.speech_end
        return (end is not None and bool(client.recv_times) and client.recv_times[-1] > end
                and time.monotonic() - client.recv_times[-1] > 0.6)

    settle_startup_heap()  # the callers' process too: a long full collection here would count as the bridge's
    ticker = asyncio.ensure_future(metronome())
    try:
        for _ in range(args.calls):
            if args.direct_ws:  # a peer without webhooks: straight to its stream URL
                target = StreamTarget(args.direct_ws, {}, sid("CA"), args.account_sid)
            else:
                target = await inbound_stream(session, args.voice_url, auth_token=args.auth_token,
                                              account_sid=args.account_sid)
            client = Caller(target.url, parameters=target.parameters, call_sid=target.call_sid,
                            account_sid=args.account_sid, session=session)
            await client.connect()
            clients.append(client)
            call_ids.append(target.parameters.get("callId"))
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.5)
        for _ in range(args.rounds):
            async def speak(client: Caller) -> None:
                await asyncio.sleep(random.random() * args.spread_ms / 1000)
                client.speech_end = None
                client.queue_audio(speech, len(speech))

            await asyncio.gather(*(speak(c) for c in clients))
            await asyncio.sleep(SPEECH_S + 0.5)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ROUND_TIMEOUT_S):
                    while not all(replied(c) for c in clients):
                        await asyncio.sleep(0.05)
            for i, client in enumerate(clients):
                end = client.speech_end
                first = next((t for t in client.recv_times if end is not None and t >= end), None)
                if i == len(spans):
                    spans.append([])
                if end is None or first is None:
                    missed += 1
                    spans[i].append(None)
                else:
                    latencies.append((first - end) * 1000)
                    spans[i].append([end, first])
    finally:
        stop.set()
        ticker.cancel()
        await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
        await session.close()
    return {"latencies": latencies, "spans": spans, "missed": missed, "call_ids": call_ids}


def by_round(spans: list[list[list[float] | None]]) -> list[tuple[float, float]]:
    """p50/p99 of each round (the first round also opens every connection to the engines)."""
    rounds = max((len(r) for r in spans), default=0)
    out = []
    for i in range(rounds):
        lat = [(r[i][1] - r[i][0]) * 1000 for r in spans if i < len(r) and r[i] is not None]
        out.append((percentile(lat, 50), percentile(lat, 99)))
    return out


async def run_callers(args: argparse.Namespace, calls: int, cpu: int | None, extra: list[str]) -> dict[str, Any]:
    """The callers' process (`generate`), pinned to `cpu`; its result."""
    root = Path(__file__).resolve().parent.parent
    argv = pinned(cpu, [sys.executable, str(Path(__file__).resolve()), "--generator", "--calls", str(calls),
                        "--rounds", str(args.rounds), "--spread-ms", str(args.spread_ms), *extra])
    proc = await asyncio.create_subprocess_exec(*argv, cwd=root, stdout=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": str(root)})
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the caller process failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def measure(calls: int, mode: str, args: argparse.Namespace, fakes_url: str,
                  generator_cpu: int | None) -> dict[str, Any]:
    from media.tts.factory import create_tts

    if mode == "s2s":
        return await measure_s2s(calls, args, generator_cpu)
    account_sid, auth_token = "AC" + secrets.token_hex(16), secrets.token_hex(16)
    steps = Steps()
    stt = WireStt(args.stt_ms / 1000, steps)
    timings: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-v2v-") as tmp:
        cfg = config(account_sid, auth_token, calls, fakes_url, mode)
        async with run_bridge(cfg, Path(tmp)) as runtime:
            settle_startup_heap()  # what `voicecall serve` does once it is up
            settings = runtime.settings
            tts = create_tts(settings.effective_tts)

            def factory(call: Any, transport: Any, emit: Callable[[CallEvent], None]) -> CallVoice:
                voice = StampedVoice(call_id=call.callId, transport=transport, tts=tts, stt_engine=stt, emit=emit,
                                     pipeline_rate=settings.pipelineSampleRate, barge_in=False,
                                     on_milestone=runtime.monitor.milestone_hook(call.callId),
                                     on_turn_note=runtime.monitor.turn_note_hook(call.callId))
                assert isinstance(voice.stt, _WireSession)
                voice.steps = voice.stt.steps
                voice.tts = TimedTts(tts, voice.steps)
                return voice

            runtime.manager._voice_factory = factory
            if runtime.manager.conversation is not None:
                time_model(runtime.manager.conversation.model, steps)
            lags: list[float] = []
            stop = asyncio.Event()

            async def lag_probe() -> None:  # event-loop health: how late a 10 ms sleep wakes up
                while not stop.is_set():
                    t = time.monotonic()
                    await asyncio.sleep(0.01)
                    lags.append((time.monotonic() - t - 0.01) * 1000)

            probe = asyncio.ensure_future(lag_probe())
            await fake_stats(fakes_url)  # reset
            cpu0, wall0 = time.process_time(), time.monotonic()
            try:
                result = await run_callers(args, calls, generator_cpu, [
                    "--voice-url", settings.publicUrl or "", "--account-sid", account_sid, "--auth-token", auth_token])
            finally:
                stop.set()
                probe.cancel()
                await tts.close()
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            fakes = await fake_stats(fakes_url)
            for call in runtime.manager.calls.values():
                timings += [t.parts() for t in call.turns]  # the bridge's own turn record (bridge/turnmarks.py)
    latencies = result["latencies"]
    text = reply_text(args.reply_tokens)
    floor = floor_ms(mode, args, text)
    above = [x - floor for x in latencies]

    def pct(key: str, q: float) -> float:
        return percentile([t[key] for t in timings if t.get(key) is not None], q)

    return {"mode": mode, "calls": calls, "turns": len(latencies), "missed": result["missed"], "floor_ms": floor,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "above_p50_ms": percentile(above, 50), "above_p99_ms": percentile(above, 99),
            "max_ms": max(latencies) if latencies else float("nan"),
            "turn_parts_ms": {part: {"p50": pct(part, 50), "p99": pct(part, 99)}
                              for part in ("stt", "model", "piece", "tts", "bridge", "total")},
            "fake_first_token_p50_ms": percentile(fakes["chat_first_token_s"], 50) * 1000,
            "fake_first_token_p99_ms": percentile(fakes["chat_first_token_s"], 99) * 1000,
            "fake_tts_first_byte_p50_ms": percentile(fakes["speech_first_byte_s"], 50) * 1000,
            "fake_tts_first_byte_p99_ms": percentile(fakes["speech_first_byte_s"], 99) * 1000,
            "segments_ms": summary(turn_segments(steps, result["spans"], fakes, engine_floor(mode, args, text))),
            "round_p50_p99_ms": by_round(result["spans"]),
            "loop_lag_p99_ms": percentile(lags, 99), "loop_lag_max_ms": max(lags) if lags else float("nan"),
            **cpu_fields(cpu, wall, len(latencies)), "loadavg": loadavg()}


def cpu_fields(cpu_s: float, wall_s: float, turns: int) -> dict[str, float]:
    """The server's CPU over the run: share of one core, and CPU ms per reply heard (CPU time holds on a
    busy machine where wall-clock latencies do not; it covers the whole run, media streams included)."""
    nan = float("nan")
    return {"bridge_cpu_pct": 100 * cpu_s / wall_s if wall_s else nan, "bridge_cpu_s": cpu_s,
            "cpu_ms_per_turn": 1000 * cpu_s / turns if turns else nan}


def s2s_config(account_sid: str, auth_token: str, calls: int, realtime_url: str, silence_ms: int) -> dict[str, Any]:
    return {
        "provider": "twilio", "fromNumber": "+15550001234", "inboundPolicy": "open", "inboundGreeting": "",
        "maxConcurrentCalls": calls + 10, "maxDurationSeconds": 3600,
        "twilio": {"accountSid": account_sid, "authToken": auth_token, "apiBaseUrl": realtime_url.rsplit("/v1", 1)[0]},
        "streaming": {"enabled": True, "provider": "none", "maxConnections": calls + 10,
                      "maxPendingConnectionsPerIp": 64, "maxPendingConnections": 256},
        "webhookSecurity": {"maxInFlightPerIp": 64},
        "tts": {"provider": "espeak"},
        "realtime": {"enabled": True, "provider": "openai", "apiKey": REALTIME_KEY, "baseUrl": realtime_url,
                     "silenceDurationMs": silence_ms, "vadThreshold": S2S_VAD_THRESHOLD},
    }


def s2s_floor_ms(args: argparse.Namespace) -> float:
    """What the realtime fake needs: its VAD's silence before it ends the turn, then its first audio."""
    return args.stt_ms + args.s2s_ms


def s2s_point(name: str, calls: int, args: argparse.Namespace, result: dict[str, Any],
              responses: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any], keys: list[Any]) -> dict[str, Any]:
    """Latency above the floor, and the delta-to-caller span: from the fake handing a reply's first
    audio delta to its socket to the caller reading that reply's first frame (the whole s2s share of
    the server under test). `key(response)` names the caller a response belongs to, `keys[i]` caller i's."""
    by_caller: dict[Any, list[dict[str, Any]]] = {}
    for rec in responses:
        if rec.get("first_delta_at") is not None:
            by_caller.setdefault(key(rec), []).append(rec)
    added: list[float] = []
    for k, rounds in zip(keys, result["spans"], strict=False):
        replies = by_caller.get(k, [])
        for span in rounds:
            if span is None:
                continue
            end, heard = span
            rec = next((r for r in replies if end <= r["first_delta_at"] <= heard), None)
            if rec is not None:
                added.append((heard - rec["first_delta_at"]) * 1000)
    latencies = result["latencies"]
    floor = s2s_floor_ms(args)
    above = [x - floor for x in latencies]
    nan = float("nan")
    return {"mode": name, "calls": calls, "turns": len(latencies), "missed": result["missed"], "floor_ms": floor,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "above_p50_ms": percentile(above, 50), "above_p99_ms": percentile(above, 99),
            "max_ms": max(latencies) if latencies else nan, "delta_to_caller_n": len(added),
            "delta_to_caller_p50_ms": percentile(added, 50), "delta_to_caller_p99_ms": percentile(added, 99),
            "delta_to_caller_max_ms": max(added) if added else nan, "loadavg": loadavg()}


async def realtime_responses(realtime_url: str) -> list[dict[str, Any]]:
    """The realtime fake's responses so far, then forget them."""
    import aiohttp

    base = realtime_url.rsplit("/v1", 1)[0]
    async with aiohttp.ClientSession() as session, session.get(f"{base}/_fake/responses?reset=1") as resp:
        data: list[dict[str, Any]] = await resp.json()
        return data


async def measure_s2s(calls: int, args: argparse.Namespace, generator_cpu: int | None) -> dict[str, Any]:
    """The same callers against the bridge in speech-to-speech mode (RealtimeVoice, pre-warmed on the
    webhook) and the OpenAI Realtime fake. Each call's session is tagged once it is up (a text item
    naming the call), so that the fake's responses pair with the callers exactly."""
    account_sid, auth_token = "AC" + secrets.token_hex(16), secrets.token_hex(16)
    await realtime_responses(args.realtime_url)  # reset
    with tempfile.TemporaryDirectory(prefix="bench-v2v-s2s-") as tmp:
        cfg = s2s_config(account_sid, auth_token, calls, args.realtime_url, int(args.stt_ms))
        async with run_bridge(cfg, Path(tmp)) as runtime:
            settle_startup_heap()  # what `voicecall serve` does once it is up
            manager = runtime.manager
            tagged: set[str] = set()
            stop = asyncio.Event()

            async def tag_sessions() -> None:
                while not stop.is_set():
                    for call_id in list(manager.calls):
                        voice = manager.voice(call_id)
                        connection = getattr(voice, "connection", None)
                        if call_id not in tagged and connection is not None and connection.ready.is_set():
                            tagged.add(call_id)
                            connection.send([{"type": "conversation.item.create", "item": {
                                "type": "message", "role": "user",
                                "content": [{"type": "input_text", "text": f"bench {call_id}"}]}}])
                    await asyncio.sleep(0.05)

            tagger = asyncio.ensure_future(tag_sessions())
            cpu0, wall0 = time.process_time(), time.monotonic()
            try:
                result = await run_callers(args, calls, generator_cpu, [
                    "--voice-url", runtime.settings.publicUrl or "", "--account-sid", account_sid,
                    "--auth-token", auth_token])
            finally:
                stop.set()
                tagger.cancel()
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    responses = await realtime_responses(args.realtime_url)
    point = s2s_point("s2s", calls, args, result, responses, lambda r: r.get("session_text"),
                      [f"bench {c}" for c in result["call_ids"]])
    point.update(cpu_fields(cpu, wall, point["turns"]))
    return point


def measure_pipecat_s2s(calls: int, args: argparse.Namespace, generator_cpu: int | None) -> dict[str, Any]:
    """The same callers against pipecat's OpenAI Realtime service (bench/peers/pipecat_s2s.py) and the
    same fake. pipecat's sessions are paired with the callers by opening order (each caller's stream
    opens, and with it its pipeline and session, before the next caller connects)."""
    root = Path(__file__).resolve().parent.parent
    port = free_port()
    ws_base = args.realtime_url.replace("http://", "ws://", 1) + "/realtime"
    script = root / "bench" / "peers" / "pipecat_s2s.py"
    asyncio.run(realtime_responses(args.realtime_url))  # reset
    with tempfile.TemporaryDirectory(prefix="bench-v2v-pipecat-s2s-") as tmp:
        argv = pinned(args.cpu if args.cpu >= 0 else None, [
            args.pipecat_python, str(script), "--port", str(port), "--realtime-url", ws_base, "--api-key", REALTIME_KEY,
            "--silence-ms", str(int(args.stt_ms)), "--vad-threshold", str(S2S_VAD_THRESHOLD)])
        with Server(argv, log=Path(tmp) / "pipecat.log") as server:
            server.wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
            cpu0, wall0 = cpu_seconds(server.pid), time.monotonic()
            result = asyncio.run(run_callers(args, calls, generator_cpu, [
                "--direct-ws", f"ws://127.0.0.1:{port}/ws", "--account-sid", "AC" + secrets.token_hex(16)]))
            cpu, wall = cpu_seconds(server.pid) - cpu0, time.monotonic() - wall0
            responses = asyncio.run(realtime_responses(args.realtime_url))
    first = min((r["session"] for r in responses), default=0)
    point = s2s_point("pipecat s2s", calls, args, result, responses, lambda r: r["session"] - first,
                      list(range(calls)))
    point.update(cpu_fields(cpu, wall, point["turns"]))
    return point


def measure_pipecat(calls: int, args: argparse.Namespace, fakes_url: str, generator_cpu: int | None) -> dict[str, Any]:
    """The same callers and fakes against pipecat's cascade (bench/peers/pipecat_voice.py, its own venv)."""
    root = Path(__file__).resolve().parent.parent
    port = free_port()
    script = root / "bench" / "peers" / "pipecat_voice.py"
    with tempfile.TemporaryDirectory(prefix="bench-v2v-pipecat-") as tmp:
        argv = pinned(args.cpu if args.cpu >= 0 else None, [args.pipecat_python, str(script), "--port", str(port),
                                                              "--base-url", fakes_url, "--stt-ms", str(args.stt_ms)])
        with Server(argv, log=Path(tmp) / "pipecat.log") as server:
            server.wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
            asyncio.run(fake_stats(fakes_url))  # reset
            cpu0, wall0 = cpu_seconds(server.pid), time.monotonic()
            result = asyncio.run(run_callers(args, calls, generator_cpu, [
                "--direct-ws", f"ws://127.0.0.1:{port}/ws", "--account-sid", "AC" + secrets.token_hex(16)]))
            cpu, wall = cpu_seconds(server.pid) - cpu0, time.monotonic() - wall0
            fakes = asyncio.run(fake_stats(fakes_url))
    latencies = result["latencies"]
    floor = floor_ms("streaming", args, reply_text(args.reply_tokens))
    above = [x - floor for x in latencies]
    nan = float("nan")
    return {"mode": "pipecat", "calls": calls, "turns": len(latencies), "missed": result["missed"], "floor_ms": floor,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "above_p50_ms": percentile(above, 50), "above_p99_ms": percentile(above, 99),
            "max_ms": max(latencies) if latencies else nan,
            "fake_first_token_p50_ms": percentile(fakes["chat_first_token_s"], 50) * 1000,
            "fake_tts_first_byte_p50_ms": percentile(fakes["speech_first_byte_s"], 50) * 1000,
            **cpu_fields(cpu, wall, len(latencies)), "loadavg": loadavg()}


async def fake_stats(url: str) -> dict[str, list[float]]:
    """How long the fakes themselves took (request in -> first token / first audio byte out), then reset."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{url}/_stats?reset=1") as resp:
        data: dict[str, list[float]] = await resp.json()
        return data


def start_fakes(args: argparse.Namespace, cpu: int | None) -> tuple[subprocess.Popen[str], str, str]:
    """The engine fakes in one process: chat + TTS (OpenAI HTTP) and the OpenAI Realtime model."""
    root = Path(__file__).resolve().parent.parent
    delta_s = 0.1 / args.model_speed if args.model_speed > 0 else 0.0  # 100 ms of audio per delta
    argv = pinned(cpu, [sys.executable, "-c", FAKES, str(args.ttft_ms / 1000), str(args.tokens_per_s),
                        str(args.tts_ms / 1000), reply_text(args.reply_tokens), S2S_REPLY,
                        str(args.s2s_ms / 1000), str(delta_s)])
    proc = subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.stdout is not None
    port, rt_port = (int(x) for x in proc.stdout.readline().split())
    return proc, f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{rt_port}/v1"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every mode at every size (+ the peer's rows): the results document."""
    ncpu = os.cpu_count() or 1
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity") and args.cpu < ncpu:
        os.sched_setaffinity(0, {args.cpu})
    # the bridge on --cpu; the engine fakes and the callers (each its own process) on the next one
    fakes_cpu = (args.cpu + 1) % ncpu if args.cpu >= 0 and ncpu > 1 else None
    random.seed(1)
    fakes, url, args.realtime_url = start_fakes(args, fakes_cpu)
    points = []
    try:
        for mode in args.modes.split(","):
            for n in (int(x) for x in args.calls.split(",")):
                started = time.monotonic()
                with asyncio.Runner(loop_factory=event_loop_factory(args.loop)) as runner:  # the loop `serve` picks
                    points.append(runner.run(measure(n, mode, args, url, fakes_cpu)))
                print(f"[v2v] {mode} {n} calls: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        if args.peer == "pipecat":
            peer_modes = [m for m in ("streaming", "s2s") if m in args.modes.split(",")] or ["streaming"]
            for mode in peer_modes:
                for n in (int(x) for x in args.calls.split(",")):
                    started = time.monotonic()
                    points.append(measure_pipecat(n, args, url, fakes_cpu) if mode == "streaming"
                                  else measure_pipecat_s2s(n, args, fakes_cpu))
                    print(f"[v2v] pipecat {mode} {n} calls: {time.monotonic() - started:.0f} s", file=sys.stderr,
                          flush=True)
    finally:
        fakes.terminate()
        fakes.wait(5)
    return {"benchmark": "voice_to_voice", "machine": machine(), "rounds": args.rounds,
            "bridge_loop": "uvloop" if event_loop_factory(args.loop) is not None else "asyncio",
            "engines": {"stt_ms": args.stt_ms, "ttft_ms": args.ttft_ms, "tokens_per_s": args.tokens_per_s,
                        "reply_tokens": args.reply_tokens, "tts_first_byte_ms": args.tts_ms,
                        "s2s_first_audio_ms": args.s2s_ms, "s2s_model_speed": args.model_speed}, "points": points}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", default="1,100")
    parser.add_argument("--modes", default="batch,streaming", help="batch, streaming, s2s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stt-ms", type=float, default=300)
    parser.add_argument("--ttft-ms", type=float, default=400)
    parser.add_argument("--tokens-per-s", type=float, default=40)
    parser.add_argument("--reply-tokens", type=int, default=25)
    parser.add_argument("--tts-ms", type=float, default=200)
    parser.add_argument("--s2s-ms", type=float, default=400,
                        help="speech-to-speech: the realtime model's first audio after its VAD decided the turn ended")
    parser.add_argument("--model-speed", type=float, default=4.0,
                        help="speech-to-speech: seconds of reply audio the model streams per second (0: all at once)")
    parser.add_argument("--cpu", type=int, default=0, help="pin the bridge to this CPU, the fakes to the next (-1: no)")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                        help="the bridge's event loop (auto: uvloop when installed, as `voicecall serve` does)")
    parser.add_argument("--spread-ms", type=float, default=200, help="callers start speaking within this window")
    parser.add_argument("--timeline", action="store_true", help="also print where a streaming turn's time goes")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--voice-url", help=argparse.SUPPRESS)
    parser.add_argument("--account-sid", help=argparse.SUPPRESS)
    parser.add_argument("--auth-token", help=argparse.SUPPRESS)
    parser.add_argument("--direct-ws", help=argparse.SUPPRESS)
    parser.add_argument("--peer", choices=["pipecat"], help="also run the streaming scenario against this peer")
    parser.add_argument("--pipecat-python", default=os.environ.get("PIPECAT_PYTHON", DEFAULT_PIPECAT_PY))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.generator:
        args.calls = int(args.calls)
        random.seed(2)
        with asyncio.Runner(loop_factory=event_loop_factory("auto")) as runner:  # a light loop for the callers too
            print(json.dumps(runner.run(generate(args))))
        return 0
    data = run(args)
    points = data["points"]

    def delta(p: dict[str, Any]) -> str:
        return f"{p['delta_to_caller_p50_ms']:.1f}/{p['delta_to_caller_p99_ms']:.1f}" if "delta_to_caller_p50_ms" in p else "-"

    print(table(["mode", "calls", "turns", "missed", "floor", "p50", "p99", "above p50", "above p99", "max",
                 "s2s added p50/p99", "server cpu %", "cpu ms/turn", "load1"],
                [[p["mode"], p["calls"], p["turns"], p["missed"], p["floor_ms"], p["p50_ms"], p["p99_ms"],
                  p["above_p50_ms"], p["above_p99_ms"], p["max_ms"], delta(p), p["bridge_cpu_pct"], p["cpu_ms_per_turn"], p["loadavg"][0]]
                 for p in points]))
    print("(ms from the caller's last speech frame to the first reply frame it receives; floor: the engines alone;"
          " s2s added: from the model's first audio delta leaving the fake to the caller reading it)")
    timed = [p for p in points if p.get("segments_ms") and p["segments_ms"]["play"]["n"]]
    if timed and args.timeline:
        print("\nwhere a turn's time goes (ms p50/p99 per segment; bench/turn_timeline.py):")
        print(table(["mode", "calls", *SEGMENTS, *SUMS],
                    [[p["mode"], p["calls"], *(f"{p['segments_ms'][k]['p50']:.0f}/{p['segments_ms'][k]['p99']:.0f}"
                                              for k in (*SEGMENTS, *SUMS) if k in p["segments_ms"])]
                     for p in timed]))
        print("(bridge: the time above the floor the bridge's own steps took, per turn; harness: the fakes' and"
              " callers' lateness; bench/turn_timeline.py)")
    return finish("voice_to_voice", data, args)


if __name__ == "__main__":
    sys.exit(main())
