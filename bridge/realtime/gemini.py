"""Gemini Live (BidiGenerateContent over WebSocket): the wire protocol, sans I/O.

Audio goes up as 16 kHz PCM16 (`realtimeInput.audio`) and comes back as 24 kHz PCM16
(`serverContent.modelTurn` inline data). Gemini has no item ids: each model turn (up to
`turnComplete` or `interrupted`) gets a local id. `interrupted` is Gemini's barge-in; the server
drops the unheard rest of the turn itself, so there is no truncate message to send. The newest
`sessionResumptionUpdate` handle goes into the `setup` of every reconnect, so a `goAway` or a
dropped socket continues the same conversation.

Why not `google-genai`'s live client: it converts every message through its pydantic types and
owns the socket, while the bridge needs to open the replacement connection itself (goAway
hand-over with the newest handle, while the old one still plays out); the JSON here follows that
SDK's converters (`_live_converters.py`), camelCase as the server sends it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.realtime import events as ev
from bridge.realtime.openai import flat_tool
from media.urls import websocket_url

DEFAULT_BASE_URL = "wss://generativelanguage.googleapis.com"
DEFAULT_MODEL = "gemini-2.5-flash-native-audio-preview-12-2025"
INPUT_RATE = 16000
OUTPUT_RATE = 24000
_AUDIO_HEAD = b'{"realtimeInput":{"audio":{"data":"'
_AUDIO_TAIL = f'","mimeType":"audio/pcm;rate={INPUT_RATE}"}}}}}}'.encode()
_METHOD = "ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"


@dataclass(frozen=True, slots=True)
class GeminiLiveOptions:
    api_key: str
    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    voice: str = "Charon"
    instructions: str = ""
    interrupt: bool = True  # START_OF_ACTIVITY_INTERRUPTS, or NO_INTERRUPTION when barge-in is off
    tools: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def __repr__(self) -> str:  # never show the key
        return f"GeminiLiveOptions(base_url={self.base_url!r}, model={self.model!r})"


def live_url(base_url: str) -> str:
    return websocket_url(base_url, _METHOD)


def parse_duration(value: Any) -> float:
    """A proto Duration in JSON (`"10s"`, `"1.5s"`) -> seconds; 0 when unreadable."""
    try:
        return float(str(value).removesuffix("s"))
    except ValueError:
        return 0.0


class GeminiLiveProtocol:
    name = "gemini"
    wire_passthrough = False
    reports_speech_end = False
    input_rate = INPUT_RATE
    output_rate = OUTPUT_RATE

    def __init__(self, options: GeminiLiveOptions, tools: Sequence[dict[str, Any]] = ()) -> None:
        self.options = options
        self.tools = [flat_tool(t) for t in (*options.tools, *tools)]
        self.url = live_url(options.base_url)
        self.headers = {"x-goog-api-key": options.api_key}
        self.resume_handle: str | None = None
        self._turns = 0
        self._turn: str | None = None  # the model turn being received
        self._turn_audio_done = False
        self._bot_text = ""
        self._user_text = ""
        self._says: deque[str] = deque()  # say tags waiting for their model turn

    # ------------------------------------------------------------------ client messages

    def opening(self) -> list[dict[str, Any]]:
        o = self.options
        model = o.model if o.model.startswith("models/") else f"models/{o.model}"
        setup: dict[str, Any] = {
            "model": model,
            "generationConfig": {"responseModalities": ["AUDIO"],
                                 "speechConfig": {"voiceConfig": {"prebuiltVoiceConfig": {"voiceName": o.voice}}}},
            "realtimeInputConfig": {"automaticActivityDetection": {"disabled": False},
                                    "activityHandling": "START_OF_ACTIVITY_INTERRUPTS" if o.interrupt
                                    else "NO_INTERRUPTION"},
            "inputAudioTranscription": {},
            "outputAudioTranscription": {},
            "sessionResumption": {"handle": self.resume_handle} if self.resume_handle else {},
        }
        if o.instructions:
            setup["systemInstruction"] = {"parts": [{"text": o.instructions}]}
        if self.tools:
            setup["tools"] = [{"functionDeclarations": [
                {"name": t["name"], "description": t["description"], "parametersJsonSchema": t["parameters"]}
                for t in self.tools]}]
        return [{"setup": setup}]

    def link_lost(self) -> None:
        """The socket dropped (not a goAway hand-over): a turn it was sending will not continue."""
        self._turn = None
        self._bot_text = self._user_text = ""

    def items_lost(self, item_ids: set[str]) -> None:
        """A retired socket closed; if it was sending the current turn, that turn is over."""
        if self._turn in item_ids:
            self.link_lost()

    def set_wire(self, wire: object) -> list[dict[str, Any]]:
        return []  # Gemini's formats do not depend on the carrier

    def audio(self, chunk: bytes) -> dict[str, Any]:
        return {"realtimeInput": {"audio": {"data": base64.b64encode(chunk).decode("ascii"),
                                            "mimeType": f"audio/pcm;rate={INPUT_RATE}"}}}

    def audio_json(self, chunk: bytes) -> bytes:
        """`audio(chunk)` as JSON text (UTF-8), built around the base64 without a dict or json.dumps."""
        return _AUDIO_HEAD + binascii.b2a_base64(chunk, newline=False) + _AUDIO_TAIL

    def decode_output(self, audio: bytes) -> bytes:
        return audio

    def say(self, text: str, tag: str) -> list[dict[str, Any]]:
        self._says.append(tag)
        prompt = f"Say exactly the following to the caller, word for word, and nothing else: {text}"
        return [{"clientContent": {"turns": [{"role": "user", "parts": [{"text": prompt}]}], "turnComplete": True}}]

    def user_text(self, text: str) -> list[dict[str, Any]]:
        return [{"realtimeInput": {"text": text}}]

    def tool_result(self, call_id: str, name: str, output: str) -> list[dict[str, Any]]:
        return [{"toolResponse": {"functionResponses": [{"id": call_id, "name": name, "response": {"result": output}}]}}]

    def truncate(self, item_id: str, audio_end_ms: int) -> list[dict[str, Any]]:
        return []

    def cancel(self) -> list[dict[str, Any]]:
        return []

    # ------------------------------------------------------------------ server messages

    def handle(self, msg: dict[str, Any]) -> list[ev.RealtimeEvent]:
        out: list[ev.RealtimeEvent] = []
        if "setupComplete" in msg:
            out.append(ev.Ready())
        update = msg.get("sessionResumptionUpdate")
        if isinstance(update, dict) and update.get("resumable", True) and update.get("newHandle"):
            self.resume_handle = str(update["newHandle"])
        content = msg.get("serverContent")
        if isinstance(content, dict):
            out += self._content(content)
        call = msg.get("toolCall")
        if isinstance(call, dict):
            for fc in call.get("functionCalls") or []:
                out.append(ev.ToolCall(str(fc.get("id", "")), str(fc.get("name", "")), json.dumps(fc.get("args") or {})))
        cancelled = msg.get("toolCallCancellation")
        if isinstance(cancelled, dict):
            out.append(ev.ToolCancelled(tuple(str(i) for i in cancelled.get("ids") or [])))
        go_away = msg.get("goAway")
        if isinstance(go_away, dict):
            out.append(ev.GoAway(parse_duration(go_away.get("timeLeft", "0s"))))
        return out

    def _content(self, content: dict[str, Any]) -> list[ev.RealtimeEvent]:
        out: list[ev.RealtimeEvent] = []
        heard = content.get("inputTranscription")
        if isinstance(heard, dict):
            self._user_text += str(heard.get("text", ""))
            if heard.get("finished"):
                out += self._user_final()
            elif self._user_text.strip():
                out.append(ev.UserTranscript(self._user_text.strip(), final=False))
        if content.get("interrupted"):
            out.append(ev.SpeechStarted())
            out += self._end_turn("cancelled")
        said = content.get("outputTranscription")
        if isinstance(said, dict):
            self._bot_text += str(said.get("text", ""))
        turn = content.get("modelTurn")
        if isinstance(turn, dict):
            for part in turn.get("parts") or []:
                data = (part.get("inlineData") or {}) if isinstance(part, dict) else {}
                if data.get("data") and str(data.get("mimeType", "audio/pcm")).startswith("audio/pcm"):
                    if self._turn is None:
                        out += self._user_final()
                        self._turns += 1
                        self._turn = f"turn-{self._turns}"
                        self._turn_audio_done = False
                        out.append(ev.ResponseStarted(self._turn, self._says.popleft() if self._says else None))
                    out.append(ev.AudioOut(self._turn, base64.b64decode(data["data"]), self._turn))
        if content.get("generationComplete") and self._turn is not None and not self._turn_audio_done:
            self._turn_audio_done = True
            out.append(ev.AudioDone(self._turn))
        if content.get("turnComplete"):
            out += self._end_turn("completed")
        return out

    def _user_final(self) -> list[ev.RealtimeEvent]:
        text, self._user_text = self._user_text.strip(), ""
        return [ev.UserTranscript(text, final=True)] if text else []

    def _end_turn(self, status: str) -> list[ev.RealtimeEvent]:
        turn, self._turn = self._turn, None
        text, self._bot_text = self._bot_text.strip(), ""
        if turn is None:
            return []
        out: list[ev.RealtimeEvent] = []
        if not self._turn_audio_done:
            out.append(ev.AudioDone(turn))
        if text:
            out.append(ev.BotTranscript(turn, text))
        out.append(ev.ResponseDone(turn, status))
        return out
