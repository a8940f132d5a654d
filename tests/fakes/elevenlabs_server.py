"""A local fake of the ElevenLabs TTS endpoints, speaking the real wire protocol:

- POST /v1/text-to-speech/{voice_id}/stream?output_format=... (header xi-api-key) -> raw audio;
- WS   /v1/text-to-speech/{voice_id}/stream-input?model_id=...&output_format=... -> the
  stream-input protocol: init message (text " "), text messages, {"text": ""} to close;
  answers {"audio": b64, ...} messages and a final {"isFinal": true}.
"""

from __future__ import annotations

import base64
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.audio import fake_speech, odd_chunks
from tests.fakes.http_app import serve_local

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

RATES = {"pcm_8000": 8000, "pcm_16000": 16000, "pcm_22050": 22050, "pcm_24000": 24000, "pcm_44100": 44100, "ulaw_8000": 8000}


def render(text: str, output_format: str) -> bytes:
    pcm = fake_speech(text, RATES[output_format])
    return audioop.lin2ulaw(pcm, 2) if output_format == "ulaw_8000" else pcm


@dataclass
class FakeElevenLabs:
    api_key: str = "xi-test-456"
    requests: list[dict[str, Any]] = field(default_factory=list)
    ws_messages: list[dict[str, Any]] = field(default_factory=list)
    # every request as (method, path, query, client port): which TCP connection carried it
    seen: list[tuple[str, str, dict[str, str], int]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeElevenLabs:
        app = web.Application(middlewares=[self._note])
        app.router.add_post("/v1/text-to-speech/{voice}/stream", self._stream)
        app.router.add_get("/v1/text-to-speech/{voice}/stream-input", self._stream_input)
        self._runner, self.port = await serve_local(app)
        return self

    @web.middleware
    async def _note(self, request: web.Request, handler: Any) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append((request.method, request.path, dict(request.query), int(peer[1]) if peer else 0))
        response: web.StreamResponse = await handler(request)
        return response

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("xi-api-key") != self.api_key:
            return web.json_response({"detail": {"status": "invalid_api_key", "message": "Invalid API key"}}, status=401)
        body = await request.json()
        fmt = request.query.get("output_format", "mp3_44100_128")
        self.requests.append({"voice": request.match_info["voice"], "query": dict(request.query), "body": body})
        if fmt not in RATES:
            return web.json_response({"detail": {"status": "invalid_output_format"}}, status=422)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        for chunk in odd_chunks(render(body["text"], fmt), seed=3):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def _stream_input(self, request: web.Request) -> web.StreamResponse:
        fmt = request.query.get("output_format", "mp3_44100_128")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        text = ""
        first = True
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            m = json.loads(msg.data)
            self.ws_messages.append(m)
            if first:
                first = False
                key = m.get("xi-api-key") or request.headers.get("xi-api-key")
                if m.get("text") != " " or key != self.api_key or fmt not in RATES:
                    await ws.send_json({"message": "bad init", "error": "invalid_request", "code": 1008})
                    await ws.close(code=1008)
                    break
                continue
            if m.get("text"):
                text += m["text"]
                if m.get("flush") or m.get("try_trigger_generation"):
                    await self._send_audio(ws, text.strip(), fmt)
                    text = ""
            elif m.get("text") == "":
                if text.strip():
                    await self._send_audio(ws, text.strip(), fmt)
                await ws.send_json({"isFinal": True})
                await ws.close()
                break
        return ws

    async def _send_audio(self, ws: web.WebSocketResponse, text: str, fmt: str) -> None:
        """The audio in chunks, each with the alignment of the characters that start in it (times in
        ms from the chunk's start; the fake speaks 20 ms per character, the text plus a trailing space)."""
        audio = render(text, fmt)
        step = 3200
        bytes_per_ms = len(audio) / (len(text) * 20)
        spoken = text + " "
        for i in range(0, len(audio), step):
            t0, t1 = i / bytes_per_ms, min(len(audio), i + step) / bytes_per_ms
            last = i + step >= len(audio)  # the trailing space starts as the audio ends
            idx = [k for k in range(len(spoken)) if t0 <= k * 20 < t1 or (last and k == len(text))]
            alignment = {"chars": [spoken[k] for k in idx], "charStartTimesMs": [round(k * 20 - t0) for k in idx],
                         "charDurationsMs": [20 for _ in idx]}
            await ws.send_json({"audio": base64.b64encode(audio[i : i + step]).decode(), "isFinal": None,
                                "normalizedAlignment": alignment, "alignment": alignment})
