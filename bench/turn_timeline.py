"""Where a voice-to-voice turn's time goes, across the processes of bench/voice_to_voice.py.

Every process stamps its steps with time.monotonic() (CLOCK_MONOTONIC: one clock for all processes
on the machine; not uvloop's loop.time(), which is cached per loop iteration in whole ms): the
callers (last speech frame sent, first reply frame read), the bridge
(per call: final transcript, chat request out, first token read, each TTS request out and its first
byte read, first reply frame written) and the fakes (request in, first token / first audio byte
out). Requests are matched exactly: the bench STT puts the call's number and the line's number in
the caller's words (so in the chat request), and the bench wraps each call's TTS engine so that
its requests carry `(call N request K)` after the text (two words more of fake audio).

The segments, in turn order, and whose time each one is:
  stt        caller's last frame -> final transcript in the bridge  (the STT fake's delay + inbound path)
  to_model   final -> chat request out                              (bridge)
  model_in   request out -> in at the fake                          (sockets + the fakes' loop)
  model      fake: request in -> first token out                    (the model fake's time to first token)
  model_out  first token out -> read by the bridge                  (sockets + the bridge's loop)
  piece      first token read -> first piece's TTS request out      (tokens until the first piece; bridge)
  tts_in     TTS request out -> in at the fake                      (sockets + the fakes' loop)
  tts        fake: request in -> first audio byte out               (the TTS fake's first byte)
  tts_out    first byte out -> read by the bridge                   (sockets + the bridge's loop)
  play       first byte read -> first reply frame written           (bridge: resample, encode, pace)
  to_caller  frame written -> read by the caller                    (sockets + the callers' loop)

Two sums per turn split the time above the floor between the bridge and the harness (the fakes and
the callers, which share the other CPU):
  bridge     the STT timer's lateness + to_model + model_out + the first piece's lateness (tokens
             read after their due time, whoever made them late) + tts_out + play
  harness    model_in + the model fake's lateness + tts_in + the TTS fake's lateness + to_caller
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.conversation.chat import ChatModel, ReplyStream
from media.tts.base import TtsEngine
from tests.fakes.stream_load import percentile

SEGMENTS = ("stt", "to_model", "model_in", "model", "model_out", "piece", "tts_in", "tts", "tts_out", "play",
            "to_caller")
_CHAT_TAG = re.compile(r"line (\d+), call (\d+)\b")
_TTS_TAG = re.compile(r"\(call (\d+) request (\d+)\)$")


def chat_tag(call: int, line: int) -> str:
    return f"line {line}, call {call}"


@dataclass
class CallSteps:
    """One bridge call's step times (loop time)."""

    number: int
    final: list[float] = field(default_factory=list)
    chat_out: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    tts_out: list[float] = field(default_factory=list)  # by request number
    tts_first_byte: dict[int, float] = field(default_factory=dict)
    frame_out: list[float] = field(default_factory=list)


class Steps:
    """All calls' steps; calls are numbered in the order their STT session opened (= the callers' order)."""

    def __init__(self) -> None:
        self.calls: list[CallSteps] = []

    def new_call(self) -> CallSteps:
        self.calls.append(CallSteps(len(self.calls)))
        return self.calls[-1]

    def of_messages(self, messages: Sequence[dict[str, Any]]) -> CallSteps | None:
        last = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
        match = _CHAT_TAG.search(last)
        return self.calls[int(match.group(2))] if match else None


class TimedReply(ReplyStream):
    """A model reply that stamps its first text delta."""

    def __init__(self, inner: ReplyStream, steps: CallSteps | None) -> None:
        self.inner = inner
        self.steps = steps

    @property  # type: ignore[override]
    def tool_calls(self) -> list[Any]:
        return self.inner.tool_calls

    @property  # type: ignore[override]
    def finish_reason(self) -> str | None:
        return self.inner.finish_reason

    async def __aiter__(self) -> AsyncIterator[str]:  # type: ignore[override]
        first = True
        async for delta in self.inner:
            if first and self.steps is not None:
                first = False
                self.steps.first_token.append(time.monotonic())
            yield delta

    async def aclose(self) -> None:
        await self.inner.aclose()


