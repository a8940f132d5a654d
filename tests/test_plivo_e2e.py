"""Plivo end to end over real sockets: the bridge (run_bridge) against the fake Plivo (REST, signed
callbacks, XML interpreter, bidirectional Audio Stream) and, for speech-in, the fake OpenAI Realtime."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import numpy as np
import pytest

from bridge.calls import CallState
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.plivo_server import FakePlivo, sign_v3
from tests.harness import run_bridge, wait_for

OUR_NUMBER = "+15550001111"
CALLEE = "+15557654321"
FRIEND = "+15559990000"


@pytest.fixture
async def plivo() -> AsyncIterator[FakePlivo]:
    async with FakePlivo() as fake:
        yield fake


@pytest.fixture
async def openai() -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI(transcripts=["thursday at three works for me"]).start()
    try:
        yield fake
    finally:
        await fake.stop()


def config(plivo: FakePlivo, *, streaming: bool = True, stt: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "provider": "plivo",
        "fromNumber": OUR_NUMBER,
        "plivo": {"authId": plivo.auth_id, "authToken": plivo.auth_token, "apiBaseUrl": plivo.base_url},
        "outbound": {"notifyHangupDelaySec": 0},
        "inboundPolicy": "allowlist",
        "allowFrom": [FRIEND],
        "inboundGreeting": "Hello, you have reached the test line. How can I help?",
        "responseModel": "none",
        "ringTimeoutMs": 2000,
        "transcriptTimeoutMs": 15000,
        "streaming": {"enabled": streaming, "provider": "none", "disconnectGraceMs": 200, **(stt or {})},
    }
    cfg.update(extra)
    return cfg


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def webhook(runtime: Any, **params: str) -> str:
    return runtime.manager.webhook_url(**params)


# ------------------------------------------------------------------ outbound


async def test_outbound_notify_without_stream_speaks_once_and_hangs_up(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo, streaming=False), tmp_path) as runtime:
        manager = runtime.manager
        call = await manager.initiate(CALLEE, "Your parcel arrives tomorrow.", "notify")
        [create] = plivo.rest("POST", "/Call/")
        body = create.body
        assert (body["from"], body["to"]) == (OUR_NUMBER, CALLEE)
        assert query(body["answer_url"]) == {"callId": call.callId, "flow": "answer"}
        assert query(body["hangup_url"]) == {"callId": call.callId, "flow": "hangup"}
        assert query(body["ring_url"]) == {"callId": call.callId, "flow": "ring"}
        assert (body["answer_method"], body["hangup_method"], body["ring_method"]) == ("POST", "POST", "POST")
        assert body["ring_timeout"] == 2
        fake_call = plivo.call()
        assert call.providerCallId == fake_call.request_uuid
        await wait_for(lambda: call.terminal, 10)
        assert call.state == CallState.HANGUP_BOT
        assert fake_call.spoken == ["Your parcel arrives tomorrow."]  # said once, by Plivo's <Speak>
        assert call.providerCallId == fake_call.uuid  # request_uuid upgraded to the CallUUID
        assert fake_call.request_uuid in call.metadata["previousProviderCallIds"]
        assert call.answeredAt is not None
        await wait_for(lambda: not fake_call.live)
        assert all(cb.status == 200 for cb in plivo.callbacks)


async def test_outbound_notify_over_the_stream(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo), tmp_path) as runtime:
        call = await runtime.manager.initiate(CALLEE, "This is a reminder about your appointment.", "notify")
        await wait_for(lambda: call.terminal, 15)
        fake_call = plivo.call()
        stream = fake_call.stream
        assert stream is not None
        assert call.state == CallState.HANGUP_BOT
        assert rms(stream.heard_pcm()) > 300 and len(stream.heard) > 8000  # over a second of speech
        assert stream.played and stream.played == stream.checkpoints
        assert fake_call.spoken == []  # no <Speak>: the bridge's own voice over the stream
        assert plivo.rest("DELETE", f"/Call/{fake_call.uuid}/")
        await wait_for(lambda: not fake_call.live)


async def test_outbound_conversation_one_turn_over_the_stream(plivo: FakePlivo, openai: FakeOpenAI,
                                                              tmp_path: Path) -> None:
    stt = {"provider": "openai", "providers": {"openai": {"apiKey": openai.api_key, "baseUrl": openai.base_url,
                                                          "silenceDurationMs": 300}}}
    async with run_bridge(config(plivo, stt=stt), tmp_path) as runtime:
        manager = runtime.manager
        call = await manager.initiate(CALLEE, "Hi, this is the clinic calling.", "conversation")
        await wait_for(lambda: plivo.calls and plivo.call().stream is not None and plivo.call().stream.played, 15)
        stream = plivo.call().stream
        assert stream is not None
        turn = asyncio.ensure_future(manager.continue_call(call.callId, "Which day works for you?"))
        await wait_for(lambda: len(stream.played) >= 2, 15)  # the question has been heard in full
        await stream.say("Thursday at three works for me.")
        transcript = await asyncio.wait_for(turn, 15)
        assert transcript == "thursday at three works for me"
        heard_before = len(stream.heard)
        await manager.speak(call.callId, "Great, see you on Thursday.")
        reply = stream.heard_pcm()[heard_before * 2:]
        assert rms(reply) > 300 and len(reply) > 16000  # the reply went out through the stream
        assert [t.speaker for t in call.transcript] == ["bot", "bot", "user", "bot"]
        assert openai.sessions and openai.sessions[0].appends > 0
        await manager.end(call.callId)
        assert call.state == CallState.HANGUP_BOT
        await wait_for(lambda: stream.closed.is_set())


async def test_outbound_conversation_native_speak_and_getinput(plivo: FakePlivo, tmp_path: Path) -> None:
    plivo.default_replies = ["hello who is this", "tomorrow morning"]
    async with run_bridge(config(plivo, streaming=False, responseModel="offline"), tmp_path) as runtime:
        manager = runtime.manager
        call = await manager.initiate(CALLEE, "Hi, this is the clinic.", "conversation")
        fake_call = plivo.call()
        # The greeting is the prompt of the first GetInput; the answer is auto-responded to (offline responder).
        await wait_for(lambda: len(plivo.callbacks_for("getinput")) == 1, 10)
        await wait_for(lambda: len(plivo.callbacks_for("spoken")) == 1, 10)
        transcript = await asyncio.wait_for(manager.continue_call(call.callId, "When can you come in?"), 15)
        assert transcript == "tomorrow morning"
        first, second = plivo.callbacks_for("getinput")
        listen = [cb for cb in plivo.callbacks_for("xml-listen")]
        assert len(listen) == 1 and query(second.url)["turnToken"] == query(listen[0].url)["turnToken"]
        assert query(first.url)["turnToken"] != query(second.url)["turnToken"]
        assert fake_call.spoken[0] == "Hi, this is the clinic."
        assert "When can you come in?" in fake_call.spoken
        transfers = plivo.rest("POST", f"/Call/{fake_call.uuid}/")
        assert all(t.body["legs"] == "aleg" and t.body["aleg_method"] == "POST" for t in transfers)
        assert [query(t.body["aleg_url"])["flow"] for t in transfers] == ["xml-speak", "xml-speak", "xml-listen"]
        await manager.send_dtmf(call.callId, "12#")  # no stream: Plivo's DTMF API
        assert plivo.dtmf_sent == [(fake_call.uuid, "12#")]
        await manager.end(call.callId)
        await wait_for(lambda: not fake_call.live)


async def test_hang_up_before_answer_cancels_the_request(plivo: FakePlivo, tmp_path: Path) -> None:
    plivo.no_answer_numbers.add(CALLEE)
    plivo.ring_delay_s = 0.3
    async with run_bridge(config(plivo, maxConcurrentCalls=2), tmp_path) as runtime:
        queued = await runtime.manager.initiate(CALLEE, "Hello", "notify")
        await runtime.manager.end(queued.callId)  # still queued: no CallUUID known yet
        ringing = await runtime.manager.initiate(CALLEE, "Hello", "notify")
        await wait_for(lambda: ringing.state == CallState.RINGING, 5)
        assert ringing.providerCallId == plivo.call().uuid  # the ring callback already linked the CallUUID
        await runtime.manager.end(ringing.callId)
        first, second = plivo.calls.values()
        cancels = plivo.rest("DELETE", "/")
        assert [(r.path.split("/")[-3], r.status) for r in cancels] == [("Request", 204), ("Request", 204)]
        assert cancels[0].path.endswith(f"/Request/{first.request_uuid}/")
        assert cancels[1].path.endswith(f"/Request/{second.request_uuid}/")
        await wait_for(lambda: not first.live and not second.live)
        assert first.hangup_params and first.hangup_params["CallStatus"] == "cancel"
        assert queued.state == ringing.state == CallState.HANGUP_BOT


async def test_outbound_busy_and_no_answer(plivo: FakePlivo, tmp_path: Path) -> None:
    plivo.busy_numbers.add("+15550000002")
    plivo.no_answer_numbers.add("+15550000003")
    async with run_bridge(config(plivo, maxConcurrentCalls=2), tmp_path) as runtime:
        busy = await runtime.manager.initiate("+15550000002", "Hello", "notify")
        silent = await runtime.manager.initiate("+15550000003", "Hello", "notify")
        await wait_for(lambda: busy.terminal and silent.terminal, 10)
        assert busy.state == CallState.BUSY
        assert silent.state == CallState.NO_ANSWER


# ------------------------------------------------------------------ inbound


async def test_inbound_allowlisted_call_is_greeted_over_the_stream(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo), tmp_path) as runtime:
        # The Plivo application's answer URL is the bare webhook (no flow): inferred from the callback.
        fake_call = await plivo.inbound_call(FRIEND, OUR_NUMBER, webhook(runtime), webhook(runtime, flow="hangup"))
        await wait_for(lambda: fake_call.stream is not None and bool(fake_call.stream.played), 15)
        stream = fake_call.stream
        assert stream is not None
        [call] = runtime.manager.calls.values()
        assert call.direction == "inbound" and call.providerCallId == fake_call.uuid
        assert (call.from_, call.to) == (FRIEND, OUR_NUMBER)
        assert rms(stream.heard_pcm()) > 300 and len(stream.heard) > 12000  # about two seconds of greeting
        assert call.transcript[0].text == "Hello, you have reached the test line. How can I help?"
        await fake_call.hang_up()
        await wait_for(lambda: call.terminal)
        assert call.state == CallState.HANGUP_USER


async def test_inbound_call_without_stream_is_greeted_by_plivo_and_listened_to(plivo: FakePlivo,
                                                                                tmp_path: Path) -> None:
    plivo.default_replies = ["I would like to book a table"]
    async with run_bridge(config(plivo, streaming=False, responseModel="offline"), tmp_path) as runtime:
        fake_call = await plivo.inbound_call(FRIEND, OUR_NUMBER, webhook(runtime, flow="answer"),
                                             webhook(runtime, flow="hangup"))
        await wait_for(lambda: len(plivo.callbacks_for("getinput")) == 1, 10)
        [call] = runtime.manager.calls.values()
        assert fake_call.spoken[0] == "Hello, you have reached the test line. How can I help?"
        await wait_for(lambda: any(t.text == "I would like to book a table" for t in call.transcript), 5)
        # The offline responder answers through Plivo's <Speak> (the call is transferred to it).
        await wait_for(lambda: len(fake_call.spoken) >= 2, 10)
        await fake_call.hang_up()
        await wait_for(lambda: call.terminal)
        assert call.state == CallState.HANGUP_USER


async def test_inbound_caller_not_allowed_is_rejected_in_the_answer_xml(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo), tmp_path) as runtime:
        fake_call = await plivo.inbound_call("+15553334444", OUR_NUMBER, webhook(runtime, flow="answer"),
                                             webhook(runtime, flow="hangup"))
        await wait_for(lambda: not fake_call.live, 5)
        assert fake_call.hangup_params is not None and fake_call.hangup_params["HangupCause"] == "CALL_REJECTED"
        assert '<Hangup reason="rejected" />' in fake_call.xml[0] or '<Hangup reason="rejected"/>' in fake_call.xml[0]
        assert not runtime.manager.active_calls() and not runtime.manager.calls
        await runtime.manager.drain()
        assert not [r for r in plivo.requests if r.method == "DELETE"]  # the XML refused it; no REST hang-up
        assert fake_call.streams == []


# ------------------------------------------------------------------ in-call behaviour


async def _answered_stream_call(runtime: Any, plivo: FakePlivo, message: str) -> tuple[Any, Any]:
    call = await runtime.manager.initiate(CALLEE, message, "conversation")
    await wait_for(lambda: plivo.calls and plivo.call().stream is not None and bool(plivo.call().stream.played), 15)
    return call, plivo.call().stream


async def test_barge_in_clears_the_plivo_buffer(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo), tmp_path) as runtime:
        call, stream = await _answered_stream_call(runtime, plivo, "Hi.")
        long_text = ("Let me read you the full list of available appointment slots for the coming week, "
                     "starting with Monday morning and going all the way through to Friday afternoon.")
        speaking = asyncio.ensure_future(runtime.manager.speak(call.callId, long_text))
        await wait_for(lambda: len(stream.heard) > 4000, 10)  # half a second into the reply
        await stream.say("Wait, wait, stop please.")
        await wait_for(lambda: stream.clears >= 1, 5)
        await asyncio.wait_for(speaking, 10)
        assert any(e["event"] == "clearAudio" and e["streamId"] == stream.stream_id for e in stream.events)
        bot = [t for t in call.transcript if t.speaker == "bot"][-1]
        assert bot.text != long_text and long_text.startswith(bot.text)  # only what was heard is kept
        assert call.metadata.get("lastInterruptedText") == long_text


async def test_dtmf_arrives_as_an_event(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo), tmp_path) as runtime:
        call, stream = await _answered_stream_call(runtime, plivo, "Press a key.")
        events = runtime.manager.subscribe()
        await stream.press("5")
        await stream.press("#")
        await wait_for(lambda: call.metadata.get("dtmf") == "5#", 5)
        seen = []
        while not events.empty():
            seen.append(events.get_nowait())
        assert [e["digits"] for e in seen if e["type"] == "call.dtmf"] == ["5", "#"]


async def test_bot_hangs_up_with_delete_and_plivo_confirms(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo), tmp_path) as runtime:
        call, stream = await _answered_stream_call(runtime, plivo, "Hello.")
        await runtime.manager.end(call.callId)
        assert call.state == CallState.HANGUP_BOT
        fake_call = plivo.call()
        assert [r.status for r in plivo.rest("DELETE", f"/Call/{fake_call.uuid}/")] == [204]
        await wait_for(lambda: not fake_call.live and stream.closed.is_set())
        assert fake_call.hangup_params and fake_call.hangup_params["HangupSource"] == "API Request"
        # Hanging up again (already ended at Plivo: 404) is still a success.
        await runtime.carrier.hangup_call(call, CallState.HANGUP_BOT)
        assert [r.status for r in plivo.rest("DELETE", f"/Call/{fake_call.uuid}/")] == [204, 404]


async def test_callee_hangs_up(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo), tmp_path) as runtime:
        call, _ = await _answered_stream_call(runtime, plivo, "Hello.")
        await plivo.call().hang_up()
        await wait_for(lambda: call.terminal, 5)
        assert call.state == CallState.HANGUP_USER
        assert not plivo.rest("DELETE", "/")


async def test_restart_recovery_asks_plivo_for_the_live_call(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo, streaming=False), tmp_path) as runtime:
        call = await runtime.manager.initiate(CALLEE, "Hi.", "conversation")
        await wait_for(lambda: call.answeredAt is not None, 10)
        status = await runtime.carrier.get_call_status(call)
        assert status is not None and not status.terminal
        await runtime.manager.end(call.callId)
        await wait_for(lambda: not plivo.call().live)
        status = await runtime.carrier.get_call_status(call)
        assert status is not None and status.terminal


# ------------------------------------------------------------------ webhook and stream security


async def _post(url: str, params: dict[str, str], headers: dict[str, str]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.post(url, data=params, headers=headers) as resp:
        return resp.status, await resp.text()


async def test_bad_signature_is_401_and_changes_nothing(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo), tmp_path) as runtime:
        url = webhook(runtime, flow="answer")
        params = {"CallUUID": "u-1", "From": FRIEND, "To": OUR_NUMBER, "Direction": "inbound",
                  "CallStatus": "ringing", "Event": "StartApp"}
        nonce = "12345678901234567890"
        bad = {"X-Plivo-Signature-V3": sign_v3("not-the-token", url, params, nonce),
               "X-Plivo-Signature-V3-Nonce": nonce}
        assert (await _post(url, params, bad))[0] == 401
        assert (await _post(url, params, {}))[0] == 401  # no signature header at all
        assert not runtime.manager.calls


async def test_replayed_callback_is_acknowledged_without_effect(plivo: FakePlivo, tmp_path: Path) -> None:
    async with run_bridge(config(plivo, streaming=False), tmp_path) as runtime:
        call = await runtime.manager.initiate(CALLEE, "Hello there.", "conversation")
        await wait_for(lambda: call.answeredAt is not None, 10)
        url = webhook(runtime, callId=call.callId, flow="getinput", turnToken="t-replay")
        params = {**plivo.call().params(), "Speech": "replayed words", "InputType": "speech"}
        nonce = "98765432109876543210"
        headers = {"X-Plivo-Signature-V3": sign_v3(plivo.auth_token, url, params, nonce),
                   "X-Plivo-Signature-V3-Nonce": nonce}
        assert (await _post(url, params, headers))[0] == 200
        count = sum(1 for t in call.transcript if t.text == "replayed words")
        assert count == 1
        status, _ = await _post(url, params, headers)
        assert status == 200
        assert sum(1 for t in call.transcript if t.text == "replayed words") == 1
        await runtime.manager.end(call.callId)


async def _stream_close(runtime: Any, start: dict[str, Any]) -> int | None:
    url = runtime.manager.stream_url()
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_str(json.dumps(start))
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        return ws.close_code


def _start(call_uuid: str, extra: str) -> dict[str, Any]:
    return {"event": "start", "sequenceNumber": 1,
            "start": {"callId": call_uuid, "streamId": "s-x", "accountId": "MA", "tracks": ["inbound"],
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}},
            "extra_headers": extra}


async def test_stream_with_bad_token_or_unknown_call_closes_1008(plivo: FakePlivo, tmp_path: Path) -> None:
    from carriers.plivo.protocol import encode_extra_headers

    async with run_bridge(config(plivo), tmp_path) as runtime:
        call, stream = await _answered_stream_call(runtime, plivo, "Hello.")
        bad_token = encode_extra_headers({"token": "wrong-token", "callId": call.callId})
        assert await _stream_close(runtime, _start(call.providerCallId, bad_token)) == 1008
        no_token = encode_extra_headers({"callId": call.callId})
        assert await _stream_close(runtime, _start(call.providerCallId, no_token)) == 1008
        unknown = encode_extra_headers({"token": "whatever", "callId": "no-such-call"})
        assert await _stream_close(runtime, _start("no-such-uuid", unknown)) == 1008
        assert not stream.closed.is_set()  # the real stream is untouched
        await runtime.manager.end(call.callId)


@pytest.mark.parametrize("outbound_ms", [None, 20])
async def test_outbound_play_audio_messages_on_the_wire(plivo: FakePlivo, tmp_path: Path, outbound_ms: int | None) -> None:
    """streaming.outboundFrameMs (default 40): every playAudio but a play's last carries exactly that
    much u-law; the last is whole 20 ms frames; the checkpoint still comes back after it."""
    cfg = config(plivo)
    if outbound_ms is not None:
        cfg["streaming"]["outboundFrameMs"] = outbound_ms
    async with run_bridge(cfg, tmp_path) as runtime:
        call = await runtime.manager.initiate(CALLEE, "This is a reminder about your appointment.", "notify")
        await wait_for(lambda: call.terminal, 15)
        stream = plivo.call().stream
        assert stream is not None
        sizes = [len(base64.b64decode(e["media"]["payload"])) for e in stream.events if e.get("event") == "playAudio"]
        size = (outbound_ms or 40) * 8
        assert len(sizes) > 10 and sizes[:-1] == [size] * (len(sizes) - 1)
        assert sizes[-1] in range(160, size + 1, 160)
        assert stream.played and stream.played == stream.checkpoints
        assert len(stream.heard) == sum(sizes)  # all of it played
