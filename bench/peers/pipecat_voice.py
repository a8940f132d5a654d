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
import warnings

from pipecat.frames.frames import Frame, InputAudioRawFrame, LLMContextFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.openai.tts import OpenAITTSService
from pipecat_twilio import serve, twilio_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

IN_RATE = 16000
OUT_RATE = 24000
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


def processors() -> list[FrameProcessor]:
    llm = OpenAILLMService(model="gpt-4o-mini", api_key="sk-test-123", base_url=ARGS.base_url)
    tts = OpenAITTSService(api_key="sk-test-123", base_url=ARGS.base_url, voice="alloy",
                           model="gpt-4o-mini-tts", sample_rate=OUT_RATE)
    return [EndOfSpeechStt(ARGS.stt_ms / 1000), llm, tts]


app = twilio_app(processors, in_rate=IN_RATE, out_rate=OUT_RATE)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--stt-ms", type=float, default=300)
    parser.parse_args(namespace=ARGS)
    serve(app, ARGS.port)


if __name__ == "__main__":
    main()