def time_model(model: ChatModel, steps: Steps) -> None:
    """Stamp the chat requests of `model` (the running conversation engine's) per call."""
    inner = model.stream

    async def stream(messages: Sequence[dict[str, Any]], tools: Sequence[Any]) -> ReplyStream:
        call = steps.of_messages(messages)
        if call is not None:
            call.chat_out.append(time.monotonic())
        return TimedReply(await inner(messages, tools), call)

    model.stream = stream  # type: ignore[method-assign]


class TimedTts(TtsEngine):
    """A call's TTS engine that tags and stamps each request and its first audio byte."""

    def __init__(self, inner: TtsEngine, steps: CallSteps) -> None:
        self.inner = inner
        self.steps = steps
        self.name = inner.name
        self.sample_rate = inner.sample_rate

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        k = len(self.steps.tts_out)
        self.steps.tts_out.append(time.monotonic())
        first = True
        async for chunk in self.inner.synthesize(f"{text} (call {self.steps.number} request {k})"):
            if first and chunk:
                first = False
                self.steps.tts_first_byte[k] = time.monotonic()
            yield chunk


def _after(times: Sequence[float], t: float) -> tuple[int, float] | None:
    return next(((i, x) for i, x in enumerate(times) if x >= t), None)


SUMS = ("bridge", "harness")


@dataclass(frozen=True)
class EngineFloor:
    """What each engine fake is set to take (ms): the STT final, the first token, the tokens until the
    first piece is complete, the TTS first byte."""

    stt: float
    model: float
    piece: float
    tts: float


def turn_segments(steps: Steps, spans: list[list[list[float] | None]], fakes: dict[str, Any],
                  floor: EngineFloor | None = None) -> dict[str, list[float]]:
    """Each segment's durations in ms, over the turns whose every step was seen (and, given the engines'
    `floor`, the per-turn sums in SUMS). `spans[call][round]`: the caller's (last speech frame sent,
    first reply frame read)."""
    chat: dict[tuple[int, int], tuple[float, float]] = {}
    for started, first, text in fakes.get("chat_times", []):
        if (m := _CHAT_TAG.search(text)) is not None:
            chat[(int(m.group(2)), int(m.group(1)))] = (started, first)
    speech: dict[tuple[int, int], tuple[float, float]] = {}
    for arrived, first, text in fakes.get("speech_times", []):
        if (m := _TTS_TAG.search(text)) is not None:
            speech[(int(m.group(1)), int(m.group(2)))] = (arrived, first)
    out: dict[str, list[float]] = {name: [] for name in SEGMENTS}
    for call, rounds in zip(steps.calls, spans, strict=False):
        for span in rounds:
            if span is None:
                continue
            end, heard = span
            final = _after(call.final, end)
            if final is None:
                continue
            line, t_final = final[0] + 1, final[1]
            chat_out = _after(call.chat_out, t_final)
            first_token = _after(call.first_token, t_final)
            tts = _after(call.tts_out, t_final)
            model = chat.get((call.number, line))
            if chat_out is None or first_token is None or tts is None or model is None:
                continue
            k, t_tts = tts
            fake_tts = speech.get((call.number, k))
            byte = call.tts_first_byte.get(k)
            frame = _after(call.frame_out, byte) if byte is not None else None
            if fake_tts is None or byte is None or frame is None:
                continue
            parts = {"stt": t_final - end, "to_model": chat_out[1] - t_final, "model_in": model[0] - chat_out[1],
                     "model": model[1] - model[0], "model_out": first_token[1] - model[1],
                     "piece": t_tts - first_token[1], "tts_in": fake_tts[0] - t_tts, "tts": fake_tts[1] - fake_tts[0],
                     "tts_out": byte - fake_tts[1], "play": frame[1] - byte, "to_caller": heard - frame[1]}
            for name, value in parts.items():
                out[name].append(value * 1000)
            if floor is not None:
                ms = {name: value * 1000 for name, value in parts.items()}
                out.setdefault("bridge", []).append(
                    ms["stt"] - floor.stt + ms["to_model"] + ms["model_out"] + ms["piece"] - floor.piece
                    + ms["tts_out"] + ms["play"])
                out.setdefault("harness", []).append(
                    ms["model_in"] + ms["model"] - floor.model + ms["tts_in"] + ms["tts"] - floor.tts + ms["to_caller"])
    return out


def summary(durations: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": float(len(v))} for k, v in durations.items()}
