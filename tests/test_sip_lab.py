"""The docker lab without an engine: the compose file validates (Debian's docker-compose), and the
same bridge config (config/lab.yaml) and softphone config (docker/softphone/) complete a call
natively on 127.0.0.1: the softphone calls the real bridge, hears the greeting, hangs up."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.peers.audio import read_pcm, rms, silence_wav, speech_wav
from tests.peers.harness import skip_reason
from tests.peers.ports import bridge_rtp, bridge_sip, phone_ctrl, phone_rtp, phone_sip

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"
SOFTPHONE = ROOT / "docker" / "softphone"
LAB = ROOT / "config" / "lab.yaml"
DOCKER_COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose is not installed (apt-get install docker-compose)")
def test_compose_file_validates() -> None:
    assert DOCKER_COMPOSE
    run = subprocess.run(
        [DOCKER_COMPOSE, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr
    services = subprocess.run(
        [DOCKER_COMPOSE, "-f", str(COMPOSE), "--profile", "asterisk", "config", "--services"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.split()
    assert set(services) == {"bridge", "softphone", "asterisk", "redis", "node1", "node2", "kamailio", "balancer"}
    # docker-compose 1.29 lists profiled services too; the profile itself is checked on the YAML.
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    assert compose["asterisk"]["profiles"] == ["asterisk"]
    assert all(compose[name]["profiles"] == ["cluster"] for name in ("redis", "node1", "node2", "kamailio", "balancer"))
    assert "profiles" not in compose["bridge"] and "profiles" not in compose["softphone"]


def test_compose_wiring_matches_the_lab_config() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    bridge, phone = compose["services"]["bridge"], compose["services"]["softphone"]
    assert bridge["networks"] == phone["networks"] == ["lab"]
    assert "../config/lab.yaml:/etc/voicecall/lab.yaml:ro" in bridge["volumes"]
    assert bridge["command"][-1] == "/etc/voicecall/lab.yaml"
    assert phone["depends_on"]["bridge"]["condition"] == "service_healthy"
    lab = yaml.safe_load(LAB.read_text())
    sip = lab["sip"]
    ports = " ".join(bridge["ports"])
    assert f"{sip['port']}:{sip['port']}/udp" in ports
    first, last = sip["rtpPortStart"], sip["rtpPortStart"] + sip["rtpPortRange"] - 1
    assert f"{first}-{last}:{first}-{last}/udp" in ports
    assert f":{lab['serve']['port']}:{lab['serve']['port']}/tcp" in ports
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and "http://127.0.0.1:3334/healthz" in dockerfile
    assert '".[sip' in dockerfile
    accounts = (SOFTPHONE / "accounts").read_text()
    assert "answermode=auto" in accounts
    assert "sip:lab@bridge:5060" in (SOFTPHONE / "contacts").read_text()


def test_cluster_profile_puts_kamailio_in_front_of_the_sip_nodes() -> None:
    """The SIP front of the cluster profile lists exactly the profile's bridge nodes, at their SIP port,
    and the nodes' config (config/cluster.yaml) is a valid SIP + Redis config."""
    from bridge.config import build_settings

    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    nodes = sorted(name for name, svc in compose.items()
                   if svc.get("profiles") == ["cluster"] and "cluster.yaml" in " ".join(svc.get("command", [])))
    assert nodes == ["node1", "node2"]
    assert set(compose["kamailio"]["depends_on"]) == set(nodes)
    assert compose["kamailio"]["build"]["context"] == "kamailio"
    settings = build_settings(yaml.safe_load((ROOT / "config" / "cluster.yaml").read_text()), {})
    assert settings.provider == "sip" and settings.cluster is not None
    listed = [line.split()[1] for line in (ROOT / "docker" / "kamailio" / "dispatcher.list").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed == [f"sip:{node}:{settings.sip.port}" for node in nodes]
    dockerfile = (ROOT / "docker" / "kamailio" / "Dockerfile").read_text()
    assert "COPY kamailio.cfg dispatcher.list /etc/kamailio/" in dockerfile and "USER kamailio" in dockerfile


def test_lab_config_is_valid() -> None:
    from bridge.config import build_settings

    settings = build_settings(yaml.safe_load(LAB.read_text()), {})
    assert settings.provider == "sip"
    assert settings.inboundPolicy == "open"
    assert settings.sip.port == 5060 and settings.sip.codecs[0] == "PCMU"
    assert settings.sip.worker_count(settings.maxConcurrentCalls) == 2  # the lab runs the SIP front + 2 workers


def _native_softphone_config(workdir: Path, sip_port: int, ctrl_port: int, rtp: int, source: Path) -> None:
    """docker/softphone/ with only the container's addresses and paths swapped for local ones."""
    workdir.mkdir(parents=True)
    (workdir / "rec").mkdir()
    swaps = {
        "sip_listen": f"127.0.0.1:{sip_port}",
        "ctrl_tcp_listen": f"127.0.0.1:{ctrl_port}",
        "rtp_ports": f"{rtp}-{rtp + 40}",
        "audio_source": f"aufile,{source}",
        "snd_path": str(workdir / "rec"),
    }
    lines = []
    for line in (SOFTPHONE / "config").read_text().splitlines():
        key = line.split(maxsplit=1)[0] if line.strip() and not line.startswith("#") else ""
        lines.append(f"{key} {swaps[key]}" if key in swaps else line)
    lines.append("net_interface 127.0.0.1")
    (workdir / "config").write_text("\n".join(lines) + "\n")
    accounts = (SOFTPHONE / "accounts").read_text().replace("@softphone:5060", f"@127.0.0.1:{sip_port}")
    (workdir / "accounts").write_text(accounts)
    (workdir / "contacts").write_text("")


_reason = skip_reason("baresip", "espeak-ng", "sox")
if _reason is None and importlib.util.find_spec("pocketsphinx") is None:
    _reason = "pocketsphinx is not installed (the `offline` extra): config/lab.yaml uses it for speech-to-text"
_lab_peer = pytest.mark.skipif(_reason is not None, reason=_reason or "")


def _lab_config() -> dict[str, Any]:
    """config/lab.yaml with only the container's addresses swapped for free local ports."""
    raw: dict[str, Any] = yaml.safe_load(LAB.read_text())
    raw["sip"].update(bindAddress="127.0.0.1", port=bridge_sip(), rtpPortStart=bridge_rtp())
    return raw


@contextlib.asynccontextmanager
async def _softphone(tmp_path: Path, source: Path, *extra: str) -> AsyncIterator[tuple[Path, int]]:
    """baresip with docker/softphone/'s config, run natively; yields (its folder, its SIP port)."""
    from tests.peers.baresip import BARESIP

    phone_port = phone_sip()
    phone_dir = tmp_path / "softphone"
    _native_softphone_config(phone_dir, phone_port, phone_ctrl(), phone_rtp(), source)
    with open(phone_dir / "baresip.log", "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            # -t: baresip quits by itself after 60 s if the test could not stop it (it always does at the
            # end); 25 s ran out in the warm-transfer test beside two other test processes
            str(BARESIP), "-f", str(phone_dir), "-t", "60", *extra,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            yield phone_dir, phone_port
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 3)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


def _voiced_frames(phone_dir: Path, seconds: float) -> tuple[int, float | None]:
    """In the first `seconds` of what the softphone heard (its recording starts when the call is
    established): how many 20 ms frames carry speech, and when the first one came (s)."""
    heard_files = sorted((phone_dir / "rec").glob("dump-*-dec.wav"))
    assert heard_files, (phone_dir / "baresip.log").read_text(errors="replace")[-2000:]
    heard, rate = read_pcm(heard_files[-1])
    window = heard[: int(rate * seconds)]
    step = rate // 50
    voiced = [i for i in range(0, len(window), step) if rms(window[i : i + step]) > 300]
    return len(voiced), (voiced[0] / rate if voiced else None)


@pytest.mark.realpeer
@_lab_peer
async def test_lab_softphone_calls_the_bridge(tmp_path: Path) -> None:
    from bridge.calls import CallState, Direction
    from tests.harness import run_bridge, wait_for

    raw = _lab_config()
    # Silent while the greeting plays (speech would barge in), then one word, then silence.
    caller = speech_wav(tmp_path / "caller.wav", "hello", lead_s=5.0, pad_s=1.5)
    async with run_bridge(raw, tmp_path / "store") as runtime:
        assert runtime.carrier.name == "sip"
        assert len(runtime.carrier.worker_pids()) == 2
        async with _softphone(tmp_path, caller, "-e", f"/dial sip:lab@127.0.0.1:{raw['sip']['port']}") as (
            phone_dir, _port,
        ):
            manager = runtime.manager
            await wait_for(lambda: any(c.direction is Direction.INBOUND for c in manager.calls.values()), 10)
            call = next(iter(manager.calls.values()))
            assert call.from_ == "sip:softphone@127.0.0.1"
            # The caller's WAV ends after ~8 s: baresip hangs up.
            await wait_for(lambda: call.terminal, 20)
            assert call.state is CallState.HANGUP_USER, call
            assert call.answeredAt is not None
            assert any(t.speaker == "bot" for t in call.transcript), call.transcript
    voiced, first = _voiced_frames(phone_dir, 4.0)
    assert voiced >= 50, f"the softphone heard no greeting ({voiced} voiced 20 ms frames in 4 s)"
    print(f"\n[lab] inbound: greeting audible {first:.2f} s after the call was established")


@pytest.mark.realpeer
@_lab_peer
async def test_lab_bridge_calls_the_softphone(tmp_path: Path) -> None:
    from bridge.calls import CallState
    from tests.harness import run_bridge, wait_for

    raw = _lab_config()
    quiet = silence_wav(tmp_path / "quiet.wav", 15.0)  # the callee just listens
    async with run_bridge(raw, tmp_path / "store") as runtime, _softphone(tmp_path, quiet) as (phone_dir, port):
        await asyncio.sleep(0.3)  # baresip binds its SIP port
        call = await runtime.manager.initiate(
            f"sip:softphone@127.0.0.1:{port}", "Your table for two is booked for eight tonight.", "notify"
        )
        # notify: speak, wait notifyHangupDelaySec, hang up (BYE from the bridge)
        await wait_for(lambda: call.terminal, 20)
        assert call.state is CallState.HANGUP_BOT, call
        assert call.answeredAt is not None
    voiced, first = _voiced_frames(phone_dir, 6.0)
    assert voiced >= 50, f"the softphone did not hear the message ({voiced} voiced 20 ms frames)"
    print(f"\n[lab] outbound: message audible {first:.2f} s after the softphone answered")
