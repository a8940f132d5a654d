"""TTS engines: espeak-ng for real, and the real OpenAI / ElevenLabs SDKs against local fakes."""

from __future__ import annotations

import asyncio
import logging
import warnings

import numpy as np
import pytest

from media.tts.base import TtsError
from media.tts.elevenlabs import ElevenLabsTts
from media.tts.espeak import EspeakTts, WavStreamParser
from media.tts.factory import create_tts, merge_tts_config
from media.tts.openai import OpenAiTts
from tests.fakes.audio import fake_speech
from tests.fakes.elevenlabs_server import FakeElevenLabs
from tests.fakes.openai_server import FakeOpenAI

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


async def collect(it) -> tuple[bytes, list[int]]:  # type: ignore[no-untyped-def]
    chunks = [c async for c in it]
    return b"".join(chunks), [len(c) for c in chunks]


# ------------------------------------------------------------------ espeak-ng

needs_espeak = pytest.mark.skipif(not EspeakTts.available(), reason="espeak-ng not installed")


@needs_espeak
async def test_espeak_streams_whole_samples_matching_the_cli() -> None:
    import io
    import subprocess

    import soundfile as sf

    text = "Your appointment is confirmed for Tuesday."
    pcm, sizes = await collect(EspeakTts().synthesize(text))
    assert len(sizes) > 3 and all(s % 2 == 0 for s in sizes)  # streamed, whole samples
    ref, sr = sf.read(io.BytesIO(subprocess.run(["espeak-ng", "--stdout", text], capture_output=True).stdout), dtype="int16")
    assert sr == 22050
    got = np.frombuffer(pcm, dtype="<i2")
    assert len(got) == len(ref) and np.array_equal(got, ref)


@needs_espeak
async def test_espeak_text_is_never_an_option_and_voice_options_apply() -> None:
    pcm, _ = await collect(EspeakTts().synthesize("--version"))
    assert len(pcm) > 22050  # spoken, ~0.5 s+, not the version banner
    slow, _ = await collect(EspeakTts(speed=100).synthesize("one two three four"))
    fast, _ = await collect(EspeakTts(speed=300).synthesize("one two three four"))
    assert len(slow) > 1.8 * len(fast)


@needs_espeak
async def test_espeak_resamples_when_asked_for_another_rate() -> None:
    tts = EspeakTts(sample_rate=16000)
    pcm, _ = await collect(tts.synthesize("Hello there."))
    ref, _ = await collect(EspeakTts().synthesize("Hello there."))
    assert abs(len(pcm) / 16000 - len(ref) / 22050) < 0.01


@needs_espeak
async def test_espeak_closing_early_kills_the_process() -> None:
    gen = EspeakTts().synthesize("This is a very long sentence. " * 40)
    first = await gen.__anext__()
    assert first is not None
    await gen.aclose()  # must not hang or leak the subprocess


async def test_espeak_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(TtsError, match="cannot run"):
        await collect(EspeakTts(binary="/nonexistent/espeak").synthesize("hi"))


