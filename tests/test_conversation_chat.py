"""The streaming chat client against the fake chat-completions server (real HTTP, real SSE)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from bridge.conversation.chat import (
    ChatModelError,
    ChunkAssembler,
    OfflineChatModel,
    SseDecoder,
    StreamingChatModel,
)
from bridge.conversation.tools import END_CALL, SEND_DTMF
from tests.fakes.openai_server import ChatReply, FakeOpenAI
from tests.harness import wait_for


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI().start()
    yield server
    await server.stop()


def model(fake: FakeOpenAI) -> StreamingChatModel:
    return StreamingChatModel(base_url=fake.base_url, api_key=fake.api_key, model="openai/gpt-4o-mini", timeout_s=5)


async def test_text_streams_in_deltas_and_tools_are_offered(fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply("Sure, one moment. I will check.")]
    chat = model(fake)
    try:
        stream = await chat.stream([{"role": "user", "content": "hi"}], [END_CALL])
        deltas = [d async for d in stream]
    finally:
        await chat.close()
    assert "".join(deltas) == "Sure, one moment. I will check." and len(deltas) == 6
    assert stream.tool_calls == [] and stream.finish_reason == "stop"
    (req,) = fake.chat_requests
    assert req["stream"] is True and req["model"] == "gpt-4o-mini"
    assert req["tools"][0] == {"type": "function", "function": {"name": "end_call", "description": END_CALL.description,
                                                                "parameters": END_CALL.parameters}}
    assert fake.chat_streams[0].completed and not fake.chat_streams[0].client_closed


async def test_tool_call_fragments_are_assembled(fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply("Pressing.", tool_calls=[("send_dtmf", '{"digits": "12#"}'), ("end_call", "{}")])]
    chat = model(fake)
    try:
        stream = await chat.stream([{"role": "user", "content": "press"}], [SEND_DTMF, END_CALL])
        text = "".join([d async for d in stream])
    finally:
        await chat.close()
    assert text == "Pressing."
    assert [(c.name, json.loads(c.arguments)) for c in stream.tool_calls] == [("send_dtmf", {"digits": "12#"}),
                                                                               ("end_call", {})]
    assert stream.finish_reason == "tool_calls" and all(c.id.startswith("call_") for c in stream.tool_calls)


async def test_mid_stream_error_and_http_error_are_clear(fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply("One two three four.", fail_after_tokens=2), ChatReply(status=503)]
    chat = model(fake)
    try:
        stream = await chat.stream([{"role": "user", "content": "x"}], [])
        got: list[str] = []
        with pytest.raises(ChatModelError, match="failed mid-reply: The server had an error"):
            async for d in stream:
                got.append(d)
        assert got == ["One", " two"]
        with pytest.raises(ChatModelError, match="HTTP 503"):
            await chat.stream([{"role": "user", "content": "x"}], [])
    finally:
        await chat.close()


async def test_closing_a_reply_closes_the_connection_the_server_sees_it(fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply(" ".join(["word"] * 200))]
    fake.chat_tokens_per_s = 100
    chat = model(fake)
    try:
        stream = await chat.stream([{"role": "user", "content": "talk"}], [])
        it = aiter(stream)
        assert await anext(it) == "word"
        await stream.aclose()
        await wait_for(lambda: fake.chat_streams[0].client_closed, timeout=5)
        assert 0 < fake.chat_streams[0].tokens_sent < 200 and not fake.chat_streams[0].completed
    finally:
        await chat.close()


async def test_unreachable_model_is_one_clear_error() -> None:
    chat = StreamingChatModel(base_url="http://127.0.0.1:9/v1", api_key=None, model="m", timeout_s=2)
    try:
        with pytest.raises(ChatModelError, match="unreachable"):
            await chat.stream([], [])
    finally:
        await chat.close()


def test_sse_decoder_handles_split_lines_comments_and_crlf() -> None:
    dec = SseDecoder()
    body = b': keepalive\r\n\r\ndata: {"a":1}\r\n\r\nevent: x\ndata: [DONE]\n\n'
    out: list[str] = []
    for i in range(len(body)):
        out += dec.feed(body[i:i + 1])
    assert out == ['{"a":1}', "[DONE]"]


def test_assembler_treats_a_new_id_at_a_used_index_as_a_new_call() -> None:
    asm = ChunkAssembler()
    for frag in ({"index": 0, "id": "a", "function": {"name": "send_dtmf", "arguments": '{"digits":'}},
                 {"index": 0, "function": {"arguments": '"1"}'}},
                 {"index": 0, "id": "b", "function": {"name": "end_call", "arguments": "{}"}}):
        asm.feed({"choices": [{"index": 0, "delta": {"tool_calls": [frag]}}]})
    asm.feed({"choices": [], "usage": {"total_tokens": 3}})  # usage chunk: ignored
    assert [(c.id, c.name, c.arguments) for c in asm.tool_calls()] == [("a", "send_dtmf", '{"digits":"1"}'),
                                                                        ("b", "end_call", "{}")]


async def test_offline_model_streams_words_and_ends_on_goodbye() -> None:
    offline = OfflineChatModel()
    stream = await offline.stream([{"role": "user", "content": "Thursday works"}], [END_CALL])
    words = [w async for w in stream]
    assert len(words) > 3 and "".join(words) == "Got it: Thursday works. Is there anything else?"
    bye = await offline.stream([{"role": "user", "content": "No thanks, goodbye."}], [END_CALL])
    assert "".join([w async for w in bye]) == "Thank you for your time. Goodbye!"
    assert [c.name for c in bye.tool_calls] == ["end_call"]
    await asyncio.sleep(0)
