"""The peer for bench/media_streams.py: a pipecat echo server over Twilio Media Streams.

    <python with pipecat-ai, fastapi, uvicorn> bench/peers/pipecat_echo.py --port 8765

pipecat is used as a library (not vendored): FastAPIWebsocketTransport + TwilioFrameSerializer, one
pipeline per WebSocket, input audio (resampled by the serializer to the pipeline rate, 16 kHz)
pushed back out as output audio (resampled back to 8 kHz u-law by the serializer, paced by the
transport). No VAD, STT, LLM or TTS: the same work the bridge's echo mode does.
"""

from __future__ import annotations

import argparse

from pipecat.frames.frames import Frame, InputAudioRawFrame, OutputAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat_twilio import serve, twilio_app

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


app = twilio_app(lambda: [Echo()], in_rate=PIPELINE_RATE, out_rate=PIPELINE_RATE)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    serve(app, args.port, loop="uvloop" if args.uvloop else "asyncio")


if __name__ == "__main__":
    main()
