"""The speech-to-speech peer for bench/voice_to_voice.py: pipecat's OpenAI Realtime service over
Twilio Media Streams.

    <python with pipecat-ai[openai], fastapi, uvicorn> bench/peers/pipecat_s2s.py --port 8767 \
        --realtime-url ws://127.0.0.1:PORT/v1/realtime --silence-ms 300

pipecat is used as a library: FastAPIWebsocketTransport + TwilioFrameSerializer, its
OpenAIRealtimeLLMService pointed at the bench's OpenAI Realtime fake through its `base_url`, with
the same server-VAD settings the bridge sends (threshold, silence duration). Caller audio goes
to the model as pipecat does it (24 kHz PCM), the model's audio back through the serializer.
"""

from __future__ import annotations

import argparse
import json

import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

RATE = 24000  # the realtime API's PCM rate: no resampling inside pipecat's service
ARGS = argparse.Namespace()
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
    session = events.SessionProperties(
        instructions="You are a phone agent.",
        audio=events.AudioConfiguration(input=events.AudioInput(turn_detection=events.TurnDetection(
            threshold=ARGS.vad_threshold, silence_duration_ms=ARGS.silence_ms))))
    llm = OpenAIRealtimeLLMService(api_key=ARGS.api_key, base_url=ARGS.realtime_url,
                                   settings=OpenAIRealtimeLLMService.Settings(model="gpt-realtime",
                                                                              session_properties=session))
    pipeline = Pipeline([transport.input(), llm, transport.output()])
    task = PipelineTask(pipeline, params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE,
                                                        enable_metrics=False),
                        idle_timeout_secs=None)

    @transport.event_handler("on_client_disconnected")
    async def _gone(_transport: object, _ws: object) -> None:
        await task.cancel()

    await PipelineRunner(handle_sigint=False).run(task)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--realtime-url", required=True)
    parser.add_argument("--api-key", default="sk-rt-test")
    parser.add_argument("--silence-ms", type=int, default=300)
    parser.add_argument("--vad-threshold", type=float, default=0.5)
    parser.parse_args(namespace=ARGS)
    import sys

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    uvicorn.run(app, host="127.0.0.1", port=ARGS.port, log_level="warning", access_log=False, ws_max_size=1 << 20)


if __name__ == "__main__":
    main()
