"""Auto-responses: the JSON spoken-reply contract, an OpenAI-compatible chat server (local fake),
and a whole mock call whose replies come from that server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from bridge.calls import CallState, TranscriptEntry
from bridge.responder import (
    ChatModelResponder,
    OfflineResponder,
    ResponderError,
    extract_reply,
)
from tests.fakes.http_app import serve_local
from tests.harness import rpc_client, run_bridge, wait_for


@pytest.mark.parametrize(("content", "spoken", "end"), [
    ('{"spoken": "Sure, Thursday works.", "endCall": false}', "Sure, Thursday works.", False),
    ('```json\n{"spoken": "Goodbye!", "endCall": true}\n```', "Goodbye!", True),
    ('Here is my reply: {"spoken": "See you then."}', "See you then.", False),
    ("<think>the user wants a time</think>Okay, three o'clock it is.", "three o'clock it is.", False),
    ("Sure, noted.", "noted.", False),
])
def test_extract_reply(content: str, spoken: str, end: bool) -> None:
    reply = extract_reply(content)
    assert reply.spoken == spoken and reply.end_call is end


async def test_offline_responder_closes_on_goodbye() -> None:
    transcript = [TranscriptEntry(0, "bot", "Hi"), TranscriptEntry(1, "user", "No thanks, goodbye.")]
    reply = await OfflineResponder().reply(transcript)
    assert reply.end_call is True


class FakeChatServer:
    """Speaks the OpenAI chat-completions wire format; records requests; can be slow or fail."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies
        self.requests: list[dict] = []
        self.headers: list[str] = []
        self.delay = 0.0
        self.status = 200
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(await request.json())
        self.headers.append(request.headers.get("Authorization", ""))
        await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.json_response({"error": {"message": "nope"}}, status=self.status)
        content = self.replies[min(len(self.requests) - 1, len(self.replies) - 1)]
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": content}}]})

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture
async def chat_server() -> AsyncIterator[FakeChatServer]:
    server = FakeChatServer(['{"spoken": "Lovely, see you Thursday.", "endCall": false}',
                             '{"spoken": "Bye now!", "endCall": true}'])
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.handle)
    runner, server.port = await serve_local(app)
    yield server
    await runner.cleanup()


async def test_chat_model_request_shape(chat_server: FakeChatServer) -> None:
    responder = ChatModelResponder(base_url=chat_server.base_url, api_key="sk-test", model="openai/gpt-4o-mini",
                                   system_prompt=None, timeout_s=2)
    reply = await responder.reply([TranscriptEntry(0, "bot", "Hello"), TranscriptEntry(1, "user", "Thursday?")])
    await responder.close()
    assert reply.spoken == "Lovely, see you Thursday."
    body = chat_server.requests[0]
    assert body["model"] == "gpt-4o-mini" and chat_server.headers[0] == "Bearer sk-test"
    assert "1-2 sentences" in body["messages"][0]["content"] and '"spoken"' in body["messages"][0]["content"]
    assert "Caller: Thursday?" in body["messages"][1]["content"]


async def test_chat_model_timeout_and_error_are_responder_errors(chat_server: FakeChatServer) -> None:
    responder = ChatModelResponder(base_url=chat_server.base_url, api_key=None, model="gpt-4o-mini",
                                   system_prompt="Be brief.", timeout_s=0.2)
    chat_server.delay = 1.0
    with pytest.raises(ResponderError, match="unreachable"):
        await responder.reply([TranscriptEntry(0, "user", "hi")])
    chat_server.delay, chat_server.status = 0.0, 401
    with pytest.raises(ResponderError, match="HTTP 401"):
        await responder.reply([TranscriptEntry(0, "user", "hi")])
    await responder.close()


async def test_mock_call_replies_come_from_the_model(tmp_path: Path, chat_server: FakeChatServer) -> None:
    config = {"provider": "mock", "fromNumber": "+15550001234", "toNumber": "+15550005678",
              "streaming": {"enabled": True, "provider": "none"}, "outbound": {"notifyHangupDelaySec": 0},
              "responseModel": "openai/gpt-4o-mini", "responseBaseUrl": chat_server.base_url,
              "responseApiKey": "sk-test", "agent": {"responseMode": "batch"},  # the JSON-contract path
              "mock": {"ringDelayMs": 50, "answerDelayMs": 100, "replyDelayMs": 100, "calleeHangupAfterMs": 0,
                       "calleeScript": ["Is Thursday fine?", "Great, thanks."]}}
    async with run_bridge(config, tmp_path) as runtime:
        call_id = (await rpc_client(runtime).call("voicecall.initiate", {"message": "Hello!", "mode": "conversation"}))["callId"]
        call = runtime.manager.calls[call_id]
        await wait_for(lambda: call.terminal, timeout=40)
    assert [t.text for t in call.transcript if t.speaker == "bot"] == ["Hello!", "Lovely, see you Thursday.", "Bye now!"]
    assert call.state == CallState.HANGUP_BOT
    assert "Caller: Great, thanks." in chat_server.requests[1]["messages"][1]["content"]
    assert all("sk-test" not in line for line in (tmp_path / "calls.jsonl").read_text().splitlines())
    assert json.loads((tmp_path / "calls.jsonl").read_text().splitlines()[-1])["metadata"]["lastResponseLatencyMs"] >= 0
