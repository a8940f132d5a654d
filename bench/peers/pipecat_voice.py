"""The peer for bench/voice_to_voice.py: a pipecat cascade over Twilio Media Streams.

    <python with pipecat-ai[openai], fastapi, uvicorn> bench/peers/pipecat_voice.py --port 8766 \
        --base-url http://127.0.0.1:PORT/v1 --stt-ms 300

pipecat is used as a library (not vendored): FastAPIWebsocketTransport + TwilioFrameSerializer, its
OpenAILLMService (streaming chat) and OpenAITTSService pointed at the same fakes as the bridge, its
own sentence aggregation between them. The STT stands in like the bridge's benchmark STT: an
energy detector on the input audio; the final transcript goes to the model `--stt-ms` after the
end of the caller's speech (here as an LLMContextFrame straight to the LLM: no user-turn
aggregator, whose speech timeout would add its own wait).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import warnings

import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse
from pipecat.frames.frames import Frame, InputAudioRawFrame, LLMContextFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.openai.tts import OpenAITTSService
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

IN_RATE = 16000
LOUD_RMS = 500
ARGS = argparse.Namespace()


class EndOfSpeechStt(FrameProcessor):
    """Caller audio in (not passed on); `stt_s` after the end of speech, a user turn for the LLM."""

    def __init__(self, stt_s: float) -> None:
        super().__init__()
        self.stt_s = stt_s
        self.speaking = False
        self.last_loud = 0.0
        self.turns = 0
        self.context = LLMContext(messages=[{"role": "system", "content": "You are a phone agent."}])

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            loop = asyncio.get_running_loop()
            if audioop.rms(frame.audio, 2) > LOUD_RMS:
                self.speaking, self.last_loud = True, loop.time()
            elif self.speaking:
                self.speaking = False
                self.turns += 1
                loop.call_at(self.last_loud + self.stt_s, lambda n=self.turns: asyncio.ensure_future(self._final(n)))
            return
        await self.push_frame(frame, direction)

    async def _final(self, n: int) -> None:
        self.context.add_message({"role": "user", "content": f"I would like a table please, line {n}."})
        await self.push_frame(LLMContextFrame(self.context))


app = FastAPI()


@app.get("/healthz")
async def healthz() -> PlainTextResponse:
    return PlainTextResponse("ok")


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    start = None
    for _ in range(2):  # Twilio sends `connected`, then `start`
        msg = json.loads(await websocket.receive_text())
        if msg.get("event") == "start":
            start = msg
            break
    if start is None:
        await websocket.close(code=1008)
        return
    serializer = TwilioFrameSerializer(
        stream_sid=start["start"]["streamSid"], call_sid=start["start"]["callSid"],
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False))
    transport = FastAPIWebsocketTransport(websocket, FastAPIWebsocketParams(
        audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer,
        allowed_origins=[]))
    llm = OpenAILLMService(model="gpt-4o-mini", api_key="sk-test-123", base_url=ARGS.base_url)
    tts = OpenAITTSService(api_key="sk-test-123", base_url=ARGS.base_url, voice="alloy",
                           model="gpt-4o-mini-tts", sample_rate=24000)
    pipeline = Pipeline([transport.input(), EndOfSpeechStt(ARGS.stt_ms / 1000), llm, tts, transport.output()])
    task = PipelineTask(pipeline, params=PipelineParams(audio_in_sample_rate=IN_RATE, audio_out_sample_rate=24000,
                                                        enable_metrics=False),
                        idle_timeout_secs=None)

    @transport.event_handler("on_client_disconnected")
    async def _gone(_transport: object, _ws: object) -> None:
        await task.cancel()

    await PipelineRunner(handle_sigint=False).run(task)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--stt-ms", type=float, default=300)
    parser.parse_args(namespace=ARGS)
    import sys

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    uvicorn.run(app, host="127.0.0.1", port=ARGS.port, log_level="warning", access_log=False, ws_max_size=1 << 20)


if __name__ == "__main__":
    main()
