"""The SIP account: REGISTER with digest auth against a registrar, E.164 calls through an outbound
proxy that challenges the INVITE, SIP over TCP. sipp plays registrar / trunk and checks the digest."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from bridge.calls import CallState, EventType
from carriers.base import CarrierError, OutboundRequest
from carriers.sip.settings import SipSettings
from tests.peers.harness import running_carrier, skip_reason
from tests.peers.ports import bridge_rtp, bridge_sip, sipp_media, sipp_uac, sipp_uas
from tests.peers.sipp import run_sipp

_reason = skip_reason("sipp")
pytestmark = [pytest.mark.realpeer, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

PASSWORD = "s3cret-Pa55word"


def _uas(tmp_path: Path, scenario: str, port: int, password: str = PASSWORD) -> asyncio.Task:  # type: ignore[type-arg]
    return asyncio.create_task(
        run_sipp(
            scenario, None, workdir=tmp_path / scenario, local_port=port, media_port=sipp_media(),
            timeout_s=12, keys={"user": "bot", "pass": password},
        )
    )


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "2-workers"])
async def test_register_with_digest_auth_and_unregister(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="voicecall.sip")
    monkeypatch.setenv("SIPP_TRACE", "1")  # the registrar writes every SIP message it sees
    registrar_port = sipp_uas()
    registrar = _uas(tmp_path, "uas_registrar.xml", registrar_port)
    await asyncio.sleep(0.3)
    settings = SipSettings.model_validate(
        {
            "port": bridge_sip(),
            "rtpPortStart": bridge_rtp(),
            "rtpPortRange": 100,
            "workers": workers,
            "logLevel": 5,  # pjsip's own log, SIP messages included: the password must still not appear
            "account": {
                "registrar": f"sip:127.0.0.1:{registrar_port}",
                "username": "bot",
                "password": PASSWORD,
                "domain": "lab.example",
            },
        }
    )
    async with running_carrier(settings) as (_, carrier):
        reg = await carrier.wait_registered(10)
        assert reg["code"] == 200 and reg["active"]
        assert carrier.describe()["registration"]["code"] == 200
    result = await registrar  # the un-REGISTER at close() completes the scenario
    assert result.ok, result.errors[-1500:] or result.output[-1500:]
    # Registered at the public SIP port, also with workers: the trunk's INVITEs reach the front.
    trace = (tmp_path / "uas_registrar.xml" / "msg.log").read_text(errors="replace")
    contacts = set(re.findall(r"^Contact: *<(sip:[^;>]*)", trace, re.MULTILINE | re.IGNORECASE))
    assert contacts == {f"sip:bot@127.0.0.1:{settings.port}"}, contacts
    assert PASSWORD not in trace
    if workers == 1:  # pjsip's log of this process (workers log to their own stderr)
        assert "Authorization: Digest" in caplog.text  # the SIP trace was logged...
        assert PASSWORD not in caplog.text  # ...without the password


async def test_wrong_password_is_reported(tmp_path: Path) -> None:
    registrar_port = sipp_uas()
    registrar = _uas(tmp_path, "uas_registrar.xml", registrar_port, password="another-password")
    await asyncio.sleep(0.3)
    settings = SipSettings.model_validate(
        {
            "port": bridge_sip(),
            "rtpPortStart": bridge_rtp(),
            "rtpPortRange": 100,
            "account": {"registrar": f"sip:127.0.0.1:{registrar_port}", "username": "bot",
                        "password": PASSWORD, "domain": "lab.example"},
        }
    )
    async with running_carrier(settings) as (_, carrier):
        with pytest.raises(CarrierError, match="403"):
            await carrier.wait_registered(10)
    result = await registrar  # the scenario's bad-credentials branch (403) ran to its end
    assert result.ok, result.errors[-1500:] or result.output[-1500:]


async def test_e164_call_through_authenticating_trunk(tmp_path: Path) -> None:
    trunk_port = sipp_uas()
    trunk = _uas(tmp_path, "uas_trunk.xml", trunk_port)
    await asyncio.sleep(0.3)
    settings = SipSettings.model_validate(
        {
            "port": bridge_sip(),
            "rtpPortStart": bridge_rtp(),
            "rtpPortRange": 100,
            "account": {"username": "bot", "password": PASSWORD, "domain": "trunk.example",
                        "outboundProxy": f"sip:127.0.0.1:{trunk_port};lr"},
        }
    )
    async with running_carrier(settings) as (host, carrier):
        record = host.outbound_record("+15551234567")
        pid = await carrier.initiate_call(record, OutboundRequest("+15551234567", "", "hi", "notify", True))
        await host.wait_for(EventType.RINGING, pid)
        ended = (await host.wait_for(EventType.ENDED, pid))[0]
        assert ended.reason is CallState.BUSY
    result = await trunk
    assert result.ok, result.errors[-1500:] or result.output[-1500:]


async def test_sip_over_tcp(tmp_path: Path) -> None:
    settings = SipSettings(port=bridge_sip(), rtpPortStart=bridge_rtp(), rtpPortRange=100, transport="tcp")
    async with running_carrier(settings) as (host, _):
        result = await run_sipp(
            "uac_info_dtmf.xml", f"127.0.0.1:{settings.port}", workdir=tmp_path / "tcp",
            local_port=sipp_uac(), media_port=sipp_media(), timeout_s=10, transport="t1",
        )
        assert result.ok, result.errors[-1500:] or result.output[-1500:]
        pid = (await host.wait_for(EventType.ANSWERED))[0].provider_call_id
        digits = await host.wait_for(EventType.DTMF, pid, count=2)
        assert [d.digits for d in digits] == ["7", "#"]
        assert (await host.wait_for(EventType.ENDED, pid))[0].reason is CallState.HANGUP_USER
