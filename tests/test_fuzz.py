"""Seeded fuzzing of every parser and surface (hypothesis).

Oracle for every input: nothing raises out of the surface, no reply is a 5xx, nothing is logged at
ERROR or with a traceback, the server stays up and a control call is untouched.

Most inputs drive the server's own code directly (the webhook handler after the body is read, the
stream frame parser, the RPC dispatcher, config validation, the SIP front); a smaller share goes
over real sockets (HTTP webhooks, RPC over HTTP and WebSocket, media-stream WebSockets).

    pytest tests/test_fuzz.py                        # CI: >= 10,000 inputs
    FUZZ_EXAMPLES=100000 pytest tests/test_fuzz.py   # >= 100,000 inputs (FUZZ_SEED=n to vary)
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from bridge.calls import CallEvent, Direction, EventType
from bridge.config import ConfigError, Settings, build_settings, parse_text
from bridge.preflight import preflight
from bridge.rpc import RpcDispatcher
from bridge.server import WEBHOOK_KEY
from bridge.streams import _parse
from carriers.base import StreamProtocolError, StreamStart, WebhookRequest
from carriers.registry import create_carrier
from carriers.signatures import plivo_v3_signature, twilio_signature
from tests.harness import run_bridge

DEFAULT_TOTAL = 10_000
SCALE = max(1.0, int(os.environ.get("FUZZ_EXAMPLES", DEFAULT_TOTAL)) / DEFAULT_TOTAL)
SEED = int(os.environ.get("FUZZ_SEED", "20261201"))
BATCH = 10  # inputs per hypothesis example
pytestmark = pytest.mark.timeout(int(120 * SCALE))  # a larger FUZZ_EXAMPLES needs a longer per-test limit
COUNTS: Counter[str] = Counter()


def fuzz_settings(examples: int) -> Any:
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------------ strategies

WORDS = ["callId", "CallSid", "CallStatus", "From", "To", "Direction", "Digits", "SpeechResult", "type", "flow",
         "turnToken", "CallUUID", "Event", "event", "data", "payload", "event_type", "call_control_id",
         "client_state", "result", "start", "media", "mark", "dtmf", "stop", "id", "digits", "transcript",
         "isFinal", "reason", "direction", "from", "to", "providerCallId", "events", "jsonrpc", "method", "params",
         "limit", "active", "message", "mode", "action", "file", "streamSid", "callSid", "chunk", "timestamp",
         "AnsweredBy", "Machine", "HangupCause", "RequestUUID", "sequence_number", "stream_id"]
VALUES = ["completed", "in-progress", "ringing", "inbound", "outbound", "hangup", "answer", "call.initiated",
          "call.answered", "call.hangup", "call.speech", "call.dtmf", "call.ended", "call.transcription",
          "call.gather.ended", "voicecall.list", "voicecall.status", "voicecall.end", "voicecall.dtmf",
          "voicecall.initiate", "mock.callee", "2.0", "+15550009999", "+1abc", "../../x", "start", "media",
          "StartApp", "Hangup", "1e400", "NaN", "-1", "0", "\x00", "\u202e", "A" * 300]

keys = st.one_of(st.sampled_from(WORDS), st.text(max_size=12))
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(VALUES), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(keys, inner, max_size=4)), max_leaves=8)
json_objects = st.dictionaries(keys, json_values, max_size=5)
form_pairs = st.lists(st.tuples(keys, st.one_of(st.sampled_from(VALUES), st.text(max_size=30))), max_size=8)
text_blobs = st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                       st.sampled_from(["[" * 3000, "{" * 40, '{"a":' * 50, "1e400", "-Infinity", "null", "[]", ""]))


def as_text(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


# ------------------------------------------------------------------------------ oracle


class BadLogs(logging.Handler):
    """Collects what must never be logged: an ERROR, or any record with a traceback."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[str] = []

    # the server's last-resort nets: reaching one means a parser let odd input through unvalidated
    NETS = ("could not use it", "malformed frame (")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR or record.exc_info or any(net in message for net in self.NETS):
            self.records.append(f"{record.name}: {message[:200]}")


@pytest.fixture
def bad_logs() -> Iterator[BadLogs]:
    handler = BadLogs()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
    assert not handler.records, handler.records[:5]


# ------------------------------------------------------------------------------ labs: running bridges

