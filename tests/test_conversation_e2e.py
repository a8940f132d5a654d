"""Streaming conversation end to end on the mock carrier: the real server, the fake chat model and
fake OpenAI TTS over real sockets, audio through the MediaPipeline to the simulated callee."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge.calls import CallState
from bridge.conversation.tools import SIGNATURE_HEADER, verify
from media.clock import FakeClock
from media.dtmf import DtmfDetector
from tests.fakes.http_app import serve_local
from tests.fakes.openai_server import ChatReply, FakeOpenAI
from tests.harness import rpc_client, run_bridge, wait_for

FAST_MOCK = {"ringDelayMs": 50, "answerDelayMs": 100, "replyDelayMs": 150, "calleeHangupAfterMs": 0}


def config(fake: FakeOpenAI, script: list[str], **agent: Any) -> dict[str, Any]:
    return {
        "provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678", "maxConcurrentCalls": 2,
        "outbound": {"notifyHangupDelaySec": 1},
        "streaming": {"enabled": True, "provider": "none"},
        "tts": {"provider": "openai", "openai": {"apiKey": fake.api_key, "baseUrl": fake.base_url}},
        "responseModel": "openai/gpt-4o-mini", "responseBaseUrl": fake.base_url, "responseApiKey": fake.api_key,
        "agent": agent,
        "mock": {**FAST_MOCK, "calleeScript": script},
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI().start()
    yield server
    await server.stop()


async def start_call(runtime: Any, message: str = "Hi.") -> Any:
    call_id = (await rpc_client(runtime).call("voicecall.initiate", {"message": message, "mode": "conversation"}))["callId"]
    return runtime.manager.calls[call_id]


def bot_lines(call: Any) -> list[str]:
    return [t.text for t in call.transcript if t.speaker == "bot"]


async def test_first_piece_is_heard_before_the_model_finishes(tmp_path: Path, fake: FakeOpenAI) -> None:
    reply = "Sure, a table for two. " + " ".join(["We have many lovely options this week."] * 3)
    fake.chat_script = [ChatReply(reply)]
    fake.chat_tokens_per_s = 8  # 26 tokens: the model writes for 3.1 s
    async with run_bridge(config(fake, ["I need a table."]), tmp_path) as runtime:
        call = await start_call(runtime)
        await wait_for(lambda: len(fake.chat_streams) == 1, timeout=20)
        callee = runtime.carrier.callee(call.callId)
        before = len(callee.heard)
        await wait_for(lambda: len(callee.heard) > before + 8000, timeout=10)  # 0.5 s of the reply heard
        assert not fake.chat_streams[0].completed, "the caller hears the reply while the model still writes"
        await wait_for(lambda: call.state == CallState.LISTENING and fake.chat_streams[0].completed, timeout=30)
        assert bot_lines(call)[-1] == reply.strip()
        messages = fake.chat_requests[0]["messages"]
        assert [m["role"] for m in messages] == ["system", "assistant", "user"]
        assert messages[1:] == [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "I need a table."}]
        assert {t["function"]["name"] for t in fake.chat_requests[0]["tools"]} == {"end_call", "send_dtmf",
                                                                                   "consult_agent", "transfer_call"}
        (turn,) = call.turns
        assert turn.mode == "streaming" and not turn.interrupted
        parts = turn.parts()
        assert {"model", "piece", "tts", "bridge", "total"} <= set(parts) and min(parts.values()) >= 0
        assert parts["model"] + parts["piece"] + parts["tts"] + parts["bridge"] <= parts["total"] + 0.5
        assert parts["total"] - parts.get("stt", 0) < 2500  # first audio long before the model's 3.1 s
        # several TTS requests, one per piece, in order
        inputs = [r["input"] for r in fake.speech_requests]
        assert len(inputs) >= 3 and " ".join(inputs[1:]) == reply.strip()


async def test_pieces_play_gap_free_and_in_order_through_one_play(tmp_path: Path, fake: FakeOpenAI) -> None:
    reply = "First things first. Then the second sentence follows, and a third one ends it all."
    fake.chat_script = [ChatReply(reply)]
    fake.chat_tokens_per_s = 200  # the model outpaces speech: audio never has to wait for text
    async with run_bridge(config(fake, ["Go on."]), tmp_path) as runtime:
        call = await start_call(runtime)
        await wait_for(lambda: len(bot_lines(call)) == 2 and call.state == CallState.LISTENING, timeout=30)
        bridge = runtime.manager.voice(call.callId).bridge
        pieces = [r["input"] for r in fake.speech_requests[1:]]
        assert pieces == ["First things first.", "Then the second sentence follows,", "and a third one ends it all."]
        # greeting + ONE play for the reply: no per-piece padding or restart between pieces
        assert bridge.stats.plays == 2
        callee = runtime.carrier.callee(call.callId)
        spoken_s = sum(len(p) for p in ["Hi.", *pieces]) * 0.02  # the TTS fake: 20 ms per character
        assert abs(len(callee.heard) / 2 / 8000 - spoken_s) < 0.1


async def test_barge_in_closes_the_model_stream_and_the_next_request_holds_what_was_heard(
        tmp_path: Path, fake: FakeOpenAI) -> None:
    long_reply = " ".join(f"Option number {i} is a fine choice for a quiet evening." for i in range(1, 9))
    fake.chat_script = [ChatReply(long_reply), ChatReply("Of course, I will stop.")]
    fake.chat_tokens_per_s = 12
    async with run_bridge(config(fake, ["What do you have?"]), tmp_path) as runtime:
        call = await start_call(runtime)
        await wait_for(lambda: len(fake.chat_streams) == 1, timeout=20)
        callee = runtime.carrier.callee(call.callId)
        before = len(callee.heard)
        await wait_for(lambda: len(callee.heard) > before + 16000, timeout=15)  # 1 s of the reply
        callee.say("Stop, stop please.")
        await wait_for(lambda: fake.chat_streams[0].client_closed, timeout=10)
        assert not fake.chat_streams[0].completed and fake.chat_streams[0].tokens_sent < len(long_reply.split())
        await wait_for(lambda: len(fake.chat_streams) == 2, timeout=20)
        messages = fake.chat_requests[1]["messages"]
        assert messages[-1] == {"role": "user", "content": "Stop, stop please."}
        heard = messages[-2]
        assert heard["role"] == "assistant" and heard["content"]
        assert long_reply.startswith(heard["content"]) and len(heard["content"]) < len(long_reply) / 2
        assert callee.clears >= 1
        assert call.turns[0].interrupted
        await wait_for(lambda: call.state == CallState.LISTENING and len(call.turns) == 2, timeout=20)


def dtmf_in(pcm: bytes) -> str:
    detector = DtmfDetector(8000)
    return "".join(detector.process(bytes(pcm)))


async def test_send_dtmf_then_end_call_through_tool_calls(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply("Pressing two.", tool_calls=[("send_dtmf", '{"digits": "2"}')]),
                        ChatReply("Done. Goodbye!", tool_calls=[("end_call", "{}")])]
    async with run_bridge(config(fake, ["Press two for sales."]), tmp_path) as runtime:
        call = await start_call(runtime)
        await wait_for(lambda: call.terminal, timeout=30)
        assert call.state == CallState.HANGUP_BOT
        assert [(t.name, t.result) for t in call.toolCalls] == [("send_dtmf", "Pressed 2."),
                                                                ("end_call", "The call will end after your last words.")]
        assert call.toolCalls[0].withText and call.toolCalls[1].endCall
        assert bot_lines(call)[-2:] == ["Pressing two.", "Done. Goodbye!"]
        second = fake.chat_requests[1]["messages"]
        assert second[-2]["tool_calls"][0]["function"] == {"name": "send_dtmf", "arguments": '{"digits": "2"}'}
        assert second[-2]["content"] == "Pressing two."
        assert second[-1] == {"role": "tool", "tool_call_id": second[-2]["tool_calls"][0]["id"], "content": "Pressed 2."}
        log = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
        assert [t["name"] for t in log[-1]["toolCalls"]] == ["send_dtmf", "end_call"]


async def test_dtmf_tool_is_heard_as_tones_and_goodbye_plays_before_hangup(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply("", tool_calls=[("send_dtmf", '{"digits": "5#"}')]),
                        ChatReply("Thanks, goodbye now.", tool_calls=[("end_call", "{}")])]
    async with run_bridge(config(fake, ["Enter your code."]), tmp_path) as runtime:
        call = await start_call(runtime)
        await wait_for(lambda: len(fake.chat_streams) == 2, timeout=30)
        callee = runtime.carrier.callee(call.callId)
        await wait_for(lambda: call.terminal, timeout=30)
        assert dtmf_in(callee.heard) == "5#"
        assert not call.toolCalls[0].withText
        assert fake.chat_requests[1]["messages"][-2]["content"] is None
        goodbye = [r for r in fake.speech_requests if r["input"] == "Thanks, goodbye now."]
        assert goodbye and callee.marks_echoed, "the goodbye played out (mark echoed) before the hang-up"


@pytest.fixture
async def tool_receiver() -> AsyncIterator[dict[str, Any]]:
    state: dict[str, Any] = {"requests": [], "delay": 0.0}

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        ok = verify("tool-secret", request.headers.get(SIGNATURE_HEADER, ""), body, now=__import__("time").time())
        state["requests"].append({"body": json.loads(body), "signature_ok": ok})
        if not ok:
            return web.Response(status=401, text="bad signature")
        if state["delay"]:
            await asyncio.sleep(state["delay"])
        return web.json_response({"slots": ["15:00", "17:30"]})

    app = web.Application()
    app.router.add_post("/tools/availability", handle)
    runner, port = await serve_local(app)
    state["url"] = f"http://127.0.0.1:{port}/tools/availability"
    yield state
    await runner.cleanup()


async def test_declared_http_tool_round_trip_with_signature(tmp_path: Path, fake: FakeOpenAI,
                                                          tool_receiver: dict[str, Any]) -> None:
    tool = {"name": "check_availability", "description": "Free table slots for a day",
            "parameters": {"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"]},
            "url": tool_receiver["url"], "timeoutMs": 5000, "secret": "tool-secret"}
    fake.chat_script = [ChatReply("", tool_calls=[("check_availability", '{"day": "Thursday"}')]),
                        ChatReply("We have three o'clock or half past five.")]
    async with run_bridge(config(fake, ["Any table Thursday?"], tools=[tool], toolFiller="One moment."),
                          tmp_path) as runtime:
        call = await start_call(runtime)
        await wait_for(lambda: len(fake.chat_streams) == 2, timeout=30)
        await wait_for(lambda: call.state == CallState.LISTENING and len(call.turns) == 1
                       and bot_lines(call)[-1].startswith("We have"), timeout=30)
    (req,) = tool_receiver["requests"]
    assert req["signature_ok"] and req["body"] == {"tool": "check_availability", "callId": call.callId,
                                                   "arguments": {"day": "Thursday"}}
    spec = next(t for t in fake.chat_requests[0]["tools"] if t["function"]["name"] == "check_availability")
    assert spec["function"]["parameters"]["required"] == ["day"]
    tool_msg = fake.chat_requests[1]["messages"][-1]
    assert tool_msg["role"] == "tool" and json.loads(tool_msg["content"]) == {"slots": ["15:00", "17:30"]}
    assert fake.chat_requests[1]["messages"][-2]["content"] == "One moment."  # the filler, spoken while it ran
    assert "One moment." in bot_lines(call)
    assert call.toolCalls[0].name == "check_availability"


async def test_consult_round_trip_over_the_rpc_websocket(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply("", tool_calls=[("consult_agent", '{"question": "Which day suits the boss?"}')]),
                        ChatReply("Thursday works for us.")]
    async with run_bridge(config(fake, ["When can we meet?"], consultFiller="Let me check."), tmp_path) as runtime:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"http://127.0.0.1:{runtime.port}/rpc") as ws:
            await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "voicecall.subscribe"})
            call = await start_call(runtime)
            consult = None
            async with asyncio.timeout(30):
                while consult is None:
                    msg = await ws.receive_json()
                    if msg.get("method") == "voicecall.event" and msg["params"]["type"] == "call.consult":
                        consult = msg["params"]
            assert consult["callId"] == call.callId and consult["question"] == "Which day suits the boss?"
            await ws.send_json({"jsonrpc": "2.0", "id": 2, "method": "voicecall.consult.reply",
                                "params": {"callId": call.callId, "consultId": consult["consultId"],
                                           "answer": "Thursday at noon."}})
            async with asyncio.timeout(10):
                while (msg := await ws.receive_json()).get("id") != 2:
                    pass
            assert msg["result"] == {"success": True}
            await wait_for(lambda: len(fake.chat_streams) == 2, timeout=20)
            again = await rpc_client(runtime).call("voicecall.status", {"callId": call.callId})
            assert again["found"]
            with pytest.raises(Exception, match="No open consult"):
                await rpc_client(runtime).call("voicecall.consult.reply", {"callId": call.callId,
                                                                            "consultId": consult["consultId"],
                                                                            "answer": "late"})
        assert fake.chat_requests[1]["messages"][-1]["content"] == "Thursday at noon."
        assert "Let me check." in bot_lines(call)


async def test_consult_times_out_on_the_clock(tmp_path: Path, fake: FakeOpenAI) -> None:
    clock = FakeClock()
    fake.chat_script = [ChatReply("", tool_calls=[("consult_agent", '{"question": "Price?"}')]),
                        ChatReply("I will find out and call back.")]
    async with run_bridge(config(fake, ["How much is it?"], consultTimeoutMs=20000, consultFiller=""), tmp_path,
                          clock=clock) as runtime:
        queue = runtime.manager.subscribe()
        call = await start_call(runtime)
        async with asyncio.timeout(30):
            while (event := await queue.get())["type"] != "call.consult":
                pass
        await asyncio.sleep(0)
        assert len(fake.chat_streams) == 1
        await clock.advance(19.9)
        assert len(fake.chat_streams) == 1 and runtime.manager._consults
        await clock.advance(0.2)
        await wait_for(lambda: len(fake.chat_streams) == 2, timeout=10)
        assert fake.chat_requests[1]["messages"][-1]["content"] == "The agent did not answer within 20 seconds."
        assert event["callId"] == call.callId


async def test_model_failure_mid_call_gives_a_spoken_apology_then_a_clean_hang_up(
        tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply("Let me look into this for you right", fail_after_tokens=3), ChatReply(status=500)]
    apology = "Sorry, our assistant is having trouble."
    async with run_bridge(config(fake, ["Book it.", "Hello?"], apology=apology, maxFailures=2), tmp_path) as runtime:
        call = await start_call(runtime)
        await wait_for(lambda: call.terminal, timeout=40)
        assert call.state == CallState.HANGUP_BOT
        assert bot_lines(call).count(apology) == 2
        errors = call.metadata["conversationErrors"]
        assert [e["action"] for e in errors] == ["apologize", "hangup"]
        assert "failed mid-reply" in errors[0]["error"] and "HTTP 500" in errors[1]["error"]
        assert [r["input"] for r in fake.speech_requests].count(apology) == 2
        log = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
        assert len(log[-1]["metadata"]["conversationErrors"]) == 2


async def test_tts_failure_mid_call_ends_the_call_cleanly_and_says_why_in_the_log(
        tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply("Certainly. Let me book that for you.")]
    fake.speech_fail_after = 1  # the greeting plays; every later synthesis fails
    async with run_bridge(config(fake, ["Book a table."]), tmp_path) as runtime:
        call = await start_call(runtime)
        await wait_for(lambda: call.terminal, timeout=30)
    assert call.state == CallState.HANGUP_BOT
    (error,) = call.metadata["conversationErrors"]
    assert "HTTP 500" in error["error"] and error["action"] == "hangup"  # the apology could not be said either
    log = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert log[-1]["state"] == "hangup-bot" and log[-1]["metadata"]["conversationErrors"][0]["action"] == "hangup"


async def test_new_words_supersede_a_reply_still_running(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply("Let me think. " + " ".join(["Still thinking about it."] * 30)),
                        ChatReply("Okay, cancelled.")]
    fake.chat_tokens_per_s = 5
    cfg = config(fake, ["First question."])
    cfg["streaming"]["bargeIn"] = False  # no barge-in: only the caller's next final transcript cuts the reply
    async with run_bridge(cfg, tmp_path) as runtime:
        call = await start_call(runtime)
        await wait_for(lambda: len(fake.chat_streams) == 1 and fake.chat_streams[0].tokens_sent >= 4, timeout=20)
        runtime.carrier.callee(call.callId).say("Never mind.")
        await wait_for(lambda: fake.chat_streams[0].client_closed, timeout=15)
        await wait_for(lambda: len(fake.chat_streams) == 2, timeout=15)
        assert fake.chat_requests[1]["messages"][-1] == {"role": "user", "content": "Never mind."}
        cut = fake.chat_requests[1]["messages"][-2]
        assert cut["role"] == "assistant" and cut["content"].startswith("Let me think.")
        assert len(cut["content"]) < 200  # only what was heard of the long reply
        await wait_for(lambda: call.state == CallState.LISTENING and bot_lines(call)[-1] == "Okay, cancelled.",
                       timeout=20)


async def test_batch_mode_keeps_the_old_path(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply('{"spoken": "Batch reply here.", "endCall": false}')]
    async with run_bridge(config(fake, ["Hello there."], responseMode="batch"), tmp_path) as runtime:
        call = await start_call(runtime)
        await wait_for(lambda: len(bot_lines(call)) == 2 and call.state == CallState.LISTENING, timeout=30)
        assert bot_lines(call)[-1] == "Batch reply here."
        assert "stream" not in fake.chat_requests[0] or not fake.chat_requests[0]["stream"]



async def test_elevenlabs_stream_input_gets_the_reply_incrementally(tmp_path: Path, fake: FakeOpenAI) -> None:
    from tests.fakes.elevenlabs_server import FakeElevenLabs

    eleven = await FakeElevenLabs().start()
    reply = "Happy to help. The shop opens at nine, and it closes at six on weekdays."
    fake.chat_script = [ChatReply(reply)]
    fake.chat_tokens_per_s = 100
    cfg = config(fake, ["When are you open?"])
    cfg["tts"] = {"provider": "elevenlabs", "elevenlabs": {"apiKey": eleven.api_key, "baseUrl": eleven.base_url,
                                                           "transport": "websocket", "outputFormat": "pcm_16000"}}
    try:
        async with run_bridge(cfg, tmp_path) as runtime:
            call = await start_call(runtime)
            await wait_for(lambda: len(bot_lines(call)) == 2 and call.state == CallState.LISTENING, timeout=30)
            callee = runtime.carrier.callee(call.callId)
            assert bot_lines(call)[-1] == reply
            heard_s = len(callee.heard) / 2 / 8000
    finally:
        await eleven.stop()
    inits = [i for i, m in enumerate(eleven.ws_messages) if m.get("text") == " "]
    assert len(inits) == 2  # the greeting's session, then ONE session for the whole streamed reply
    reply_msgs = eleven.ws_messages[inits[1] + 1:]
    texts = [m["text"] for m in reply_msgs]
    assert texts == ["Happy to help. ", "The shop opens at nine, and it closes at six on weekdays. ", ""]
    assert all(m.get("flush") for m in reply_msgs[:-1])
    assert abs(heard_s - (len("Hi.") + len(reply) - 1) * 0.02) < 0.1  # the fake: 20 ms per character sent
