"""Streaming reply turns (the cascade): final transcript -> chat model stream (with tools) ->
speakable pieces -> TTS per piece -> one gap-free play; tool calls run as soon as the model's
stream ends; barge-in stops everything and keeps what was heard."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from bridge.calls import (
    CallRecord,
    CallState,
    ToolCallEntry,
    TranscriptEntry,
)
from bridge.conversation.chat import ChatModel, ChatModelError, ReplyStream
from bridge.conversation.messages import chat_messages
from bridge.conversation.segmenter import Segmenter, speakable
from bridge.conversation.speech import SpeechMarks, StreamedSpeech, speak_stream
from bridge.conversation.tools import CallToolbox, ToolCall, ToolOutcome, ToolSettings
from bridge.transfer.tool import register_transfer_tool
from media.clock import Clock

log = logging.getLogger(__name__)

INTERRUPTED_RESULT = "cancelled: the caller interrupted before this finished"


@dataclass
class ConversationSettings:
    system_prompt: str
    apology: str = "Sorry, I'm having trouble right now."
    on_failure: str = "apologize"  # apologize | hangup
    max_failures: int = 2  # consecutive failed turns before the call is ended
    max_tool_rounds: int = 4
    min_clause_chars: int = 30
    tools: ToolSettings | None = None


class TurnHost(Protocol):
    """What a turn needs of the call's owner (the CallManager)."""

    clock: Clock

    def voice(self, call_id: str) -> Any: ...

    def transition(self, call: CallRecord, state: CallState) -> bool: ...

    def save(self, call: CallRecord) -> None: ...

    def publish(self, kind: str, call: CallRecord, **extra: Any) -> None: ...

    async def say(self, call: CallRecord, text: str) -> None: ...

    async def hangup(self, call: CallRecord) -> None: ...

    async def send_dtmf(self, call_id: str, digits: str) -> None: ...

    async def consult(self, call_id: str, question: str) -> str: ...

    def say_filler(self, call_id: str, text: str) -> Awaitable[None]: ...


