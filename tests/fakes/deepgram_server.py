"""A local fake of Deepgram's streaming STT (`/v1/listen`), speaking the real wire protocol.

`Authorization: Token <key>`; the query picks `encoding` (mulaw, alaw, linear16) and
`sample_rate`. Binary frames are audio (kept, decoded to PCM16, byte counts recorded); text
frames are control messages (`KeepAlive`, `Finalize`, `CloseStream`), all recorded. An energy VAD
over the audio sends `SpeechStarted`; while speech goes on, interim `Results` (`is_final:false`)
carry the scripted transcript's words so far; at the end of speech one `is_final` result with
`speech_final:true` — or, with `utterance_end=True`, `is_final` without `speech_final` followed by
an `UtteranceEnd` (as on a noisy line). `CloseStream` flushes and answers with `Metadata`, then closes.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from tests.fakes.http_app import serve_local
from tests.fakes.openai_server import _ServerVad

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


@dataclass
class ListenSession:
    query: dict[str, str]
    opened_at: float
    raw: bytearray = field(default_factory=bytearray)  # audio bytes exactly as received
    controls: list[str] = field(default_factory=list)  # control message types in order
    speech_started: int = 0
    closed_at: float | None = None
    ws: web.WebSocketResponse | None = None


@dataclass
class FakeDeepgram:
    api_key: str = "dg-test-key"
    transcripts: list[str] = field(default_factory=lambda: ["book a table for two"])
    utterance_end: bool = False
    interim_every_ms: int = 200
    sessions: list[ListenSession] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> FakeDeepgram:
        app = web.Application()
        app.router.add_get("/v1/listen", self._listen)
        self._runner, self.port = await serve_local(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def drop(self) -> None:
        """Close every open stream from the server side (1011), as on a Deepgram outage."""
        for sess in self.sessions:
            if sess.ws is not None and not sess.ws.closed:
                await sess.ws.close(code=1011, message=b"internal error")

    async def _listen(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Token {self.api_key}":
            return web.json_response({"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials."}, status=401)
        encoding = request.query.get("encoding", "linear16")
        if encoding not in ("mulaw", "alaw", "linear16") or "sample_rate" not in request.query:
            return web.json_response({"err_code": "Bad Request", "err_msg": "unsupported encoding"}, status=400)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        sess = ListenSession(query=dict(request.query), opened_at=loop.time(), ws=ws)
        self.sessions.append(sess)
        rate = int(request.query["sample_rate"])
        vad = _ServerVad()
        vad.configure(rate, 0.5, int(request.query.get("endpointing", 300)))
        turn = 0
        speech_bytes = 0
        sent_interims = 0
        audio_s = 0.0

        speech_start = 0.0

        async def results(text: str, *, is_final: bool, speech_final: bool, end: float | None = None) -> None:
            # final results time their words, spread over the speech (start, end: seconds into the stream)
            words = text.split(" ") if text else []
            span = ((end or audio_s) - speech_start) / max(1, len(words))
            timed = [{"word": w, "start": round(speech_start + i * span, 3), "end": round(speech_start + (i + 1) * span, 3),
                      "confidence": 0.98, "punctuated_word": w} for i, w in enumerate(words)] if is_final else []
            await ws.send_json({"type": "Results", "channel_index": [0, 1], "duration": 0.5, "start": audio_s,
                                "is_final": is_final, "speech_final": speech_final, "from_finalize": False,
                                "channel": {"alternatives": [{"transcript": text, "confidence": 0.98, "words": timed}]},
                                "metadata": {"request_id": "req-1", "model_info": {"name": "nova-3"}}})

        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                sess.raw += msg.data
                pcm = (audioop.ulaw2lin(msg.data, 2) if encoding == "mulaw" else
                       audioop.alaw2lin(msg.data, 2) if encoding == "alaw" else msg.data)
                audio_s += len(pcm) / 2 / rate
                for change in vad.feed(pcm):
                    words = self.transcripts[turn % len(self.transcripts)].split(" ")
                    if change == "started":
                        speech_start = audio_s - 0.02
                        sess.speech_started += 1
                        speech_bytes, sent_interims = 0, 0
                        await ws.send_json({"type": "SpeechStarted", "channel": [0, 1], "timestamp": audio_s})
                    else:
                        text = " ".join(words)
                        end = audio_s - vad.silence_frames * 0.02  # the speech ended before the silence
                        if self.utterance_end:
                            await results(text, is_final=True, speech_final=False, end=end)
                            await ws.send_json({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": end})
                        else:
                            await results(text, is_final=True, speech_final=True, end=end)
                        turn += 1
                if vad.speaking:
                    speech_bytes += len(pcm)
                    due = speech_bytes * 1000 // (2 * rate) // self.interim_every_ms
                    if due > sent_interims:
                        sent_interims = due
                        words = self.transcripts[turn % len(self.transcripts)].split(" ")
                        await results(" ".join(words[:min(len(words), due)]), is_final=False, speech_final=False)
            elif msg.type == WSMsgType.TEXT:
                try:
                    control = json.loads(msg.data)
                except ValueError:
                    await ws.close(code=1007, message=b"bad control message")
                    break
                kind = str(control.get("type"))
                sess.controls.append(kind)
                if kind == "CloseStream":
                    await ws.send_json({"type": "Metadata", "transaction_key": "deprecated", "request_id": "req-1",
                                        "sha256": "0" * 64, "created": "2026-12-01T00:00:00.000Z",
                                        "duration": audio_s, "channels": 1})
                    await ws.close()
                    break
        sess.closed_at = loop.time()
        return ws
