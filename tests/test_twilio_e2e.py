"""Twilio end to end over real sockets: the bridge (run_bridge) against the fake Twilio, which sends
signed webhooks, runs the TwiML the bridge answers, and opens real Media Streams."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import numpy as np
import pytest

from bridge.calls import CallState, Direction
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_server import CallerScript, FakeTwilio, TwilioMediaStreamClient, twilio_sign
from tests.harness import rpc_client, run_bridge, wait_for

ALLOWED = "+15550009999"
OUR_NUMBER = "+15550001234"


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


def config(fake: FakeTwilio, *, stream: bool, openai: FakeOpenAI | None = None, **extra: Any) -> dict[str, Any]:
    streaming: dict[str, Any] = {"enabled": stream, "provider": "none"}
    if openai is not None:
        streaming = {"enabled": stream, "provider": "openai",
                     "providers": {"openai": {"apiKey": openai.api_key, "baseUrl": openai.base_url,
                                              "silenceDurationMs": 300}}}
    return {
        "provider": "twilio",
        "fromNumber": OUR_NUMBER,
        "toNumber": "+15550005678",
        "inboundPolicy": "allowlist",
        "allowFrom": [ALLOWED],
        "outbound": {"notifyHangupDelaySec": 1},
        "maxConcurrentCalls": 3,
        "twilio": {"accountSid": fake.account_sid, "authToken": fake.auth_token, "apiBaseUrl": fake.api_base_url},
        "streaming": streaming,
        "tts": {"provider": "espeak"},
        "responseModel": "offline",
        **extra,
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(say_chars_per_second=40) as server:
        yield server


@pytest.fixture
async def openai() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI(transcripts=["I need a table for two"]).start()
    try:
        yield server
    finally:
        await server.stop()


def only_call(fake: FakeTwilio) -> Any:
    [call] = fake.calls.values()
    return call


def twiml_updates(fake: FakeTwilio) -> list[str]:
    return [form["Twiml"][0] for form in fake.rest("POST") if "Twiml" in form]


# ====================================================================== outbound


async def test_notify_without_stream_says_the_message_once_then_hangs_up(fake: FakeTwilio, tmp_path: Path) -> None:
    async with run_bridge(config(fake, stream=False), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Your table is ready.", "mode": "notify"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.terminal, timeout=15)
        twilio_call = only_call(fake)
        await wait_for(lambda: twilio_call.ended.is_set())
        assert call.state == CallState.HANGUP_BOT
        # served once in the answer TwiML, never again through the REST API (the seed spoke it twice)
        assert twilio_call.said == ["Your table is ready."]
        assert not any("<Say" in doc for doc in twiml_updates(fake))
        answer = twilio_call.fetches("")
        assert len(answer) == 1 and "<Say" in answer[0].body
        # the hang-up came notifyHangupDelaySec after Twilio finished saying it
        assert call.endedAt - call.answeredAt >= len("Your table is ready.") / 40 + 0.9
        assert fake.rest("POST", f"/Calls/{twilio_call.sid}.json")[-1]["Status"] == ["completed"]
        # the fake posts its final status callback after it marked the call ended
        await wait_for(lambda: [h.params["CallStatus"] for h in twilio_call.status_callbacks()][-1:] == ["completed"])
        events = [h.params["CallStatus"] for h in twilio_call.status_callbacks()]
        assert events[:3] == ["initiated", "ringing", "in-progress"] and events[-1] == "completed"


async def test_notify_with_stream_plays_through_the_media_stream(fake: FakeTwilio, tmp_path: Path) -> None:
    async with run_bridge(config(fake, stream=True), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Your table is ready.", "mode": "notify"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.terminal, timeout=20)
        twilio_call = only_call(fake)
        stream = twilio_call.stream
        assert stream is not None
        connect = ET.fromstring(twilio_call.fetches("")[0].body).find("Connect/Stream")
        assert connect is not None and "token" not in connect.get("url", "")
        assert stream.parameters == {"token": call.metadata["streamToken"], "callId": call_id}
        heard = stream.heard_pcm()
        assert len(heard) / 2 / 8000 > 0.8 and rms(heard) > 300, "the callee heard the message"
        assert stream.marks_echoed, "a mark followed the message and came back"
        assert call.state == CallState.HANGUP_BOT
        assert twiml_updates(fake) == [], "live TwiML is never replaced under a media stream"
        assert twilio_call.said == []


async def test_conversation_turn_through_the_media_stream(fake: FakeTwilio, openai: FakeOpenAI,
                                                          tmp_path: Path) -> None:
    """Greeting out, the caller's speech in (stream -> STT), the auto-reply out through the stream."""
    fake.default_script = CallerScript(utterances=["I need a table for two."])
    async with run_bridge(config(fake, stream=True, openai=openai), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hello, how can I help?",
                                                            "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        reply = "Got it: I need a table for two. Is there anything else?"
        await wait_for(lambda: any(t.text == reply for t in call.transcript), timeout=25)
        stream = only_call(fake).stream
        assert stream is not None
        marks_before_reply = len(stream.marks_echoed)
        await wait_for(lambda: len(stream.marks_echoed) > marks_before_reply, timeout=20)
        texts = [(t.speaker, t.text) for t in call.transcript]
        assert texts[:3] == [("bot", "Hello, how can I help?"), ("user", "I need a table for two"), ("bot", reply)]
        assert rms(stream.heard_pcm()) > 300
        assert openai.sessions and len(openai.sessions[0].audio) > 8000, "the caller's audio reached the STT"
        await client.call("voicecall.end", {"callId": call_id})
        assert call.state == CallState.HANGUP_BOT


async def test_conversation_turn_without_stream_uses_say_and_gather(fake: FakeTwilio, tmp_path: Path) -> None:
    fake.default_script = CallerScript(gather_timeout_s=0.3)
    async with run_bridge(config(fake, stream=False), tmp_path) as runtime:
        client = rpc_client(runtime)
        call_id = (await client.call("voicecall.initiate", {"message": "Hi there!", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        twilio_call = only_call(fake)
        turn = asyncio.ensure_future(client.call("voicecall.continue", {"callId": call_id,
                                                                        "message": "And your second choice?"}))
        await wait_for(lambda: any("turnToken" in doc for doc in twiml_updates(fake)), timeout=10)
        twilio_call.utterances.append("Green is my second choice.")  # the person answers the question
        assert await turn == {"success": True, "transcript": "Green is my second choice."}
        assert twilio_call.said == ["Hi there!", "And your second choice?"]
        [turn_gather] = [doc for doc in twiml_updates(fake) if "turnToken" in doc]
        gather = ET.fromstring(turn_gather).find("Gather")
        assert gather is not None and gather.get("input") == "speech"
        token = dict(parse_qsl(urlsplit(gather.get("action", "")).query))["turnToken"]
        answered = [h for h in twilio_call.fetches() if h.params.get("SpeechResult") == "Green is my second choice."]
        assert answered and f"turnToken={token}" in answered[0].url
        # the question was fully said before the Gather replaced it
        said_at = [h for h in twilio_call.fetches("said")]
        assert len(said_at) == 2
        await client.call("voicecall.end", {"callId": call_id})


@pytest.mark.parametrize(("outcome", "state"), [("busy", CallState.BUSY), ("no-answer", CallState.NO_ANSWER),
                                                ("failed", CallState.FAILED)])
async def test_unanswered_outcomes(fake: FakeTwilio, tmp_path: Path, outcome: Any, state: CallState) -> None:
    fake.default_script = CallerScript(outcome=outcome)
    async with run_bridge(config(fake, stream=True), tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Hello", "notify")
        await wait_for(lambda: call.terminal, timeout=10)
        assert call.state == state


# ====================================================================== inbound


async def test_inbound_allowlisted_call_hears_the_greeting(fake: FakeTwilio, tmp_path: Path) -> None:
    cfg = config(fake, stream=True, inboundGreeting="Thanks for calling the bistro.")
    async with run_bridge(cfg, tmp_path) as runtime:
        voice_url = runtime.manager.webhook_url()
        twilio_call = await fake.place_inbound(voice_url, from_=ALLOWED, to=OUR_NUMBER)
        await wait_for(lambda: twilio_call.stream is not None and len(twilio_call.stream.marks_echoed) >= 1, timeout=20)
        call = runtime.manager.find_call(provider_call_id=twilio_call.sid)
        assert call is not None and call.direction == Direction.INBOUND and call.from_ == ALLOWED
        heard = twilio_call.stream.heard_pcm()
        assert len(heard) / 2 / 8000 > 1.0 and rms(heard) > 300
        assert call.transcript[0].text == "Thanks for calling the bistro."
        await twilio_call.hang_up()
        await wait_for(lambda: call.terminal, timeout=10)
        assert call.state == CallState.COMPLETED


async def test_inbound_without_stream_greets_with_say_once(fake: FakeTwilio, tmp_path: Path) -> None:
    cfg = config(fake, stream=False, inboundGreeting="Thanks for calling.", responseModel="none")
    async with run_bridge(cfg, tmp_path) as runtime:
        twilio_call = await fake.place_inbound(runtime.manager.webhook_url(), from_=ALLOWED, to=OUR_NUMBER,
                                               script=CallerScript(gather_timeout_s=0.2))
        await wait_for(lambda: len(twilio_call.fetches("listen")) >= 1, timeout=10)
        call = runtime.manager.find_call(provider_call_id=twilio_call.sid)
        assert call is not None and call.state == CallState.LISTENING
        assert twilio_call.said == ["Thanks for calling."]
        assert twiml_updates(fake) == []
        # speaking later goes through the REST API, which also asks for our status callback: the
        # number may have none configured, and the caller hanging up must still end the call
        await rpc_client(runtime).call("voicecall.speak", {"callId": call.callId, "message": "One moment."})
        assert twilio_call.said == ["Thanks for calling.", "One moment."]
        assert fake.rest("POST", f"/Calls/{twilio_call.sid}.json")[0]["StatusCallback"] == \
            [runtime.manager.webhook_url(callId=call.callId, type="status")]
        await twilio_call.hang_up()
        await wait_for(lambda: call.terminal, timeout=5)
        assert call.state == CallState.COMPLETED


async def test_inbound_rejected_by_policy(fake: FakeTwilio, tmp_path: Path) -> None:
    async with run_bridge(config(fake, stream=True), tmp_path) as runtime:
        twilio_call = await fake.place_inbound(runtime.manager.webhook_url(), from_="+15550000001", to=OUR_NUMBER)
        await wait_for(lambda: twilio_call.ended.is_set(), timeout=5)
        [answer] = twilio_call.webhooks
        assert answer.status == 200
        assert [child.tag for child in ET.fromstring(answer.body)] == ["Reject"]
        assert runtime.manager.find_call(provider_call_id=twilio_call.sid) is None
        assert fake.requests == [], "a rejected call needs no REST request"
        assert twilio_call.streams == []


# ====================================================================== in-call media


async def test_barge_in_clears_twilio_buffer(fake: FakeTwilio, tmp_path: Path) -> None:
    long_greeting = ("Hello and welcome. Let me tell you about all of our specials today, starting with the soup, "
                     "then the salads, then the main courses, and finally the desserts.")
    fake.default_script = CallerScript(utterances=["Stop, I just want a table."], barge_in=True, barge_in_after_ms=800)
    async with run_bridge(config(fake, stream=True, responseModel="none"), tmp_path) as runtime:
        call = await runtime.manager.initiate(None, long_greeting, "conversation")
        await wait_for(lambda: only_call(fake).stream is not None and only_call(fake).stream.clears >= 1, timeout=20)
        stream = only_call(fake).stream
        cleared_at = stream.clear_times[0]
        await asyncio.sleep(0.5)
        late = [t for t, _ in stream.received if t > cleared_at + 0.1]
        assert late == [], "no bot audio after the clear"
        assert stream.ms_received < 5000, "the long greeting was cut short"
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=5)
        assert call.metadata.get("lastInterruptedText") == long_greeting
        await rpc_client(runtime).call("voicecall.end", {"callId": call.callId})


async def test_dtmf_from_the_stream_is_an_event(fake: FakeTwilio, tmp_path: Path) -> None:
    fake.default_script = CallerScript(dtmf="42#")
    async with run_bridge(config(fake, stream=True, responseModel="none"), tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Press a key.", "conversation")
        await wait_for(lambda: call.metadata.get("dtmf") == "42#", timeout=10)
        voice = runtime.manager.voice(call.callId)
        assert voice is not None
        # the stream reports key presses itself, so no in-band detector runs on its audio
        assert voice.bridge.transport.reports_dtmf is True  # type: ignore[attr-defined]
        assert (voice.bridge.stats.dtmf_outofband, voice.bridge.stats.dtmf_inband) == (3, 0)
        await rpc_client(runtime).call("voicecall.end", {"callId": call.callId})


async def test_caller_hangs_up_during_stream(fake: FakeTwilio, tmp_path: Path) -> None:
    fake.default_script = CallerScript(hangup_after_ms=600)
    async with run_bridge(config(fake, stream=True, responseModel="none"), tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "This is a long message that will not be heard to its end.",
                                              "conversation")
        await wait_for(lambda: call.terminal, timeout=10)
        assert call.state == CallState.COMPLETED
        stream = only_call(fake).stream
        assert stream is not None and stream.closed.is_set()
        assert fake.rest("POST", f"/Calls/{call.providerCallId}.json") == []


async def test_bot_hangs_up_and_an_ended_call_counts_as_hung_up(fake: FakeTwilio, tmp_path: Path) -> None:
    async with run_bridge(config(fake, stream=True, responseModel="none"), tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Hello.", "conversation")
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        await runtime.manager.end(call.callId)
        twilio_call = only_call(fake)
        await wait_for(lambda: twilio_call.ended.is_set(), timeout=5)
        assert call.state == CallState.HANGUP_BOT and twilio_call.status == "completed"
        # already ended at Twilio (here: unknown sid -> 404) is success, not an error
        ghost = runtime.manager.calls[call.callId]
        ghost.providerCallId = "CA" + "f" * 32
        await runtime.carrier.hangup_call(ghost, CallState.HANGUP_BOT)
        status = await runtime.carrier.get_call_status(ghost)
        assert status is not None and status.terminal


async def test_status_for_restart_recovery(fake: FakeTwilio, tmp_path: Path) -> None:
    async with run_bridge(config(fake, stream=True, responseModel="none"), tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Hello.", "conversation")
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=15)
        live = await runtime.carrier.get_call_status(call)
        assert live is not None and not live.terminal and live.state == CallState.ANSWERED
        await only_call(fake).hang_up()
        await wait_for(lambda: call.terminal)
        done = await runtime.carrier.get_call_status(call)
        assert done is not None and done.terminal and done.state == CallState.COMPLETED


async def test_rest_errors_are_clear_and_creates_are_not_retried(fake: FakeTwilio, tmp_path: Path) -> None:
    async with run_bridge(config(fake, stream=True), tmp_path) as runtime:
        client = rpc_client(runtime)
        fake.fail_next = 503
        with pytest.raises(Exception, match="HTTP 503"):
            await client.call("voicecall.initiate", {"message": "Hello", "mode": "notify"})
        assert len(fake.rest("POST", "/Calls.json")) == 1, "a create is never retried (it could dial twice)"
        cfg = config(fake, stream=True)
        cfg["twilio"]["authToken"] = "wrong"
    async with run_bridge(cfg, tmp_path / "second") as runtime:
        with pytest.raises(Exception, match="HTTP 401: Authenticate"):
            await rpc_client(runtime).call("voicecall.initiate", {"message": "Hello", "mode": "notify"})


# ====================================================================== webhook and stream security


async def signed_post(url: str, params: dict[str, str], token: str, *, signature: str | None = None) -> tuple[int, str]:
    headers = {"X-Twilio-Signature": signature if signature is not None else twilio_sign(token, url, params)}
    async with aiohttp.ClientSession() as session, session.post(url, data=params, headers=headers) as resp:
        return resp.status, await resp.text()


async def test_bad_signature_is_401_and_replay_has_no_side_effect(fake: FakeTwilio, tmp_path: Path) -> None:
    fake.default_script = CallerScript(utterances=[])
    async with run_bridge(config(fake, stream=False, responseModel="none"), tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Hi.", "conversation")
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=10)
        url = runtime.manager.webhook_url(callId=call.callId, type="gather")
        params = {"CallSid": call.providerCallId or "", "SpeechResult": "hello", "Confidence": "0.9"}
        assert (await signed_post(url, params, "not-the-token"))[0] == 401
        async with aiohttp.ClientSession() as session, session.post(url, data=params) as resp:
            assert resp.status == 401  # no signature header at all
        assert not any(t.speaker == "user" for t in call.transcript)
        status, body = await signed_post(url, params, fake.auth_token)
        assert status == 200 and ET.fromstring(body).find("Gather") is not None
        status, _ = await signed_post(url, params, fake.auth_token)  # the same delivery again
        assert status == 200
        assert [t.text for t in call.transcript if t.speaker == "user"] == ["hello"]
        await runtime.manager.end(call.callId)


async def test_stream_with_bad_token_or_unknown_call_is_closed_1008(fake: FakeTwilio, tmp_path: Path) -> None:
    async with run_bridge(config(fake, stream=True, responseModel="none"), tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Hello.", "conversation")
        await wait_for(lambda: only_call(fake).stream is not None, timeout=10)
        stream_url = runtime.manager.stream_url()
        bad = TwilioMediaStreamClient(stream_url, parameters={"token": "wrong", "callId": call.callId},
                                      call_sid=call.providerCallId)
        await bad.connect()
        assert await bad.wait_closed(5) == 1008
        unknown = TwilioMediaStreamClient(stream_url, parameters={"token": call.metadata["streamToken"],
                                                                  "callId": "no-such-call"}, call_sid="CA" + "e" * 32)
        await unknown.connect()
        assert await unknown.wait_closed(5) == 1008
        assert bad.frames_received == unknown.frames_received == 0
        await runtime.manager.end(call.callId)


async def test_too_many_streams_are_refused(fake: FakeTwilio, tmp_path: Path) -> None:
    cfg = config(fake, stream=True, responseModel="none")
    cfg["streaming"]["maxConnections"] = 1
    async with run_bridge(cfg, tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Hello.", "conversation")
        await wait_for(lambda: only_call(fake).stream is not None and only_call(fake).stream.frames_received > 0,
                       timeout=10)
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(runtime.manager.stream_url())
        assert refused.value.status == 503
        await runtime.manager.end(call.callId)


async def test_hang_up_while_ringing_cancels(fake: FakeTwilio, tmp_path: Path) -> None:
    fake.default_script = CallerScript(ring_ms=1000)
    async with run_bridge(config(fake, stream=True), tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Hello", "notify")
        twilio_call = only_call(fake)
        await wait_for(lambda: twilio_call.status == "ringing", timeout=5)
        await runtime.manager.end(call.callId)
        assert fake.rest("POST", f"/Calls/{twilio_call.sid}.json") == [{"Status": ["canceled"]}]
        await wait_for(lambda: twilio_call.ended.is_set(), timeout=5)
        assert twilio_call.status == "canceled" and call.state == CallState.HANGUP_BOT
        assert twilio_call.fetches("") == [], "never answered, the answer URL was never fetched"


async def test_the_official_sdk_drives_the_fake(fake: FakeTwilio) -> None:
    """The twilio SDK as an oracle of the fake's REST API: create, fetch, hang up."""
    from twilio.rest import Client

    sdk = Client(fake.account_sid, fake.auth_token)
    sdk.api.base_url = fake.api_base_url
    loop = asyncio.get_running_loop()
    created = await loop.run_in_executor(None, lambda: sdk.calls.create(
        to="+15550005678", from_=OUR_NUMBER, twiml="<Response><Say>Hi</Say><Pause length=\"5\"/></Response>"))
    assert created.sid.startswith("CA") and created.status == "queued" and created.direction == "outbound-api"
    twilio_call = fake.calls[created.sid]
    await wait_for(lambda: twilio_call.said == ["Hi"], timeout=5)
    fetched = await loop.run_in_executor(None, lambda: sdk.calls(created.sid).fetch())
    assert fetched.status == "in-progress"
    ended = await loop.run_in_executor(None, lambda: sdk.calls(created.sid).update(status="completed"))
    assert ended.status == "completed"
    await wait_for(lambda: twilio_call.ended.is_set())


async def test_bot_hangs_up_an_inbound_call(fake: FakeTwilio, tmp_path: Path) -> None:
    async with run_bridge(config(fake, stream=True, responseModel="none", inboundGreeting="Hi."), tmp_path) as runtime:
        twilio_call = await fake.place_inbound(runtime.manager.webhook_url(), from_=ALLOWED, to=OUR_NUMBER)
        await wait_for(lambda: twilio_call.stream is not None and twilio_call.stream.marks_echoed != [], timeout=10)
        call = runtime.manager.find_call(provider_call_id=twilio_call.sid)
        assert call is not None
        await runtime.manager.end(call.callId)
        await wait_for(lambda: twilio_call.ended.is_set(), timeout=5)
        assert fake.rest("POST", f"/Calls/{twilio_call.sid}.json") == [{"Status": ["completed"]}]
        assert twilio_call.status == "completed" and call.state == CallState.HANGUP_BOT
        await asyncio.wait_for(twilio_call.stream.closed.wait(), 5)  # Twilio stops the stream of an ended call


async def test_long_speech_without_stream_is_served_by_url(fake: FakeTwilio, tmp_path: Path) -> None:
    """The Calls API takes at most 4000 characters of inline TwiML; longer speech comes from our webhook."""
    fake.say_chars_per_second = 4000
    async with run_bridge(config(fake, stream=False, responseModel="none"), tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Hello.", "conversation")
        await wait_for(lambda: call.state == CallState.LISTENING, timeout=10)
        long_text = "This is a very long announcement. " * 150
        await runtime.manager.speak(call.callId, long_text)
        twilio_call = only_call(fake)
        update = fake.rest("POST", f"/Calls/{twilio_call.sid}.json")[-1]
        assert "Twiml" not in update and "type=twiml" in update["Url"][0]
        assert twilio_call.said[-1] == long_text.strip()
        await runtime.manager.end(call.callId)


@pytest.mark.parametrize("outbound_ms", [None, 20, 40])
async def test_outbound_media_messages_on_the_wire(fake: FakeTwilio, tmp_path: Path, outbound_ms: int | None) -> None:
    """streaming.outboundFrameMs (default 40): every media message but a play's last carries exactly
    that much u-law; the last is whole 20 ms frames; the mark still comes back after it."""
    cfg = config(fake, stream=True)
    if outbound_ms is not None:
        cfg["streaming"]["outboundFrameMs"] = outbound_ms
    async with run_bridge(cfg, tmp_path) as runtime:
        call = await runtime.manager.initiate(None, "Your table is ready.", "notify")
        await wait_for(lambda: call.terminal, timeout=20)
        stream = only_call(fake).stream
        size = (outbound_ms or 40) * 8
        sizes = stream.sizes_received
        assert len(sizes) > 10 and sizes[:-1] == [size] * (len(sizes) - 1)
        assert sizes[-1] in range(160, size + 1, 160)
        assert stream.marks_echoed and stream.bad_frames == 0
        assert len(stream.heard_ulaw()) == sum(sizes)  # all of it played
