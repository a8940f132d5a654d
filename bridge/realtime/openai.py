"""OpenAI Realtime (GA) speech-to-speech: the wire protocol, sans I/O (dicts in, events/dicts out).

Formats: when the carrier's wire is G.711 at 8 kHz the session takes and returns `audio/pcmu` (or
`audio/pcma`), so the caller's payloads go up untouched and the model's come back ready for the
wire, with no resampling either way; otherwise `audio/pcm` at 24 kHz (the only PCM rate the GA API
accepts). Turn-taking is server VAD (`create_response` and `interrupt_response` on).

Why the wire is written here and not with the `openai` package's realtime client: that client
parses every server event into pydantic models, `response.output_audio.delta` included, which
arrive every 20-40 ms per call; the bridge needs four fields of a handful of event types, and
the connection edge (`connection.py`) must own reconnects and the hand-over between sockets.
The JSON shapes follow the SDK's GA types (`types/realtime/*`), and the base URL is configurable
so tests point this at the local fake.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.realtime import events as ev
from media import g711
from media.formats import AudioEncoding, AudioFormat
from media.urls import websocket_url

DEFAULT_BASE_URL = "wss://api.openai.com/v1"
DEFAULT_MODEL = "gpt-realtime"
PCM_RATE = 24000
_APPEND_HEAD = b'{"type":"input_audio_buffer.append","audio":"'
_G711 = {AudioEncoding.PCMU: "audio/pcmu", AudioEncoding.PCMA: "audio/pcma"}


@dataclass(frozen=True, slots=True)
class OpenAiRealtimeOptions:
    api_key: str
    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    voice: str = "marin"
    instructions: str = ""
    transcription_model: str | None = "gpt-4o-mini-transcribe"
    vad_threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    interrupt_response: bool = True  # off when the deployment disables barge-in
    tools: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAiRealtimeOptions(base_url={self.base_url!r}, model={self.model!r})"


def realtime_url(base_url: str, model: str) -> str:
    return websocket_url(base_url, "realtime", {"model": model})


def flat_tool(spec: dict[str, Any]) -> dict[str, Any]:
    """A tool spec in OpenAI function style (flat, or nested as Chat Completions has it) -> the
    Realtime session's flat `{"type":"function", name, description, parameters}`."""
    nested = spec.get("function")
    fn: dict[str, Any] = nested if isinstance(nested, dict) else spec
    return {"type": "function", "name": fn["name"], "description": fn.get("description", ""),
            "parameters": fn.get("parameters") or {"type": "object", "properties": {}}}


