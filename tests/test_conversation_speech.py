"""speak_stream on a real MediaPipeline: pieces in, one play out; engine and leg failures come back
as a result with the error (the turn then apologizes or hangs up), never as a hang or a traceback."""

from __future__ import annotations

from collections.abc import AsyncIterator

from test_media_pipeline import make  # pytest puts tests/ on the path (as test_tts_engines relies on)

from bridge.conversation.speech import speak_stream
from media.clock import RealClock
from media.tts.base import TtsEngine, TtsError
from tests.fakes.audio import fake_speech


class ToneTts(TtsEngine):
    name = "tone"
    sample_rate = 8000

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.texts: list[str] = []

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        self.texts.append(text)
        if text == self.fail_on:
            raise TtsError("tone engine broke")
        yield fake_speech(text, 8000)


async def pieces(*texts: str, fail: Exception | None = None) -> AsyncIterator[str]:
    for text in texts:
        yield text
    if fail is not None:
        raise fail


async def test_all_pieces_play_in_order_in_one_play() -> None:
    bridge, carrier, _ = make(send_ms=20, clock=RealClock())
    tts = ToneTts()
    spoken = await speak_stream(bridge, tts, pieces("One.", "Two two.", "Three."))
    assert spoken.text == spoken.heard_text == "One. Two two. Three." and not spoken.interrupted
    assert tts.texts == ["One.", "Two two.", "Three."] and bridge.stats.plays == 1
    heard = b"".join(f.payload for f in carrier.frames)
    assert len(heard) == len(fake_speech("One.Two two.Three.", 8000)) // 2  # u-law: one byte per sample


async def test_a_tts_failure_plays_what_was_ready_and_reports_the_error() -> None:
    bridge, _, _ = make(send_ms=20, clock=RealClock())
    spoken = await speak_stream(bridge, ToneTts(fail_on="Two."), pieces("One.", "Two.", "Three."))
    assert isinstance(spoken.error, TtsError) and spoken.heard_text == "One."


async def test_a_model_failure_mid_reply_is_reported_after_what_was_said() -> None:
    bridge, _, _ = make(send_ms=20, clock=RealClock())
    spoken = await speak_stream(bridge, ToneTts(), pieces("Fine.", fail=RuntimeError("model went away")))
    assert str(spoken.error) == "model went away" and spoken.heard_text == "Fine."


async def test_a_broken_leg_is_an_error_result_not_an_exception() -> None:
    bridge, carrier, _ = make(send_ms=20, clock=RealClock())

    async def broken(payload: bytes) -> None:
        raise ConnectionResetError("the carrier socket closed")

    carrier.send_media = broken  # type: ignore[method-assign]
    spoken = await speak_stream(bridge, ToneTts(), pieces("Hello there."))
    assert isinstance(spoken.error, ConnectionResetError) and spoken.interrupted and spoken.heard_text == ""


async def test_elevenlabs_incremental_heard_text_comes_from_its_character_alignment() -> None:
    """stream-input over a real socket: cut mid-reply, what was heard is read from ElevenLabs'
    `alignment` (the fake: 20 ms per character), not estimated from the share of time played,
    which for a long first word would claim several words the caller never heard."""
    import asyncio

    from media.pipeline import PlaybackResult, heard_text
    from media.tts.elevenlabs import ElevenLabsTts
    from tests.fakes.elevenlabs_server import FakeElevenLabs

    fake = await FakeElevenLabs().start()
    try:
        tts = ElevenLabsTts(api_key=fake.api_key, base_url=fake.base_url, transport="websocket",
                            output_format="pcm_8000")
        bridge, carrier, _ = make(send_ms=20, clock=RealClock())
        text = "Pneumonoultramicroscopicsilicovolcanoconiosis is a big word to say."
        speaking = asyncio.ensure_future(speak_stream(bridge, tts, pieces(text)))
        while len(carrier.frames) < 58 and not speaking.done():  # ~1.1 s: into "is a big word"
            await asyncio.sleep(0.005)
        bridge.interrupt()
        spoken = await speaking
    finally:
        await fake.stop()
    assert spoken.interrupted and 900 < spoken.heard_ms < 1350, spoken
    started = [k * 20 for k in range(len(text))]  # the fake's alignment: character k starts at 20k ms
    n = sum(1 for t in started if t < spoken.heard_ms)
    expected = text[:n] if n == len(text) or text[n] == " " else text[:n].rsplit(" ", 1)[0]
    assert spoken.heard_text == expected.strip()
    by_time = heard_text(text, PlaybackResult(False, True, 0, spoken.heard_ms, None, len(text) * 20.0),
                         total_ms=len(text) * 20.0)
    assert len(spoken.heard_text.split()) < len(by_time.split())
