"""Which streaming chat client: the `openai` SDK's AsyncOpenAI stream or the bridge's aiohttp SSE reader.

    python bench/chat_stream_client.py [--streams 100] [--tokens 200]

The fake chat-completions server (tests/fakes/openai_server.py) runs in its own process; this
process runs N concurrent streams with one client and measures its own CPU time per token
(process_time over all tokens received) and, at one stream, the first-token time (request sent ->
first text delta) with the server answering at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, machine, table, write_results
from bridge.conversation.chat import StreamingChatModel

SERVER = """
import asyncio, sys
from tests.fakes.openai_server import FakeOpenAI, ChatReply
async def main():
    fake = FakeOpenAI(chat_reply=lambda body: ChatReply(" ".join(["tok"] * int(sys.argv[2]))))
    from aiohttp import web
    app = web.Application(); app.router.add_post("/v1/chat/completions", fake._chat)
    runner = web.AppRunner(app); await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

MESSAGES = [{"role": "user", "content": "talk"}]


async def run_aiohttp(base: str, streams: int) -> tuple[int, list[float]]:
    chat = StreamingChatModel(base_url=base, api_key="sk-test-123", model="m", timeout_s=30)

    async def one() -> tuple[int, float]:
        t0 = time.perf_counter()
        first = None
        n = 0
        stream = await chat.stream(MESSAGES, [])
        async for _ in stream:
            if first is None:
                first = time.perf_counter() - t0
            n += 1
        return n, first or 0.0

    try:
        results = await asyncio.gather(*(one() for _ in range(streams)))
    finally:
        await chat.close()
    return sum(r[0] for r in results), [r[1] for r in results]


async def run_openai(base: str, streams: int) -> tuple[int, list[float]]:
    import httpx
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="sk-test-123", base_url=base, max_retries=0,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=None)))

    async def one() -> tuple[int, float]:
        t0 = time.perf_counter()
        first = None
        n = 0
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter() - t0
                n += 1
        return n, first or 0.0

    try:
        results = await asyncio.gather(*(one() for _ in range(streams)))
    finally:
        await client.close()
    return sum(r[0] for r in results), [r[1] for r in results]


def measure(kind: str, base: str, streams: int) -> dict[str, Any]:
    runner = run_aiohttp if kind == "aiohttp" else run_openai
    asyncio.run(runner(base, 2))  # warm-up (imports, first connection)
    firsts: list[float] = []
    for _ in range(20):
        _, f = asyncio.run(runner(base, 1))
        firsts += f
    cpu0, wall0 = time.process_time(), time.perf_counter()
    tokens, _ = asyncio.run(runner(base, streams))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"client": kind, "streams": streams, "tokens": tokens, "cpu_us_per_token": cpu / tokens * 1e6,
            "wall_s": wall, "first_token_ms_p50": statistics.median(firsts) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(args.tokens)], cwd=root,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        base = f"http://127.0.0.1:{port}/v1"
        rows = [measure(kind, base, args.streams) for kind in ("aiohttp", "openai")]
    finally:
        server.terminate()
        server.wait(5)
    print(table(["client", "streams", "tokens", "CPU us/token", "wall s", "first token ms p50"],
                [[r["client"], r["streams"], r["tokens"], r["cpu_us_per_token"], r["wall_s"], r["first_token_ms_p50"]]
                 for r in rows]))
    path = write_results("chat_stream_client", {"benchmark": "chat_stream_client", "machine": machine(), "rows": rows},
                         args.out)
    print(f"results: {path}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