TELNYX_KEY = Ed25519PrivateKey.generate()
TELNYX_PUBLIC = base64.b64encode(TELNYX_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
TWILIO_TOKEN = "fuzz-twilio-token"
PLIVO_TOKEN = "fuzz-plivo-token-0123456789"
DEAD_API = "http://127.0.0.1:9"  # refused at once: no call the fuzz creates reaches a real carrier
# allowFrom is a number the fuzz never draws: inbound calls are refused, none starts a voice
COMMON = {"fromNumber": "+15550001234", "inboundPolicy": "allowlist", "allowFrom": ["+15550001111"],
          "maxConcurrentCalls": 3, "maxDurationSeconds": 3600, "responseModel": "none",
          "streaming": {"enabled": True, "provider": "none", "preStartTimeoutMs": 300},
          "webhookSecurity": {"maxInFlightPerIp": 64}}
CARRIERS: dict[str, dict[str, Any]] = {
    "mock": {"provider": "mock"},
    "twilio": {"provider": "twilio", "twilio": {"accountSid": "AC" + "f" * 32, "authToken": TWILIO_TOKEN,
                                                "apiBaseUrl": DEAD_API}},
    "telnyx": {"provider": "telnyx", "telnyx": {"apiKey": "KEY", "connectionId": "1", "publicKey": TELNYX_PUBLIC,
                                                "apiBaseUrl": DEAD_API}},
    "plivo": {"provider": "plivo", "plivo": {"authId": "MAFUZZ", "authToken": PLIVO_TOKEN, "apiBaseUrl": DEAD_API}},
}


class Lab:
    """A bridge running on its own loop; each input runs the loop until it is handled."""

    def __init__(self, name: str, store: Path) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self.stack = AsyncExitStack()
        self.runtime: Any = self.run(self.stack.enter_async_context(
            run_bridge({**COMMON, **CARRIERS[name]}, store)))
        self.session: aiohttp.ClientSession = self.run(self._session())
        self.handler = self.runtime.app[WEBHOOK_KEY]
        self.public_url = self.runtime.settings.publicUrl or f"http://127.0.0.1:{self.runtime.port}/voice/webhook"
        manager = self.runtime.manager
        # the control call: answered and listening, before any fuzz input arrives
        self.call(manager.process_event, CallEvent(EventType.INITIATED, provider_call_id="CONTROL-CALL",
                                                   direction=Direction.OUTBOUND, to_number="+15550005678"))
        self.control = manager.find_call(None, "CONTROL-CALL")
        self.call(manager.process_event, CallEvent(EventType.ANSWERED, call_id=self.control.callId))
        self.run(manager.drain())
        self.control_before = self.snapshot()

    def call(self, fn: Any, *args: Any) -> Any:
        """A synchronous piece of the server (it may spawn tasks), run on the bridge's loop."""
        async def inside() -> Any:
            return fn(*args)

        return self.run(inside())

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def snapshot(self) -> tuple[Any, ...]:
        c = self.control
        return c.state, c.terminal, len(c.transcript), c.metadata.get("dtmf"), c.providerCallId

    def check(self) -> None:
        async def health() -> int:
            async with self.session.get(f"http://127.0.0.1:{self.runtime.port}/healthz") as resp:
                return resp.status

        assert self.run(health()) == 200, "server not alive"
        assert self.snapshot() == self.control_before, "control call changed"

    def close(self) -> None:
        self.run(self.session.close())
        self.run(self.stack.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Lab]]:
    made: dict[str, Lab] = {}
    try:
        for name in CARRIERS:
            made[name] = Lab(name, tmp_path_factory.mktemp(f"fuzz-{name}"))
        yield made
    finally:
        for lab in made.values():
            lab.close()
        print(f"\nfuzz inputs: {sum(COUNTS.values())} {dict(sorted(COUNTS.items()))}")


