"""The peer for bench/media_streams.py: a pipecat echo server over Twilio Media Streams.

    <python with pipecat-ai, fastapi, uvicorn> bench/peers/pipecat_echo.py --port 8765

pipecat is used as a library (not vendored): FastAPIWebsocketTransport + TwilioFrameSerializer, one
pipeline per WebSocket, input audio (resampled by the serializer to the pipeline rate, 16 kHz)
pushed back out as output audio (resampled back to 8 kHz u-law by the serializer, paced by the
transport). No VAD, STT, LLM or TTS: the same work the bridge's echo mode does.
"""

from __future__ import annotations

import argparse
import json

import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse
from pipecat.frames.frames import Frame, InputAudioRawFrame, OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

PIPELINE_RATE = 16000


class Echo(FrameProcessor):
    """Caller audio in, the same audio out."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self.push_frame(OutputAudioRawFrame(audio=frame.audio, sample_rate=frame.sample_rate,
                                                      num_channels=frame.num_channels))
        else:
            await self.push_frame(frame, direction)


app = FastAPI()


@app.get("/healthz")
async def healthz() -> PlainTextResponse:
    return PlainTextResponse("ok")


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    # Twilio sends `connected`, then `start` (pipecat's runner reads these two the same way).
    start = None
    for _ in range(2):
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
    pipeline = Pipeline([transport.input(), Echo(), transport.output()])
    task = PipelineTask(pipeline, params=PipelineParams(audio_in_sample_rate=PIPELINE_RATE,
                                                        audio_out_sample_rate=PIPELINE_RATE,
                                                        enable_metrics=False),
                        idle_timeout_secs=None)

    @transport.event_handler("on_client_disconnected")
    async def _gone(_transport: object, _ws: object) -> None:
        await task.cancel()

    await PipelineRunner(handle_sigint=False).run(task)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    import sys

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                loop="uvloop" if args.uvloop else "asyncio", ws_max_size=1 << 20)


if __name__ == "__main__":
    main()
