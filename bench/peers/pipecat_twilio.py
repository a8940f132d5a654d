"""What the pipecat peers share: a FastAPI app whose /ws endpoint takes a Twilio Media Streams
connection (the `connected` and `start` messages, as pipecat's runner reads them), wraps it in
pipecat's TwilioFrameSerializer + FastAPIWebsocketTransport and runs one pipeline per call, plus
the uvicorn start. Imported by the peers as a sibling module (they run as scripts in the pipecat
venv).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence

import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)


async def twilio_transport(websocket: WebSocket) -> FastAPIWebsocketTransport | None:
    """Accept the WebSocket, read Twilio's `connected` then `start`; the transport for the stream,
    or None (the socket closed with 1008) when no `start` came."""
    await websocket.accept()
    start = None
    for _ in range(2):
        msg = json.loads(await websocket.receive_text())
        if msg.get("event") == "start":
            start = msg
            break
    if start is None:
        await websocket.close(code=1008)
        return None
    serializer = TwilioFrameSerializer(
        stream_sid=start["start"]["streamSid"], call_sid=start["start"]["callSid"],
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False))
    return FastAPIWebsocketTransport(websocket, FastAPIWebsocketParams(
        audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer,
        allowed_origins=[]))


def twilio_app(processors: Callable[[], Sequence[FrameProcessor]], *, in_rate: int, out_rate: int) -> FastAPI:
    """The app: /healthz, and /ws running transport.input() -> processors() -> transport.output() per call
    until the caller disconnects."""
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        transport = await twilio_transport(websocket)
        if transport is None:
            return
        pipeline = Pipeline([transport.input(), *processors(), transport.output()])
        task = PipelineTask(pipeline, params=PipelineParams(audio_in_sample_rate=in_rate, audio_out_sample_rate=out_rate,
                                                            enable_metrics=False),
                            idle_timeout_secs=None)

        @transport.event_handler("on_client_disconnected")
        async def _gone(_transport: object, _ws: object) -> None:
            await task.cancel()

        await PipelineRunner(handle_sigint=False).run(task)

    return app


def serve(app: FastAPI, port: int, *, loop: str = "auto") -> None:
    """Run the app on 127.0.0.1:port (uvicorn's event `loop` choice) with pipecat's logging cut to warnings."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                loop=loop, ws_max_size=1 << 20)