def signed(lab: Lab, *, query: list[tuple[str, str]], form: list[tuple[str, str]] | None, body: bytes,
           sign: bool, rng: random.Random) -> WebhookRequest:
    url = lab.public_url + ("?" + urlencode(query) if query else "")
    headers: CIMultiDict[str] = CIMultiDict()
    if form is not None:
        body = urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    else:
        headers["Content-Type"] = "application/json"
    if lab.name == "twilio":
        headers["X-Twilio-Signature"] = twilio_signature(TWILIO_TOKEN, url, form or []) if sign else "junk"
    elif lab.name == "telnyx":
        stamp = str(int(lab.runtime.manager.clock.time()))
        headers["telnyx-timestamp"] = stamp
        headers["telnyx-signature-ed25519"] = (base64.b64encode(TELNYX_KEY.sign(stamp.encode() + b"|" + body)).decode()
                                               if sign else "AAAA")
    elif lab.name == "plivo":
        nonce = str(rng.getrandbits(64))
        headers["X-Plivo-Signature-V3-Nonce"] = nonce
        headers["X-Plivo-Signature-V3"] = (plivo_v3_signature(PLIVO_TOKEN, "POST", url, form or [], nonce)
                                           if sign else "junk")
    return WebhookRequest(method="POST", path="/voice/webhook", public_url=url, headers=headers, body=body,
                          query=query, form=form or [], remote="127.0.0.1")


def webhook_input(lab: Lab, draw: Any, rng: random.Random) -> WebhookRequest:
    query = draw(form_pairs)
    sign = draw(st.booleans())
    if lab.name in ("twilio", "plivo"):
        return signed(lab, query=query, form=draw(form_pairs), body=b"", sign=sign, rng=rng)
    if lab.name == "telnyx":
        data = {"event_type": draw(st.sampled_from(VALUES)), "id": draw(st.text(max_size=8)),
                "payload": draw(json_values)} if draw(st.booleans()) else draw(json_values)
        body = as_text({"data": data, "meta": draw(json_values)} if draw(st.booleans()) else data).encode()
    else:
        body = as_text(draw(st.one_of(json_objects, st.fixed_dictionaries({"event": json_objects}),
                                      st.fixed_dictionaries({"events": st.lists(json_objects, max_size=2)})))).encode()
    if draw(st.integers(0, 9)) == 0:
        body = draw(text_blobs).encode("utf-8", "surrogatepass")
    return signed(lab, query=query, form=None, body=body, sign=sign, rng=rng)


# ------------------------------------------------------------------------------ webhooks


@pytest.mark.parametrize("name", list(CARRIERS))
@fuzz_settings(60)
@seed(SEED)
@given(data=st.data())
def test_fuzz_webhooks_in_process(labs: dict[str, Lab], bad_logs: BadLogs, name: str, data: st.DataObject) -> None:
    lab = labs[name]
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    for _ in range(BATCH):
        hook = webhook_input(lab, data.draw, rng)
        response = lab.call(lab.handler.handle_request, hook)
        assert response.status < 500, (response.status, hook)
        COUNTS[f"webhook-{name}"] += 1
    lab.check()  # side effects (rejections sent to the dead carrier API) run on; they must not log errors


@pytest.mark.parametrize("name", list(CARRIERS))
@fuzz_settings(8)
@seed(SEED)
@given(data=st.data())
def test_fuzz_webhooks_over_http(labs: dict[str, Lab], bad_logs: BadLogs, name: str, data: st.DataObject) -> None:
    lab = labs[name]
    rng = random.Random(data.draw(st.integers(0, 2**32)))

    async def send(hook: WebhookRequest) -> int:
        target = f"http://127.0.0.1:{lab.runtime.port}/voice/webhook" + (
            "?" + urlencode(hook.query) if hook.query else "")
        async with lab.session.post(target, data=hook.body, headers=dict(hook.headers)) as resp:
            await resp.read()
            return resp.status

    for _ in range(3):
        hook = webhook_input(lab, data.draw, rng)
        assert lab.run(send(hook)) < 500
        COUNTS[f"http-webhook-{name}"] += 1
    lab.check()


# ------------------------------------------------------------------------------ media-stream frames