class ConversationEngine:
    def __init__(self, model: ChatModel, settings: ConversationSettings) -> None:
        self.model = model
        self.settings = settings
        self.tool_settings = settings.tools or ToolSettings()
        self._toolboxes: dict[str, CallToolbox] = {}

    def toolbox(self, call_id: str, host: TurnHost) -> CallToolbox:
        box = self._toolboxes.get(call_id)
        if box is None:
            box = self._toolboxes[call_id] = CallToolbox(call_id, host, self.tool_settings, clock=host.clock)
            transfers = getattr(host, "transfers", None)  # the manager's TransferController
            if transfers is not None:
                register_transfer_tool(box, transfers)
        return box

    def forget(self, call_id: str) -> None:
        self._toolboxes.pop(call_id, None)

    def prewarm(self, call: CallRecord) -> None:
        """The call rings: the model opens its connection for the first turn."""
        self.model.prewarm()

    async def close(self) -> None:
        await self.model.close()
        if self.tool_settings.session is not None:
            await self.tool_settings.session.close()

    # ------------------------------------------------------------------ one reply turn

    async def respond(self, call: CallRecord, host: TurnHost) -> None:
        """Answer the caller's last words (the turn's timing is the monitor's: bridge/turnmarks.py)."""
        voice = host.voice(call.callId)
        if voice is not None:
            voice.note_turn(mode="streaming")
        box = self.toolbox(call.callId, host)
        for _ in range(self.settings.max_tool_rounds + 1):
            if call.terminal:
                return
            try:
                stream = await self.model.stream(chat_messages(call, self.settings.system_prompt), box.specs())
            except ChatModelError as exc:
                await self.failed(call, host, str(exc))
                return
            outcome = await self._one_reply(call, host, stream, box)
            if outcome is None:
                return
            if call.state == CallState.TRANSFERRING:
                return  # handed to a person (relayed) or being handed over: the model stays quiet
            if any(o.end_call for o in outcome):
                if not call.terminal:
                    await host.hangup(call)
                return
            if not outcome:
                break
        call.metadata["conversationFailures"] = 0
        if not call.terminal:
            host.transition(call, CallState.LISTENING)
            host.save(call)

    async def _one_reply(self, call: CallRecord, host: TurnHost, stream: ReplyStream,
                         box: CallToolbox) -> list[ToolOutcome] | None:
        """Speak one model reply and run its tools. None: the turn is over (interrupted or failed)."""
        clock = host.clock
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[ToolCall]] = loop.create_future()
        entry: TranscriptEntry | None = None

        def mark(milestone: str) -> None:  # the monitor's turn timing (the earliest report of a milestone wins)
            if voice is not None:
                voice.mark(milestone)

        def on_piece(text: str) -> None:
            nonlocal entry
            if entry is None:
                entry = TranscriptEntry(clock.time(), "bot", text)
                call.transcript.append(entry)
                mark("firstPiece")
            else:
                entry.text += " " + text
            host.publish("call.speaking", call, text=text)

        def first_byte() -> None:
            mark("ttsFirstByte")

        first_token_seen = False

        def first_token() -> None:
            nonlocal first_token_seen
            if not first_token_seen:
                first_token_seen = True
                mark("modelFirstToken")

        pieces = self._pieces(stream, done, first_token)
        host.transition(call, CallState.SPEAKING)
        voice = host.voice(call.callId)
        if voice is None:
            speech = asyncio.ensure_future(self._speak_without_media(call, host, pieces))
        else:
            speech = asyncio.ensure_future(speak_stream(voice.bridge, voice.tts, pieces, SpeechMarks(on_piece, first_byte)))
        tools: list[tuple[ToolCall, asyncio.Task[ToolOutcome]]] = []

        started: set[int] = set()

        def start_tools(speech_over: bool = False) -> None:
            """Tools start as soon as the model's reply is complete; those that change the line
            (transfer_call) wait until the caller heard the words before them."""
            if not done.done() or done.cancelled():
                return
            for index, c in enumerate(done.result()):
                if index in started or (box.after_speech(c.name) and not speech_over):
                    continue
                started.add(index)
                tools.append((c, asyncio.ensure_future(box.run(c))))

        try:
            await asyncio.wait([speech, done], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
            start_tools()
            spoken = await speech
            start_tools(speech_over=not spoken.interrupted and spoken.error is None)
        except asyncio.CancelledError:
            for _, task in tools:
                task.cancel()
            if entry is not None:  # superseded: keep what was heard if we know it
                entry.text = speech.result().heard_text if speech.done() and not speech.cancelled() \
                    and speech.exception() is None else ""
            speech.cancel()
            raise
        finally:
            if not done.done():
                done.cancel()
        if entry is not None:
            entry.text = spoken.text if not (spoken.interrupted or spoken.error) else spoken.heard_text
        if spoken.interrupted and voice is not None:
            voice.note_turn(interrupted=True)
        if spoken.interrupted:
            for _, task in tools:
                task.cancel()
        outcomes: list[ToolOutcome] = []
        for _, task in tools:
            try:
                outcomes.append(await task)
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
                outcomes.append(ToolOutcome(INTERRUPTED_RESULT))
        # The calls sit after everything said so far, fillers included: the model's own reply text or
        # a filler then carries the `tool_calls`, and the results follow it directly.
        position = len(call.transcript)
        with_text = bool(call.transcript) and call.transcript[-1].speaker == "bot"
        for (tool_call, _), result in zip(tools, outcomes):
            self.record_tool(call, host, tool_call, result, position, with_text)
        if tools or spoken.interrupted or spoken.error is not None:
            host.save(call)  # a plain reply is saved once, when the turn ends
        if spoken.error is not None:
            await self.failed(call, host, _describe(spoken.error))
            return None
        if spoken.interrupted:
            log.info("call %s: reply interrupted after %.0f ms; kept %r", call.callId, spoken.heard_ms,
                     spoken.heard_text[:60])
            if not call.terminal:
                host.transition(call, CallState.LISTENING)
            return None
        return outcomes

    async def _pieces(self, stream: ReplyStream, done: asyncio.Future[list[ToolCall]],
                      first_token: Any) -> AsyncIterator[str]:
        segmenter = Segmenter(min_clause_chars=self.settings.min_clause_chars)
        try:
            async for delta in stream:
                first_token()
                for piece in segmenter.push(delta):
                    if speakable(piece):
                        yield speakable(piece)
            for piece in segmenter.flush():
                if speakable(piece):
                    yield speakable(piece)
            if not done.done():
                done.set_result(list(stream.tool_calls))
        finally:
            await stream.aclose()  # no-op after a complete reply; closes the HTTP stream otherwise

    async def _speak_without_media(self, call: CallRecord, host: TurnHost, pieces: AsyncIterator[str]) -> StreamedSpeech:
        """Carriers that speak for us (no media stream): say the whole reply at once."""
        text = " ".join([p async for p in pieces])
        if text:
            await host.say(call, text)
        return StreamedSpeech(text, text, False, 0.0, 1 if text else 0)

    def record_tool(self, call: CallRecord, host: TurnHost, tool_call: ToolCall, outcome: ToolOutcome,
                    position: int, with_text: bool) -> None:
        """A tool call in the call record, the events and the log (speech-to-speech uses it too)."""
        call.toolCalls.append(ToolCallEntry(at=host.clock.time(), id=tool_call.id, name=tool_call.name,
                                            arguments=tool_call.arguments, result=outcome.content, position=position,
                                            withText=with_text, endCall=outcome.end_call))
        host.publish("call.tool", call, name=tool_call.name, toolCallId=tool_call.id,
                     arguments=tool_call.arguments, result=outcome.content)
        log.info("call %s: tool %s -> %s", call.callId, tool_call.name, outcome.content[:80])

    # ------------------------------------------------------------------ failures

    async def failed(self, call: CallRecord, host: TurnHost, error: str) -> None:
        """Never a silent line: say the apology, or hang up cleanly; either way it is in the call log."""
        log.warning("call %s: reply failed: %s", call.callId, error)
        failures = int(call.metadata.get("conversationFailures", 0)) + 1
        call.metadata["conversationFailures"] = failures
        errors = call.metadata.setdefault("conversationErrors", [])
        action = "hangup" if (self.settings.on_failure == "hangup" or failures >= self.settings.max_failures) \
            else "apologize"
        errors.append({"at": host.clock.time(), "error": error, "action": action})
        del errors[:-20]
        host.save(call)
        host.publish("call.error", call, error=error, action=action)
        if call.terminal:
            return
        if self.settings.apology:
            try:
                await host.say(call, self.settings.apology)
            except Exception as exc:  # noqa: BLE001 - the voice itself is broken: hang up instead
                log.warning("call %s: apology not spoken (%s); hanging up", call.callId, _describe(exc))
                action = "hangup"
                errors[-1]["action"] = action
        if call.terminal:
            return
        if action == "hangup":
            await host.hangup(call)
        else:
            host.transition(call, CallState.LISTENING)
            host.save(call)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__
