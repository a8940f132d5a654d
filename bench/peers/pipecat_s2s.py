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

from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat_twilio import serve, twilio_app

RATE = 24000  # the realtime API's PCM rate: no resampling inside pipecat's service
ARGS = argparse.Namespace()


def processors() -> list[FrameProcessor]:
    session = events.SessionProperties(
        instructions="You are a phone agent.",
        audio=events.AudioConfiguration(input=events.AudioInput(turn_detection=events.TurnDetection(
            threshold=ARGS.vad_threshold, silence_duration_ms=ARGS.silence_ms))))
    return [OpenAIRealtimeLLMService(api_key=ARGS.api_key, base_url=ARGS.realtime_url,
                                     settings=OpenAIRealtimeLLMService.Settings(model="gpt-realtime",
                                                                                session_properties=session))]


app = twilio_app(processors, in_rate=RATE, out_rate=RATE)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--realtime-url", required=True)
    parser.add_argument("--api-key", default="sk-rt-test")
    parser.add_argument("--silence-ms", type=int, default=300)
    parser.add_argument("--vad-threshold", type=float, default=0.5)
    parser.parse_args(namespace=ARGS)
    serve(app, ARGS.port)


if __name__ == "__main__":
    main()
