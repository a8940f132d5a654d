"""Pre-warmed chat model and TTS connections (media/http_pool.py): while the call rings, the bridge
opens a kept-alive connection to each engine, and the greeting's TTS request and the first turn's
chat request come on those connections (the fake notes the client port of every request)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bridge.calls import CallState
from media.http_pool import HttpPool
from tests.fakes.openai_server import ChatReply, FakeOpenAI
from tests.harness import rpc_client, run_bridge, wait_for
from tests.test_conversation_e2e import config, start_call


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI().start()
    yield server
    await server.stop()


def ports(fake: FakeOpenAI, method: str, path: str) -> list[int]:
    return [port for m, p, port in fake.requests_seen if m == method and p == path]


async def test_first_requests_reuse_the_connections_opened_while_ringing(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.chat_script = [ChatReply("A table for two, certainly.")]
    cfg = config(fake, ["I need a table."])
    cfg["mock"]["answerDelayMs"] = 800  # rings long enough to tell "while ringing" apart
    async with run_bridge(cfg, tmp_path) as runtime:
        call = await start_call(runtime, "Hello from the restaurant.")
        await wait_for(lambda: len(ports(fake, "HEAD", "/v1/chat/completions")) == 1
                       and len(ports(fake, "HEAD", "/v1/audio/speech")) == 1, timeout=5)
        assert call.answeredAt is None, "warmed while the call still rang"
        assert not ports(fake, "POST", "/v1/audio/speech") and not ports(fake, "POST", "/v1/chat/completions")
        await wait_for(lambda: call.state == CallState.LISTENING and len(fake.chat_streams) == 1
                       and fake.chat_streams[0].completed, timeout=30)
        (chat_warm,) = ports(fake, "HEAD", "/v1/chat/completions")
        (tts_warm,) = ports(fake, "HEAD", "/v1/audio/speech")
        assert ports(fake, "POST", "/v1/chat/completions")[0] == chat_warm, "the first turn took the warm connection"
        assert ports(fake, "POST", "/v1/audio/speech")[0] == tts_warm, "the greeting took the warm connection"


async def test_a_notify_call_warms_only_the_tts(tmp_path: Path, fake: FakeOpenAI) -> None:
    cfg = config(fake, [])
    cfg["mock"]["answerDelayMs"] = 300
    async with run_bridge(cfg, tmp_path) as runtime:
        await rpc_client(runtime).call("voicecall.initiate", {"message": "Your order is ready.", "mode": "notify"})
        await wait_for(lambda: len(ports(fake, "POST", "/v1/audio/speech")) >= 1, timeout=10)
        assert len(ports(fake, "HEAD", "/v1/audio/speech")) == 1
        assert not ports(fake, "HEAD", "/v1/chat/completions"), "a notify call has no turn to warm the model for"


async def test_a_pool_that_cannot_connect_says_so_once_and_the_request_connects_by_itself() -> None:
    pool = HttpPool(aiohttp.ClientTimeout(total=2))
    try:
        pool.warm("http://127.0.0.1:9/v1/chat/completions")  # discard port: refused
        for task in list(pool._warming):  # noqa: SLF001 - wait for the background HEAD
            await task
        assert pool.warmed == 0
    finally:
        await pool.close()