class OpenAiRealtimeProtocol:
    name = "openai"
    reports_speech_end = True

    def __init__(self, options: OpenAiRealtimeOptions, wire: AudioFormat | None = None,
                 tools: Sequence[dict[str, Any]] = ()) -> None:
        self.options = options
        self.tools = [flat_tool(t) for t in (*options.tools, *tools)]
        self.url = realtime_url(options.base_url, options.model)
        self.headers = {"Authorization": f"Bearer {options.api_key}"}
        self._user_partials: dict[str, str] = {}
        self._bot_text: dict[str, str] = {}
        self._set_formats(wire)

    def _set_formats(self, wire: AudioFormat | None) -> None:
        g711_fmt = _G711.get(wire.encoding) if wire is not None and wire.rate == 8000 else None
        self.wire_passthrough = g711_fmt is not None
        self.format = g711_fmt or "audio/pcm"
        self._encoding = wire.encoding if wire is not None and g711_fmt else None
        self.input_rate = 8000 if g711_fmt else PCM_RATE
        self.output_rate = self.input_rate

    def _format_obj(self) -> dict[str, Any]:
        return {"type": self.format} if self.wire_passthrough else {"type": "audio/pcm", "rate": PCM_RATE}

    # ------------------------------------------------------------------ client messages

    def opening(self) -> list[dict[str, Any]]:
        return [self.session_update()]

    def session_update(self) -> dict[str, Any]:
        o = self.options
        audio_in: dict[str, Any] = {
            "format": self._format_obj(),
            "turn_detection": {"type": "server_vad", "threshold": o.vad_threshold,
                               "prefix_padding_ms": o.prefix_padding_ms, "silence_duration_ms": o.silence_duration_ms,
                               "create_response": True, "interrupt_response": o.interrupt_response},
        }
        if o.transcription_model:
            audio_in["transcription"] = {"model": o.transcription_model}
        session: dict[str, Any] = {
            "type": "realtime",
            "output_modalities": ["audio"],
            "audio": {"input": audio_in, "output": {"format": self._format_obj(), "voice": o.voice}},
        }
        if o.instructions:
            session["instructions"] = o.instructions
        if self.tools:
            session["tools"] = self.tools
            session["tool_choice"] = "auto"
        return {"type": "session.update", "session": session}

    def set_wire(self, wire: AudioFormat) -> list[dict[str, Any]]:
        """The carrier's actual format once the media leg is up (a pre-warmed session guessed)."""
        before = self.format
        self._set_formats(wire)
        return [self.session_update()] if self.format != before else []

    def link_lost(self) -> None:
        self._user_partials.clear()
        self._bot_text.clear()

    def items_lost(self, item_ids: set[str]) -> None:
        for item in item_ids:
            self._bot_text.pop(item, None)

    def audio(self, chunk: bytes) -> dict[str, Any]:
        return {"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode("ascii")}

    def audio_json(self, chunk: bytes) -> bytes:
        """`audio(chunk)` as JSON text (UTF-8), built around the base64 without a dict or json.dumps."""
        return _APPEND_HEAD + binascii.b2a_base64(chunk, newline=False) + b'"}'

    def decode_output(self, audio: bytes) -> bytes:
        """The model's audio as PCM16 at `output_rate` (G.711 decodes losslessly back to the same bytes)."""
        return g711.decode(audio, self._encoding) if self._encoding is not None else audio

    def say(self, text: str, tag: str) -> list[dict[str, Any]]:
        """Make the model speak `text` word for word, in its own voice, as a response tagged `tag`."""
        return [{"type": "response.create", "response": {
            "instructions": f"Say exactly the following to the caller, word for word, and nothing else: {text}",
            "metadata": {"say": tag},
        }}]

    def user_text(self, text: str) -> list[dict[str, Any]]:
        """Something the caller did that the model cannot hear (a key press), as a user turn."""
        return [{"type": "conversation.item.create",
                 "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}},
                {"type": "response.create"}]

    def tool_result(self, call_id: str, name: str, output: str) -> list[dict[str, Any]]:
        return [{"type": "conversation.item.create",
                 "item": {"type": "function_call_output", "call_id": call_id, "output": output}},
                {"type": "response.create"}]

    def truncate(self, item_id: str, audio_end_ms: int) -> list[dict[str, Any]]:
        return [{"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                 "audio_end_ms": max(0, int(audio_end_ms))}]

    def cancel(self) -> list[dict[str, Any]]:
        return [{"type": "response.cancel"}]

    # ------------------------------------------------------------------ server messages

    def handle(self, msg: dict[str, Any]) -> list[ev.RealtimeEvent]:
        kind = msg.get("type", "")
        if kind == "response.output_audio.delta":
            return [ev.AudioOut(str(msg.get("item_id", "")), base64.b64decode(msg.get("delta", "")),
                                str(msg.get("response_id", "")))]
        if kind == "response.output_audio.done":
            return [ev.AudioDone(str(msg.get("item_id", "")))]
        if kind == "input_audio_buffer.speech_started":
            return [ev.SpeechStarted()]
        if kind == "input_audio_buffer.speech_stopped":
            end = msg.get("audio_end_ms")
            return [ev.SpeechStopped(int(end) if isinstance(end, (int, float)) and not isinstance(end, bool) else None)]
        if kind == "response.created":
            response = msg.get("response") or {}
            metadata = response.get("metadata") or {}
            return [ev.ResponseStarted(str(response.get("id", "")), metadata.get("say"))]
        if kind == "response.output_audio_transcript.delta":
            item = str(msg.get("item_id", ""))
            self._bot_text[item] = self._bot_text.get(item, "") + str(msg.get("delta", ""))
            return []
        if kind == "response.output_audio_transcript.done":
            item = str(msg.get("item_id", ""))
            text = str(msg.get("transcript") or self._bot_text.get(item, ""))
            self._bot_text.pop(item, None)
            return [ev.BotTranscript(item, text)]
        if kind == "conversation.item.input_audio_transcription.delta":
            item = str(msg.get("item_id", ""))
            text = self._user_partials[item] = self._user_partials.get(item, "") + str(msg.get("delta", ""))
            return [ev.UserTranscript(text, final=False)]
        if kind == "conversation.item.input_audio_transcription.completed":
            self._user_partials.pop(str(msg.get("item_id", "")), None)
            return [ev.UserTranscript(str(msg.get("transcript", "")), final=True)]
        if kind == "response.function_call_arguments.done":
            return [ev.ToolCall(str(msg.get("call_id", "")), str(msg.get("name", "")), str(msg.get("arguments") or "{}"))]
        if kind == "response.done":
            response = msg.get("response") or {}
            return [ev.ResponseDone(str(response.get("id", "")), str(response.get("status", "completed")))]
        if kind == "session.updated":
            return [ev.Ready()]
        if kind == "error":
            err = msg.get("error") or {}
            return [ev.ProviderError(f"{err.get('type', 'error')}: {str(err.get('message', ''))[:200]}")]
        return []


def parse(raw: str | bytes) -> dict[str, Any]:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("a realtime server message must be a JSON object")
    return data
