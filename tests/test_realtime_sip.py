"""Speech-to-speech over SIP with a real softphone (headless baresip, config/lab.yaml's bridge and
docker/softphone/'s phone run natively): the phone calls the bridge, the OpenAI Realtime fake speaks
the greeting (24 kHz PCM to and from the model; pjsua2 carries G.711 on the RTP side), the caller talks over it (barge-in: the model is told
what was played), then the caller's turn is answered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fakes.openai_realtime_server import FakeOpenAIRealtime, Reply
from tests.peers.audio import read_pcm, rms, speech_wav
from tests.peers.harness import skip_reason
from tests.test_realtime_openai import LONG
from tests.test_sip_lab import _lab_config, _softphone

_reason = skip_reason("baresip", "espeak-ng", "sox")
pytestmark = [pytest.mark.realpeer, pytest.mark.skipif(_reason is not None, reason=_reason or "")]


def _voiced_runs(pcm: np.ndarray, rate: int, max_gap_s: float = 0.1) -> list[tuple[float, float]]:
    """(start s, length s) of each stretch of voiced 20 ms frames; a gap up to `max_gap_s` (a late
    or lost RTP packet on a loaded machine) does not end a stretch."""
    step = rate // 50
    voiced = [rms(pcm[i:i + step]) > 300 for i in range(0, len(pcm) - step + 1, step)]
    runs: list[tuple[float, float]] = []
    start = None
    for n, v in enumerate([*voiced, False]):
        if v and start is None:
            start = n
        elif not v and start is not None:
            runs.append((start * 0.02, (n - start) * 0.02))
            start = None
    merged: list[tuple[float, float]] = []
    for begin, length in runs:
        if merged and begin - (merged[-1][0] + merged[-1][1]) <= max_gap_s + 1e-9:
            merged[-1] = (merged[-1][0], begin + length - merged[-1][0])
        else:
            merged.append((begin, length))
    return merged


async def test_sip_softphone_speech_to_speech_with_barge_in(tmp_path: Path) -> None:
    from bridge.calls import Direction
    from tests.harness import run_bridge, wait_for

    fake = await FakeOpenAIRealtime(transcripts=["sip caller wants a table"],
                                    replies=[Reply("A table for two, done.")]).start()
    try:
        raw = _lab_config()
        raw["inboundGreeting"] = LONG
        raw["streaming"] = {"enabled": True, "provider": "none"}
        raw["realtime"] = {"enabled": True, "provider": "openai", "apiKey": fake.api_key, "baseUrl": fake.base_url}
        # quiet for 1.6 s of the 3.4 s greeting, then talks over it, then waits for the answer
        caller = speech_wav(tmp_path / "caller.wav", "hello, I would like a table for two", lead_s=1.6, pad_s=6.0)
        async with run_bridge(raw, tmp_path / "store") as runtime:
            async with _softphone(tmp_path, caller, "-e", f"/dial sip:lab@127.0.0.1:{raw['sip']['port']}") as (
                phone_dir, _port,
            ):
                manager = runtime.manager
                await wait_for(lambda: any(c.direction is Direction.INBOUND for c in manager.calls.values()), 10)
                call = next(iter(manager.calls.values()))
                await wait_for(lambda: bool(fake.sessions) and bool(fake.sessions[0].truncates), timeout=15)
                await wait_for(lambda: any(t.text == "A table for two, done." for t in call.transcript), timeout=20)
                session = fake.sessions[0]
                # pjsua2 hands the bridge L16, so the session takes 24 kHz PCM (resampled), not u-law
                assert session.format == "audio/pcm" and session.updates[-1]["audio"]["input"]["format"]["rate"] == 24000
                assert session.responses[0]["text"] == LONG and session.responses[0]["tag"]
                truncate = session.truncates[0]
                lines = [(t.speaker, t.text) for t in call.transcript]
                assert ("user", "sip caller wants a table") in lines
                await manager.end(call.callId)
        heard_files = sorted((phone_dir / "rec").glob("dump-*-dec.wav"))
        assert heard_files, (phone_dir / "baresip.log").read_text(errors="replace")[-2000:]
        heard, rate = read_pcm(heard_files[-1])
        runs = _voiced_runs(heard, rate)
        assert runs, "the softphone heard the model"
        greeting_ms = runs[0][1] * 1000
        # the tone-per-character greeting is voiced throughout: its first run is what was played
        assert greeting_ms < len(LONG) * 20 - 500, "the greeting was cut by the caller"
        # within one 20 ms frame, plus the 20 ms step of this voiced-frame measure
        assert abs(truncate["audio_end_ms"] - greeting_ms) <= 40, (truncate, runs[:3])
    finally:
        await fake.stop()
