"""SIP carrier under sipp: many calls with audio, the library's call cap, malformed and unexpected
SIP, SIP INFO DTMF, and how outbound final responses map to end reasons."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from bridge.calls import CallState, EventType
from carriers.base import OutboundRequest
from carriers.sip.settings import SipSettings
from tests.peers.audio import pcm16, read_pcm, speech_wav, ulaw_wav, windowed_alignment
from tests.peers.harness import running_carrier, skip_reason
from tests.peers.host import RecordingBridge
from tests.peers.ports import bridge_rtp, bridge_sip, sipp_media, sipp_uac, sipp_uas
from tests.peers.sipp import SCENARIOS, run_sipp

_reason = skip_reason("sipp", "espeak-ng", "sox")
pytestmark = [pytest.mark.realpeer, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

# pjsua2-python 2.15.1.post1 is compiled with PJSUA_MAX_CALLS = 4: one user agent holds 4 calls;
# more need SIP workers behind the front.
LIBRARY_CALL_CAP = 4


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (this one and the SIP workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _settings(**extra: object) -> SipSettings:
    return SipSettings(port=bridge_sip(), rtpPortStart=bridge_rtp(), rtpPortRange=100, **extra)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def caller_audio(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sipp_audio")
    pcm = speech_wav(d / "caller.wav", "one two three four five", pad_s=0.1)
    return pcm, ulaw_wav(pcm, d / "audio_ulaw.wav")


def _workdir(tmp_path: Path, name: str, ulaw: Path) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "audio_ulaw.wav").write_bytes(ulaw.read_bytes())  # the scenario streams this file
    return d


async def test_twenty_concurrent_calls_with_audio(tmp_path: Path, caller_audio: tuple[Path, Path]) -> None:
    """20 sipp calls at once through the SIP front and 5 worker processes, each streaming speech in
    while the bridge plays a tone out: every call sets up, carries audio both ways and tears down."""
    pcm_wav, ulaw = caller_audio
    settings = _settings(workers=5)
    tone = (np.sin(2 * np.pi * 400 * np.arange(8000 * 3) / 8000) * 6000).astype("<i2").tobytes()
    async with running_carrier(settings) as (host, carrier):

        def play(bridge: RecordingBridge) -> None:
            host.spawn(bridge.play(tone))

        host.on_attach = play
        pids = [os.getpid(), *carrier.worker_pids()]
        t0, cpu0 = time.monotonic(), _cpu_seconds(pids)
        result = await run_sipp(
            "uac_audio.xml", f"127.0.0.1:{settings.port}", workdir=_workdir(tmp_path, "load", ulaw),
            local_port=sipp_uac(), media_port=sipp_media(),
            calls=20, limit=20, rate=50, hold_ms=3000, timeout_s=40,
        )
        wall, cpu = time.monotonic() - t0, _cpu_seconds(pids) - cpu0
        assert result.ok, result.errors[-2000:] or result.output[-2000:]
        ended = await host.wait_for(EventType.ENDED, count=20, timeout=5)
        assert {e.reason for e in ended} == {CallState.HANGUP_USER}
        assert len(host.bridges) == 20
        assert max(carrier.peak_calls_per_worker()) <= LIBRARY_CALL_CAP
        assert carrier.peak_concurrent_calls() == 20

        reference, _ = read_pcm(pcm_wav)
        # sipp paces RTP from one thread for all calls: on a loaded 2-core box a call can see a burst
        # that the jitter buffer smooths with a discard or PLC, shifting the rest of that call by a
        # frame. Per-window alignment measures that the audio arrived intact regardless.
        windows = [windowed_alignment(reference, pcm16(b.pcm)) for b in host.bridges.values()]
        medians = [median for median, _ in windows]
        assert statistics.median(medians) > 0.98 and min(medians) > 0.9, windows
        assert all(low > 0.7 for _, low in windows), windows
        stats = [carrier.leg_stats(e.provider_call_id or "") or {} for e in ended]
        assert all(s["framesOut"] >= 120 for s in stats), [s["framesOut"] for s in stats]
        setup = sorted(s["setupMs"] for s in stats)
    print(
        f"\n[sip] sipp 20 concurrent calls, 5 workers: wall {wall:.1f} s, CPU (bridge + workers) {cpu:.2f} s "
        f"= {100 * cpu / wall:.1f}% of one core ({100 * cpu / wall / 20:.1f}% per call); setup INVITE->first audio "
        f"median {statistics.median(setup):.1f} ms, max {setup[-1]:.1f} ms; min window-median r={min(medians):.3f}"
    )


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "2-workers"])
async def test_calls_beyond_capacity_get_busy(tmp_path: Path, caller_audio: tuple[Path, Path], workers: int) -> None:
    """One user agent answers the 5th INVITE with 486 itself; with workers the front does, once
    every worker is full."""
    _, ulaw = caller_audio
    settings = _settings(workers=workers)
    capacity = workers * LIBRARY_CALL_CAP
    async with running_carrier(settings) as (host, _):
        result = await run_sipp(
            "uac_audio.xml", f"127.0.0.1:{settings.port}", workdir=_workdir(tmp_path, "over", ulaw),
            local_port=sipp_uac(), media_port=sipp_media(),
            calls=capacity + 2, limit=capacity + 2, rate=50, hold_ms=1500, timeout_s=20,
        )
        assert not result.ok
        assert result.errors.count("486 Busy Here") == 2, result.errors[-1500:]
        await host.wait_for(EventType.ENDED, count=capacity, timeout=5)
        assert len(host.of_type(EventType.ENDED)) == capacity


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "2-workers"])
async def test_malformed_and_unexpected_sip_get_proper_answers(tmp_path: Path, workers: int) -> None:
    settings = _settings(workers=workers)
    target = f"127.0.0.1:{settings.port}"
    async with running_carrier(settings) as (host, _):
        for scenario in ("uac_no_common_codec.xml", "uac_bad_sdp.xml", "uac_bye_unknown_dialog.xml"):
            result = await run_sipp(
                scenario, target, workdir=tmp_path / scenario, local_port=sipp_uac(),
                media_port=sipp_media(), timeout_s=10,
            )
            assert result.ok, f"{scenario}: {result.errors[-1500:] or result.output[-1500:]}"

        # Garbage datagrams are dropped; the stack still answers OPTIONS.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(3)
            sock.bind(("127.0.0.1", 0))
            for junk in (b"\x00\xff" * 40, b"NOT SIP AT ALL\r\n\r\n", b"INVITE sip:x SIP/2.0\r\nVia: broken\r\n\r\n"):
                sock.sendto(junk, ("127.0.0.1", settings.port))
            port = sock.getsockname()[1]
            options = (
                f"OPTIONS sip:bot@127.0.0.1:{settings.port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-opt-1\r\n"
                f"From: <sip:probe@127.0.0.1:{port}>;tag=probe1\r\n"
                f"To: <sip:bot@127.0.0.1:{settings.port}>\r\n"
                "Call-ID: options-probe-1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ).encode()
            sock.sendto(options, ("127.0.0.1", settings.port))
            reply, _ = await asyncio.get_running_loop().run_in_executor(None, sock.recvfrom, 4096)
            assert reply.startswith(b"SIP/2.0 200"), reply[:80]

        # None of that became a call, and a real call (with SIP INFO DTMF) still works.
        assert not host.events
        result = await run_sipp(
            "uac_info_dtmf.xml", target, workdir=tmp_path / "dtmf", local_port=sipp_uac(),
            media_port=sipp_media(), timeout_s=10,
        )
        assert result.ok, result.errors[-1500:] or result.output[-1500:]
        initiated = (await host.wait_for(EventType.INITIATED))[0]
        assert initiated.from_number == "+15550002000"
        digits = await host.wait_for(EventType.DTMF, initiated.provider_call_id, count=2, timeout=5)
        assert [d.digits for d in digits] == ["7", "#"]
        ended = (await host.wait_for(EventType.ENDED, initiated.provider_call_id))[0]
        assert ended.reason is CallState.HANGUP_USER


@pytest.mark.parametrize(
    ("code", "reason"),
    [(486, CallState.BUSY), (480, CallState.NO_ANSWER), (404, CallState.FAILED)],
)
async def test_outbound_final_responses_map_to_end_reasons(tmp_path: Path, code: int, reason: CallState) -> None:
    settings = _settings()
    uas_port = sipp_uas()
    scenario = tmp_path / f"uas_{code}.xml"
    scenario.write_text((SCENARIOS / "uas_reply.xml").read_text().replace("CODE", str(code)))
    async with running_carrier(settings) as (host, carrier):
        uas = asyncio.create_task(
            run_sipp(
                str(scenario), None, workdir=tmp_path / "uas", local_port=uas_port,
                media_port=sipp_media(), timeout_s=10,
            )
        )
        await asyncio.sleep(0.3)  # let sipp bind
        uri = f"sip:callee@127.0.0.1:{uas_port}"
        record = host.outbound_record(uri)
        pid = await carrier.initiate_call(record, OutboundRequest(uri, "", "hi", "notify", True))
        await host.wait_for(EventType.RINGING, pid)
        ended = (await host.wait_for(EventType.ENDED, pid))[0]
        assert ended.reason is reason
        assert ended.call_id == record.callId
        result = await uas
        assert result.ok, result.errors[-1500:] or result.output[-1500:]


async def test_a_crashed_worker_ends_its_calls_and_is_replaced(tmp_path: Path, caller_audio: tuple[Path, Path]) -> None:
    """kill -9 one of two workers mid-call: its calls end as errors, the other worker's calls carry
    on to a normal hang-up, and a new worker takes the dead one's place for the next calls."""
    _, ulaw = caller_audio
    settings = _settings(workers=2)
    async with running_carrier(settings) as (host, carrier):
        load = asyncio.create_task(run_sipp(
            "uac_audio.xml", f"127.0.0.1:{settings.port}", workdir=_workdir(tmp_path, "crash", ulaw),
            local_port=sipp_uac(), media_port=sipp_media(), calls=4, limit=4, rate=50, hold_ms=2500, timeout_s=8,
        ))
        await host.wait_for(EventType.ANSWERED, count=4, timeout=10)
        assert carrier.peak_calls_per_worker() == [2, 2]
        victim, survivor = carrier.worker_pids()
        os.kill(victim, 9)
        ended = await host.wait_for(EventType.ENDED, count=4, timeout=10)
        assert sorted(e.reason for e in ended) == [CallState.ERROR] * 2 + [CallState.HANGUP_USER] * 2
        await load  # sipp gets no answer to the BYEs of the two lost calls: its verdict is moot here

        async def replaced() -> list[int]:
            while True:
                pids = carrier.worker_pids()
                if len(pids) == 2 and victim not in pids:
                    return pids
                await asyncio.sleep(0.05)

        pids = await asyncio.wait_for(replaced(), 10)
        assert survivor in pids
        result = await run_sipp(
            "uac_audio.xml", f"127.0.0.1:{settings.port}", workdir=_workdir(tmp_path, "after", ulaw),
            local_port=sipp_uac(), media_port=sipp_media(), calls=8, limit=8, rate=50, hold_ms=1000, timeout_s=15,
        )
        assert result.ok, result.errors[-1500:] or result.output[-1500:]
        after = await host.wait_for(EventType.ENDED, count=12, timeout=5)
        assert [e.reason for e in after[4:]] == [CallState.HANGUP_USER] * 8
