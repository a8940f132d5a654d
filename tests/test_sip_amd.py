"""Local machine detection on a real SIP leg: the bridge (provider sip, config/lab.yaml) calls
baresip, which answers and plays an espeak answering-machine greeting with a beep, or a short
"Hello?". The machine gets the message after its beep (heard in baresip's recording) and the call
ends `voicemail`; the person is detected as human and hears the message."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from bridge.calls import CallState
from tests.fakes.amd_set import MACHINE_TEXTS, human, machine
from tests.harness import run_bridge, wait_for
from tests.peers.audio import read_pcm, rms
from tests.peers.harness import skip_reason
from tests.test_sip_lab import _lab_config, _softphone

_reason = skip_reason("baresip", "espeak-ng")
pytestmark = [pytest.mark.realpeer, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

MESSAGE = "Your order is ready for pick up."


def _config(mode: str) -> dict[str, Any]:
    raw = _lab_config()
    raw["streaming"] = {"enabled": True, "provider": "none"}
    raw["outbound"] = {"defaultMode": "notify", "notifyHangupDelaySec": 1, "machineDetection": mode}
    return raw


def _wav(path: Path, pcm: bytes) -> Path:
    sf.write(path, np.frombuffer(pcm, dtype="<i2"), 8000, subtype="PCM_16")
    return path


def _voiced(phone_dir: Path) -> list[float]:
    """Start times (s, from call establishment) of the 20 ms frames the softphone heard as sound."""
    heard_files = sorted((phone_dir / "rec").glob("dump-*-dec.wav"))
    assert heard_files, (phone_dir / "baresip.log").read_text(errors="replace")[-2000:]
    heard, rate = read_pcm(heard_files[-1])
    step = rate // 50
    return [i / rate for i in range(0, len(heard) - step, step) if rms(heard[i:i + step]) > 300]


async def test_answering_machine_on_a_sip_leg_gets_the_message_after_its_beep(tmp_path: Path) -> None:
    greeting = machine(MACHINE_TEXTS[0], "en-us", 165, beep_hz=1000.0, snr_db=30.0, seed=21, tail_ms=12_000)
    source = _wav(tmp_path / "machine.wav", greeting.pcm)
    raw = _config("leave-message")
    async with run_bridge(raw, tmp_path / "store") as runtime, _softphone(tmp_path, source) as (phone_dir, port):
        await asyncio.sleep(0.3)  # baresip binds its SIP port
        call = await runtime.manager.initiate(f"sip:softphone@127.0.0.1:{port}", MESSAGE, "notify")
        await wait_for(lambda: call.terminal, 30)
        assert call.state is CallState.VOICEMAIL, call
        meta = call.metadata
        assert meta["answeredBy"] == "machine" and meta["voicemailAfter"] == "beep", meta
        assert meta["amdDecisionMs"] < 4000
    await asyncio.sleep(0.2)  # baresip finishes its WAV when the call closes
    voiced = _voiced(phone_dir)
    beep_end = (greeting.beep_end_ms or 0) / 1000
    assert len(voiced) >= 50, f"the machine recorded no message ({len(voiced)} voiced frames)"
    assert voiced[0] >= beep_end - 0.2, f"the message started at {voiced[0]:.2f} s, over the greeting (beep ended {beep_end:.2f} s)"
    assert voiced[0] <= beep_end + 1.0, f"the message started {voiced[0] - beep_end:.2f} s after the beep"
    print(f"\n[sip amd] machine: verdict {meta['amdCause']} at {meta['amdDecisionMs']} ms; "
          f"message heard {voiced[0] - beep_end:+.2f} s from the end of the beep")


async def test_a_person_on_a_sip_leg_is_human_and_hears_the_message(tmp_path: Path) -> None:
    opener = human("Hello?", "en-us", 165, snr_db=30.0, seed=22, lead_ms=600, tail_ms=12_000)
    source = _wav(tmp_path / "hello.wav", opener.pcm)
    async with run_bridge(_config("hangup"), tmp_path / "store") as runtime, \
            _softphone(tmp_path, source) as (phone_dir, port):
        await asyncio.sleep(0.3)
        call = await runtime.manager.initiate(f"sip:softphone@127.0.0.1:{port}", MESSAGE, "notify")
        await wait_for(lambda: call.terminal, 30)
        assert call.state is CallState.HANGUP_BOT, call
        assert call.metadata["answeredBy"] == "human", call.metadata
        decided = call.metadata["amdDecisionMs"] / 1000
    await asyncio.sleep(0.2)
    voiced = _voiced(phone_dir)
    assert len(voiced) >= 50, f"the person did not hear the message ({len(voiced)} voiced frames)"
    hello_end = (600 + opener.speech_ms) / 1000
    assert voiced[0] >= hello_end + 0.5, "nothing is said before the verdict"
    print(f"\n[sip amd] person: verdict {call.metadata['amdCause']} at {decided:.2f} s; "
          f"message heard {voiced[0]:.2f} s after answer")