def test_wav_stream_parser_handles_split_headers_and_extra_chunks() -> None:
    import struct

    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    body = b"abcdefgh"
    wav = b"RIFF" + struct.pack("<I", 0x7FFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    wav += b"LIST" + struct.pack("<I", 3) + b"xyz\x00" + b"data" + struct.pack("<I", 0x7FFFFFFF) + body
    p = WavStreamParser()
    out = b"".join(p.feed(wav[i : i + 1]) for i in range(len(wav)))
    assert out == body and p.rate == 16000
    with pytest.raises(TtsError):
        WavStreamParser().feed(b"NOTAWAVEFILE....")


# ------------------------------------------------------------------ OpenAI (real SDK, fake server)


@pytest.fixture
async def openai_fake():  # type: ignore[no-untyped-def]
    fake = await FakeOpenAI().start()
    yield fake
    await fake.stop()


async def test_openai_tts_streams_24k_pcm(openai_fake: FakeOpenAI) -> None:
    tts = create_tts({"provider": "openai", "openai": {"apiKey": openai_fake.api_key, "baseUrl": openai_fake.base_url, "voice": "nova"}})
    assert isinstance(tts, OpenAiTts) and tts.sample_rate == 24000
    text = "Hello from the fake OpenAI."
    pcm, sizes = await collect(tts.synthesize(text))
    await tts.close()
    assert pcm == fake_speech(text, 24000)  # bit-exact, although the server split samples
    assert all(s % 2 == 0 for s in sizes)
    req = openai_fake.speech_requests[0]
    assert req["response_format"] == "pcm" and req["voice"] == "nova" and req["input"] == text
    assert req["model"] == "gpt-4o-mini-tts"


async def test_openai_tts_key_from_env_and_bad_key_error_is_clean(
    openai_fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-secret-999")
    caplog.set_level(logging.DEBUG)
    tts = create_tts({"provider": "openai", "openai": {"baseUrl": openai_fake.base_url}})
    with pytest.raises(TtsError) as info:
        await collect(tts.synthesize("hi"))
    await tts.close()
    assert "401" in str(info.value)
    assert "sk-wrong-secret-999" not in str(info.value) and "sk-wrong-secret-999" not in caplog.text
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(TtsError, match="tts.openai.apiKey"):
        create_tts({"provider": "openai", "openai": {}})


async def test_openai_tts_through_bridge_to_caller(openai_fake: FakeOpenAI) -> None:
    """OpenAI 24 kHz PCM -> bridge -> u-law 8 kHz: the caller hears the same signal."""
    import soxr
    from test_media_pipeline import aligned_correlation, make

    from media.clock import RealClock

    openai_fake.chunk_delay_s = 0.002
    tts = create_tts({"provider": "openai", "openai": {"apiKey": openai_fake.api_key, "baseUrl": openai_fake.base_url}})
    bridge, carrier, _ = make(clock=RealClock())  # the engine streams in real time
    text = "A short reply."
    result = await bridge.play(tts.synthesize(text), tts.sample_rate)
    await tts.close()
    ref = soxr.resample(np.frombuffer(fake_speech(text, 24000), dtype="<i2"), 24000, 8000, quality="HQ").astype(float)
    corr, lag = aligned_correlation(carrier.heard_pcm(), ref)
    assert result.completed and corr >= 0.95 and abs(lag) <= 8
    assert result.frames_sent == -(-len(ref) // 160)


# ------------------------------------------------------------------ ElevenLabs (real SDK, fake server)


@pytest.fixture
async def eleven_fake():  # type: ignore[no-untyped-def]
    fake = await FakeElevenLabs().start()
    yield fake
    await fake.stop()


@pytest.mark.parametrize("fmt", ["pcm_16000", "ulaw_8000"])
async def test_elevenlabs_http_stream_through_sdk(eleven_fake: FakeElevenLabs, fmt: str) -> None:
    tts = create_tts({"provider": "elevenlabs", "elevenlabs": {
        "apiKey": eleven_fake.api_key, "baseUrl": eleven_fake.base_url, "voiceId": "v123", "modelId": "eleven_turbo_v2_5",
        "outputFormat": fmt}})
    assert isinstance(tts, ElevenLabsTts)
    text = "Testing the ElevenLabs stream."
    pcm, sizes = await collect(tts.synthesize(text))
    await tts.close()
    rate = 16000 if fmt == "pcm_16000" else 8000
    assert tts.sample_rate == rate and all(s % 2 == 0 for s in sizes)
    ref = fake_speech(text, rate)
    if fmt == "ulaw_8000":
        ref = audioop.ulaw2lin(audioop.lin2ulaw(ref, 2), 2)
    assert pcm == ref
    req = eleven_fake.requests[0]
    assert req["voice"] == "v123" and req["query"]["output_format"] == fmt
    assert req["body"]["text"] == text and req["body"]["model_id"] == "eleven_turbo_v2_5"


async def test_elevenlabs_stream_input_websocket(eleven_fake: FakeElevenLabs) -> None:
    tts = ElevenLabsTts(api_key=eleven_fake.api_key, base_url=eleven_fake.base_url, transport="websocket", output_format="ulaw_8000")
    text = "Over the socket"
    pcm, _ = await collect(tts.synthesize(text))
    ref = audioop.ulaw2lin(audioop.lin2ulaw(fake_speech(text, 8000), 2), 2)
    assert pcm == ref
    first = eleven_fake.ws_messages[0]
    assert first["text"] == " " and first["generation_config"]["chunk_length_schedule"] == [120, 160, 250, 290]
    assert eleven_fake.ws_messages[-1] == {"text": ""}
    assert all("xi-api-key" not in m for m in eleven_fake.ws_messages)  # sent as a header


async def test_elevenlabs_prewarm_opens_the_socket_the_first_reply_takes(eleven_fake: FakeElevenLabs) -> None:
    tts = ElevenLabsTts(api_key=eleven_fake.api_key, base_url=eleven_fake.base_url, transport="websocket",
                        output_format="ulaw_8000")
    tts.prewarm()  # a call rings: the socket opens and is initialised now
    await tts.prewarm_done()
    assert tts.warmed == 1 and [(m, q.get("inactivity_timeout")) for m, _, q, _ in eleven_fake.seen] == [("GET", "60")]
    text = "Over the warm socket"
    pcm, _ = await collect(tts.synthesize(text))
    assert pcm == audioop.ulaw2lin(audioop.lin2ulaw(fake_speech(text, 8000), 2), 2)
    assert len(eleven_fake.seen) == 1  # no connection of its own: it took the warm one
    assert [m.get("text") for m in eleven_fake.ws_messages] == [" ", text + " ", ""]  # one init
    await collect(tts.synthesize("And a fresh one."))
    assert len(eleven_fake.seen) == 2 and [m.get("text") for m in eleven_fake.ws_messages][3] == " "
    await tts.close()


async def test_elevenlabs_prewarm_over_http_leaves_the_connection_the_request_uses(
        eleven_fake: FakeElevenLabs) -> None:
    tts = ElevenLabsTts(api_key=eleven_fake.api_key, base_url=eleven_fake.base_url, voice_id="v9")
    tts.prewarm()
    await tts.prewarm_done()
    pcm, _ = await collect(tts.synthesize("Warm."))
    await tts.close()
    assert pcm == fake_speech("Warm.", 16000) and tts.warmed == 1
    (head, _, _, head_port), (post, path, _, post_port) = eleven_fake.seen
    assert (head, post, path) == ("HEAD", "POST", "/v1/text-to-speech/v9/stream")
    assert head_port == post_port  # the request went out on the pre-warmed connection


async def test_elevenlabs_bad_key(eleven_fake: FakeElevenLabs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELEVENLABS_API_KEY", "xi-wrong-secret")
    tts = create_tts({"provider": "elevenlabs", "elevenlabs": {"baseUrl": eleven_fake.base_url}})
    with pytest.raises(TtsError) as info:
        await collect(tts.synthesize("hi"))
    assert "401" in str(info.value) and "xi-wrong-secret" not in str(info.value)
    await tts.close()


# ------------------------------------------------------------------ factory


def test_factory_defaults_edge_fallback_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(create_tts({}), EspeakTts)
    assert isinstance(create_tts(None), EspeakTts)
    with caplog.at_level(logging.WARNING):
        assert isinstance(create_tts({"provider": "edge", "edge": {"voice": "en-US-AriaNeural"}}), EspeakTts)
    assert "edge" in caplog.text and "ignored" in caplog.text
    e = create_tts({"provider": "espeak", "espeak": {"voice": "en-us", "speed": 160}})
    assert isinstance(e, EspeakTts) and e.voice == "en-us" and e.speed == 160
    with pytest.raises(TtsError, match="tts.provider"):
        create_tts({"provider": "polly"})
    with pytest.raises(TtsError, match="outputFormat"):
        create_tts({"provider": "elevenlabs", "elevenlabs": {"apiKey": "k", "outputFormat": "mp3_44100_128"}})


def test_merge_tts_config_deep_merges_over_messages_tts() -> None:
    base = {"provider": "openai", "openai": {"voice": "alloy", "model": "tts-1"}, "elevenlabs": {"voiceId": "x"}}
    over = {"openai": {"voice": "nova"}}
    assert merge_tts_config(base, over) == {"provider": "openai", "openai": {"voice": "nova", "model": "tts-1"}, "elevenlabs": {"voiceId": "x"}}
    assert base["openai"]["voice"] == "alloy"  # inputs untouched


async def test_engines_can_run_concurrently(openai_fake: FakeOpenAI) -> None:
    tts = OpenAiTts(api_key=openai_fake.api_key, base_url=openai_fake.base_url)
    outs = await asyncio.gather(*(collect(tts.synthesize(f"utterance {i}")) for i in range(4)))
    await tts.close()
    assert [o[0] for o in outs] == [fake_speech(f"utterance {i}", 24000) for i in range(4)]


async def test_elevenlabs_ulaw_reaches_a_ulaw_carrier_byte_identical(eleven_fake: FakeElevenLabs) -> None:
    """ulaw_8000 -> decode -> (8k->8k passthrough) -> encode: G.711 codes survive untouched."""
    from test_media_pipeline import make

    from media.clock import RealClock

    tts = ElevenLabsTts(api_key=eleven_fake.api_key, base_url=eleven_fake.base_url, output_format="ulaw_8000")
    bridge, carrier, _ = make(clock=RealClock())  # the engine streams in real time
    text = "Byte for byte."
    result = await bridge.play(tts.synthesize(text), tts.sample_rate)
    await tts.close()
    sent = b"".join(f.payload for f in carrier.frames)
    original = audioop.lin2ulaw(fake_speech(text, 8000), 2).replace(b"\x7f", b"\xff")  # -0 becomes +0
    assert result.completed and sent[: len(original)] == original
    assert set(sent[len(original) :]) <= {0xFF}  # the padded tail is u-law silence