STARTS = {
    "twilio": {"event": "start", "start": {"callSid": "CA1", "streamSid": "MZ1"}},
    "telnyx": {"event": "start", "stream_id": "s1",
               "start": {"call_control_id": "v3:1", "media_format": {"encoding": "PCMU", "sample_rate": 8000}}},
    "plivo": {"event": "start", "start": {"callId": "u1", "streamId": "s1",
                                          "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}}},
}


def frame_strategy(name: str) -> Any:
    event = st.sampled_from(["start", "media", "mark", "dtmf", "stop", "connected", "clear", "error",
                             "playedStream", "clearedAudio"])
    section = st.one_of(json_values, st.fixed_dictionaries(
        {}, optional={"payload": st.one_of(st.just("/w=="), json_values), "chunk": json_values,
                      "timestamp": st.one_of(st.just(1e300), json_values), "track": json_values,
                      "name": json_values, "digit": json_values}))
    framed = st.fixed_dictionaries({"event": event}, optional={
        "start": st.one_of(json_values, st.just(STARTS[name]["start"])), "media": section, "mark": section,
        "dtmf": section, "stream_id": json_values, "streamSid": json_values, "sequenceNumber": json_values})
    return st.one_of(framed.map(as_text), json_values.map(as_text), text_blobs,
                     st.just('{"event":"media","media":{"payload":"/w==","timestamp":1e400}}'))


@pytest.mark.parametrize("name", ["twilio", "telnyx", "plivo"])
@pytest.mark.parametrize("phase", ["before-start", "after-start"])
@fuzz_settings(100)
@seed(SEED)
@given(data=st.data())
def test_fuzz_stream_frames(bad_logs: BadLogs, name: str, phase: str, data: st.DataObject) -> None:
    carrier = create_carrier(build_settings({**COMMON, **CARRIERS[name]}, {}))
    for _ in range(BATCH):
        codec = carrier.open_stream()
        if phase == "after-start":
            assert isinstance(_parse(codec, as_text(STARTS[name])), StreamStart)
        try:
            _parse(codec, data.draw(frame_strategy(name)))
        except StreamProtocolError as exc:  # the stream is closed with 1008: expected for a bad frame,
            assert not str(exc).startswith("malformed frame ("), exc  # but by the codec's own checks
        COUNTS[f"frame-{name}"] += 1


async def _stream_session(lab: Lab, frames: list[str]) -> int | None:
    async with lab.session.ws_connect(f"http://127.0.0.1:{lab.runtime.port}/voice/stream") as ws:
        for frame in frames:
            await ws.send_str(frame)
        msg = await ws.receive(timeout=5)
        return ws.close_code if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) else None


@pytest.mark.parametrize("name", ["twilio", "telnyx", "plivo"])
@fuzz_settings(8)
@seed(SEED)
@given(data=st.data())
def test_fuzz_stream_frames_over_websocket(labs: dict[str, Lab], bad_logs: BadLogs, name: str,
                                           data: st.DataObject) -> None:
    lab = labs[name]
    frames = data.draw(st.lists(frame_strategy(name), min_size=1, max_size=3))
    code = lab.run(_stream_session(lab, frames))
    assert code in (1000, 1003, 1008, 1009, 1011 - 3), code  # closed by the bridge, never dropped (1006)
    COUNTS[f"ws-frame-{name}"] += len(frames)
    lab.check()


# ------------------------------------------------------------------------------ RPC


rpc_requests = st.one_of(
    st.fixed_dictionaries({"jsonrpc": st.just("2.0"), "method": st.sampled_from(
        ["voicecall.list", "voicecall.status", "voicecall.end", "voicecall.dtmf", "voicecall.speak",
         "voicecall.continue", "voicecall.continue.start", "voicecall.continue.result", "voicecall.initiate",
         "mock.callee", "mock.inject", "voicecall.nope"])},
        optional={"id": json_values, "params": st.one_of(json_objects, json_values)}),
    json_values)


@fuzz_settings(150)
@seed(SEED)
@given(data=st.data())
def test_fuzz_rpc_dispatcher(labs: dict[str, Lab], bad_logs: BadLogs, data: st.DataObject) -> None:
    lab = labs["mock"]
    dispatcher: RpcDispatcher = lab.runtime.dispatcher
    for _ in range(BATCH):
        payload = data.draw(rpc_requests)
        if isinstance(payload, dict) and payload.get("method") == "voicecall.initiate":
            payload["method"] = "voicecall.list"  # placing real calls is the e2e tests' job
        if isinstance(payload, dict) and payload.get("method") in ("voicecall.end", "voicecall.speak",
                                                                   "voicecall.continue", "voicecall.dtmf",
                                                                   "voicecall.continue.start"):
            params = payload.get("params")
            if isinstance(params, dict) and params.get("callId") == lab.control.callId:
                params["callId"] = "someone-else"
        reply = lab.run(asyncio.wait_for(dispatcher.handle(payload), 10))
        assert reply is None or isinstance(reply, (dict, list))
        json.dumps(reply)  # always serializable
        COUNTS["rpc"] += 1
    lab.run(lab.runtime.manager.drain())
    lab.check()


@fuzz_settings(10)
@seed(SEED)
@given(data=st.data())
def test_fuzz_rpc_over_http_and_websocket(labs: dict[str, Lab], bad_logs: BadLogs, data: st.DataObject) -> None:
    lab = labs["mock"]
    bodies = [data.draw(st.one_of(rpc_requests.map(as_text), text_blobs)) for _ in range(4)]
    bodies = [b.replace("voicecall.initiate", "voicecall.list").replace(lab.control.callId, "x") for b in bodies]
    url = f"http://127.0.0.1:{lab.runtime.port}/rpc"

    async def over_http(body: str) -> int:
        async with lab.session.post(url, data=body.encode("utf-8", "surrogatepass")) as resp:
            await resp.read()
            return resp.status

    async def over_ws() -> None:
        async with lab.session.ws_connect(url) as ws:
            for body in bodies:
                await ws.send_str(body)
            await ws.send_str('{"jsonrpc":"2.0","id":"last","method":"voicecall.list"}')
            while True:  # every reply, then ours: the connection survived all of them
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                if json.loads(msg.data).get("id") == "last":
                    return

    for body in bodies:
        assert lab.run(over_http(body)) < 500
    lab.run(over_ws())
    COUNTS["rpc-http-ws"] += 2 * len(bodies)
    lab.check()


# ------------------------------------------------------------------------------ config files

config_keys = st.sampled_from(list(Settings.model_fields) + ["plugins", "messages", "streaming", "twilio", "nope"])
configs = st.dictionaries(config_keys, json_values, max_size=6)


@fuzz_settings(50)
@seed(SEED)
@given(data=st.data())
def test_fuzz_config_validation(bad_logs: BadLogs, data: st.DataObject) -> None:
    for _ in range(BATCH):
        # every draw first: what happens next must not decide what is drawn
        as_file = data.draw(st.booleans())
        text = data.draw(st.one_of(text_blobs, configs.map(as_text))) if as_file else ""
        source = data.draw(st.sampled_from(["c.yaml", "c.json5"]))
        drawn = data.draw(configs)
        build_engines = data.draw(st.integers(0, 24)) == 0  # engines (espeak probes) are the slow part
        raw: Any = drawn
        if as_file:
            try:
                raw = parse_text(text, source)
            except ConfigError as exc:
                assert all(isinstance(p, str) and "\n" not in p for p in exc.problems)
                COUNTS["config"] += 1
                continue
        try:
            settings_ = build_settings(raw, {})
        except ConfigError as exc:
            assert exc.problems and all(isinstance(p, str) for p in exc.problems)
        else:
            if build_engines:
                assert all(isinstance(p, str) for p in preflight(settings_))
        COUNTS["config"] += 1


# ------------------------------------------------------------------------------ SIP front

INVITE = ("INVITE sip:bot@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK1\r\n"
          "From: <sip:alice@10.0.0.1>;tag=1\r\nTo: <sip:bot@127.0.0.1>\r\nCall-ID: abc@10.0.0.1\r\n"
          "CSeq: 1 INVITE\r\nContact: <sip:alice@10.0.0.1:5070>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")


def mutate(text: str, draw: Any) -> bytes:
    data = bytearray(text.encode())
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 3))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == 0 and data:
            del data[at:at + draw(st.integers(1, 20))]
        elif kind == 1:
            data[at:at] = draw(st.binary(max_size=20))
        elif kind == 2 and data:
            data[at] = draw(st.integers(0, 255))
        else:
            data[at:at] = draw(st.sampled_from([b"\r\n", b":", b";", b"<", b">", b"@", b"Via: x\r\n",
                                                b"Content-Length: 99999\r\n", b"SIP/2.0 200 OK\r\n"]))
    return bytes(data)


@fuzz_settings(100)
@seed(SEED)
@given(data=st.data())
def test_fuzz_sip_front(bad_logs: BadLogs, data: st.DataObject) -> None:
    from carriers.sip.proxy import SipFrontCore

    worker = ("127.0.0.1", 5071)
    core = SipFrontCore(("127.0.0.1", 5060), [worker], lambda _: worker, local_hosts=("127.0.0.1",))
    now = time.monotonic()
    for _ in range(BATCH):
        datagram = mutate(INVITE, data.draw) if data.draw(st.integers(0, 4)) else data.draw(st.binary(max_size=300))
        source = data.draw(st.sampled_from([("10.0.0.1", 5070), worker]))
        out = core.datagram(datagram, source, now)
        assert isinstance(out, list)
        COUNTS["sip-front"] += 1
