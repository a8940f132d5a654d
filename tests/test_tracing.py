"""OpenTelemetry spans: the SDK's in-memory exporter behind a real bridge, on the mock carrier and on
the fake Twilio (real webhooks and REST requests over sockets)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bridge.config import build_settings
from bridge.runtime import Runtime
from tests.fakes.twilio_server import FakeTwilio
from tests.harness import free_port, rpc_client, wait_for
from tests.test_mock_e2e import BASE, FAST_MOCK
from tests.test_twilio_e2e import config as twilio_config


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    yield InMemorySpanExporter()


def provider_for(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


async def run_call(raw: dict, tmp_path: Path, provider: TracerProvider, message: str, mode: str,
                   end_after_turns: int = 0) -> str:
    raw = {**raw, "store": str(tmp_path), "serve": {"port": free_port(), "bind": "127.0.0.1"}}
    if raw["provider"] != "mock":
        raw["publicUrl"] = f"http://127.0.0.1:{raw['serve']['port']}/voice/webhook"
    runtime = Runtime(build_settings(raw, {}), tracer_provider=provider)
    await runtime.start()
    try:
        call_id = (await rpc_client(runtime).call("voicecall.initiate", {"message": message, "mode": mode}))["callId"]
        call = runtime.manager.calls[call_id]
        if end_after_turns:
            await wait_for(lambda: len(call.turns) == end_after_turns, timeout=20)
            await rpc_client(runtime).call("voicecall.end", {"callId": call_id})
        await wait_for(lambda: call.terminal, timeout=40)
        await runtime.manager.drain()
    finally:
        await runtime.stop()
    return call_id


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_span_tree_of_a_turn_on_the_mock_carrier(exporter: InMemorySpanExporter, tmp_path: Path) -> None:
    config = {**BASE, "mock": {**FAST_MOCK, "calleeScript": ["A table for two.", "At eight."]}}
    call_id = await run_call(config, tmp_path, provider_for(exporter), "Hi!", "conversation", end_after_turns=2)
    spans = exporter.get_finished_spans()
    [call] = by_name(spans, "call")
    assert call.parent is None
    assert call.attributes["voicecall.call_id"] == call_id and call.attributes["voicecall.carrier"] == "mock"
    assert call.attributes["voicecall.end_state"] == "hangup-bot"
    turns = sorted(by_name(spans, "turn"), key=lambda s: s.attributes["voicecall.turn"])
    assert [t.attributes["voicecall.turn"] for t in turns] == [1, 2]
    for turn in turns:
        assert turn.parent.span_id == call.context.span_id and turn.context.trace_id == call.context.trace_id
        children = sorted((s for s in spans if s.parent is not None and s.parent.span_id == turn.context.span_id),
                          key=lambda s: s.start_time)
        # caller speech end (the bridge's VAD) -> final transcript -> model -> first piece -> TTS -> audio out
        assert [c.name for c in children] == ["stt", "model", "piece", "tts", "bridge"]
        assert 0 < (children[0].end_time - children[0].start_time) / 1e6 < 2000
        assert children[0].start_time == turn.start_time and children[-1].end_time == turn.end_time
        for before, after in itertools.pairwise(children):
            assert before.end_time == after.start_time  # back to back: the parts add up to the turn
        assert call.start_time <= turn.start_time and turn.end_time <= call.end_time
        total_ms = (turn.end_time - turn.start_time) / 1e6
        assert turn.attributes["voicecall.latency_ms.total"] == pytest.approx(total_ms, abs=1)
        assert 0 < total_ms < 5000


async def test_webhook_and_carrier_rest_spans_on_twilio(exporter: InMemorySpanExporter, tmp_path: Path) -> None:
    async with FakeTwilio(say_chars_per_second=40) as fake:
        call_id = await run_call(twilio_config(fake, stream=False), tmp_path, provider_for(exporter),
                                 "Your table is ready.", "notify")
    spans = exporter.get_finished_spans()
    [call] = by_name(spans, "call")
    rest = by_name(spans, "twilio POST")
    assert rest, "the outbound call and the hang-up are REST requests"
    create = min(rest, key=lambda s: s.start_time)
    assert create.parent is not None and create.parent.span_id == call.context.span_id
    assert create.attributes["http.response.status_code"] == 201
    assert create.attributes["url.path"].endswith("/Calls.json")
    hooks = by_name(spans, "webhook")
    assert len(hooks) >= 3 and {h.attributes["http.response.status_code"] for h in hooks} == {200}
    assert all(h.attributes["voicecall.carrier"] == "twilio" for h in hooks)
    assert call.attributes["voicecall.call_id"] == call_id


def test_tracing_is_off_and_imports_nothing_without_an_endpoint(tmp_path: Path) -> None:
    """No endpoint: a whole runtime is built and a span block runs without importing OpenTelemetry."""
    code = (
        "import sys\n"
        "from bridge.config import build_settings\n"
        "from bridge.runtime import Runtime\n"
        f"runtime = Runtime(build_settings({{'store': {str(tmp_path)!r}}}, {{}}))\n"
        "assert not runtime.tracing.enabled\n"
        "with runtime.tracing.span('webhook', {}) as span:\n"
        "    span.set_attribute('x', 1)\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


async def test_spans_reach_an_otlp_http_collector(tmp_path: Path) -> None:
    """`telemetry.otlpEndpoint` set: the SDK exports over OTLP/HTTP (protobuf) to a local collector."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        raw = {**BASE, "mock": {**FAST_MOCK, "calleeScript": ["Sounds good."]},
               "telemetry": {"otlpEndpoint": f"http://127.0.0.1:{port}", "serviceName": "voicecall-test"},
               "store": str(tmp_path), "serve": {"port": free_port(), "bind": "127.0.0.1"}}
        runtime = Runtime(build_settings(raw, {}))
        assert runtime.tracing.enabled
        await runtime.start()
        try:
            call_id = (await rpc_client(runtime).call("voicecall.initiate",
                                                      {"message": "Hi!", "mode": "conversation"}))["callId"]
            call = runtime.manager.calls[call_id]
            await wait_for(lambda: len(call.turns) == 1, timeout=20)
            await rpc_client(runtime).call("voicecall.end", {"callId": call_id})
        finally:
            await runtime.stop()  # flushes the batch processor
    finally:
        await runner.cleanup()
    spans = [(span.name, resource.resource) for message in received for resource in message.resource_spans
             for scope in resource.scope_spans for span in scope.spans]
    names = [name for name, _ in spans]
    assert names.count("call") == 1 and names.count("turn") >= 1 and "bridge" in names
    service = {a.value.string_value for _, r in spans for a in r.attributes if a.key == "service.name"}
    assert service == {"voicecall-test"}
