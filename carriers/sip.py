"""Direct SIP carrier on pjsua2 (extra `sip`, wheel `pjsua2-python`).

Threads:
- ONE dedicated thread (`_UserAgent`) owns pjsua2: it creates the library, polls `libHandleEvents`
  and runs every pjsua2 call. The asyncio side never calls pjsua2: it queues commands
  (`_UserAgent.submit`) and awaits their results as futures.
- pjsua2's media clock thread calls `_AudioPort.onFrameReceived/onFrameRequested` every 20 ms; those
  only touch the call's `SipMediaTransport` (a deque out, `call_soon_threadsafe` in).
- Everything the SIP stack reports is posted to the loop as `(kind, provider_call_id, data)` and
  turned into `CallEvent`s there, in order.

The provider call id is the SIP Call-ID of the dialog.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import ctypes
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from bridge.calls import CallEvent, CallRecord, CallState, Direction, EventType
from carriers.base import Carrier, CarrierError, CarrierHost, OutboundRequest, ProviderStatus
from carriers.sip_settings import SipSettings
from media.formats import FRAME_MS, AudioEncoding, AudioFormat

if TYPE_CHECKING:
    from media.bridge import MediaBridge

try:  # the `sip` extra; absent on Python 3.13 (no wheel)
    import pjsua2 as pj
except ImportError:  # pragma: no cover - exercised only without the extra
    pj = None

log = logging.getLogger("voicecall.sip")

POLL_MS = 5  # libHandleEvents timeout: bounds command latency
SHUTDOWN_GRACE_S = 2.0  # how long close() waits for BYE transactions before destroying the library
GRAVE_DELAY_S = 0.2  # a finished call's media port is deleted this long (10 conference ticks) later
JITTER_MAX_FRAMES = 50  # 1 s of outbound audio; older frames are dropped past this
PREBUFFER_FRAMES = 2  # start playout once 2 frames are queued (or after waiting 2 ticks)

_CODEC_IDS = {"PCMU": "PCMU/8000", "PCMA": "PCMA/8000", "G722": "G722/16000"}


# ----------------------------------------------------------------------------- sans-I/O helpers

_E164 = re.compile(r"^\+?[1-9]\d{1,14}$")
_SCHEME = re.compile(r"(sips?):", re.IGNORECASE)
_PHONE = re.compile(r"^\+?\d{3,15}$")


def caller_id(header: str) -> str:
    """A From/To header or URI as the inbound policy sees it: the number if the user part is a
    telephone number (E.164 `+...`, or digits as the trunk sent them: the policy compares digits),
    else `sip:user@host` (no display name, port, password or parameters)."""
    text = header.strip()
    if "<" in text:
        text = text[text.index("<") + 1 :].split(">", 1)[0]
    match = _SCHEME.search(text)
    if not match:
        return header.strip()
    scheme, rest = match.group(1).lower(), text[match.end() :]
    user, _, hostport = rest.rpartition("@") if "@" in rest else ("", "", rest)
    user = user.split(";", 1)[0].split(":", 1)[0]
    host = hostport.split(";", 1)[0].split("?", 1)[0]
    host = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.split(":", 1)[0]
    if user and _PHONE.match(user):
        return user
    return f"{scheme}:{user}@{host}" if user else f"{scheme}:{host}"


def dial_uri(to: str, settings: SipSettings) -> str:
    """The request URI for an outbound call: a SIP URI as given, or an E.164 number at the trunk."""
    to = to.strip()
    if to.lower().startswith(("sip:", "sips:")):
        uri = to
    elif _E164.match(to) and to.startswith("+"):
        if settings.account is None:
            raise CarrierError("sip: dialing a phone number needs a `sip.account` (trunk or registrar)")
        uri = f"sip:{to}@{settings.account.domain}"
    else:
        raise CarrierError(f"sip: cannot dial {to!r}: expected a sip: URI or an E.164 number")
    if settings.transport == "tcp" and "transport=" not in uri.lower():
        uri += ";transport=tcp"
    return uri


def outbound_end_reason(status: int, *, answered: bool, local: bool, ring_timeout: bool) -> CallState:
    """Map how an outbound INVITE ended to our end reason."""
    if answered:
        return CallState.HANGUP_BOT if local else CallState.HANGUP_USER
    if ring_timeout:
        return CallState.NO_ANSWER
    if local:
        return CallState.HANGUP_BOT  # we cancelled before answer
    if status in (486, 600):
        return CallState.BUSY
    if status in (408, 480, 487):
        return CallState.NO_ANSWER
    return CallState.FAILED


def inbound_end_reason(*, local: bool) -> CallState:
    """An inbound call ends by our hang-up / rejection, or by the caller's BYE / CANCEL."""
    return CallState.HANGUP_BOT if local else CallState.HANGUP_USER


# ----------------------------------------------------------------------------- media


def _vector_reader() -> Callable[[Any], bytes]:
    """Fast `bytes` of a pjsua2 ByteVector. Iterating the SWIG vector costs ~130 us per 20 ms frame;
    reading the std::vector's [begin, end) pointers costs ~2 us. Used only if a probe matches."""

    def slow(vec: Any) -> bytes:
        return bytes(vec)

    if pj is None:
        return slow

    def fast(vec: Any) -> bytes:
        addr = int(vec.this)
        begin = ctypes.c_void_p.from_address(addr).value or 0
        end = ctypes.c_void_p.from_address(addr + ctypes.sizeof(ctypes.c_void_p)).value or 0
        return ctypes.string_at(begin, end - begin) if end > begin else b""

    try:
        probe = pj.ByteVector(b"\x01\x02\x03\xfe")
        if fast(probe) == b"\x01\x02\x03\xfe" and fast(pj.ByteVector()) == b"":
            return fast
    except Exception:
        pass
    return slow


_read_vector = _vector_reader()


class SipMediaTransport:
    """One call's audio leg toward pjsua2, as a MediaBridge sees it (`media.transport.MediaTransport`).

    Outbound: `send_media` appends to a bounded deque the media clock thread drains every 20 ms.
    Inbound: the media clock thread posts each received frame to the loop, which hands it to
    `bridge.receive`. Payloads are PCM16 LE mono at the conference clock rate.
    """

    def __init__(self, fmt: AudioFormat, loop: asyncio.AbstractEventLoop) -> None:
        self.format = fmt
        self.supports_marks = False  # pjsua2 cannot echo marks: the bridge trusts its pacing clock
        self.bridge: MediaBridge | None = None
        self._loop = loop
        self._out: collections.deque[bytes] = collections.deque(maxlen=JITTER_MAX_FRAMES)
        self._playing = False
        self._waited = 0
        self._silence = b"\x00" * fmt.frame_bytes
        self.frames_in = 0
        self.frames_out = 0
        self.underruns = 0
        self.frames_dropped = 0
        self.first_rx_at: float | None = None  # monotonic, first frame from the conference port
        self.first_audio_at: float | None = None  # monotonic, first non-silent frame from the far end
        self.closed = False

    # -- loop side (MediaTransport)
    async def send_media(self, payload: bytes) -> None:
        size = self.format.frame_bytes
        if len(payload) == size:
            self._queue(payload)
            return
        for i in range(0, len(payload), size):  # tolerate odd sizes: split, pad the tail
            chunk = payload[i : i + size]
            self._queue(chunk + self._silence[len(chunk) :])

    def _queue(self, frame: bytes) -> None:
        if len(self._out) == JITTER_MAX_FRAMES:
            self.frames_dropped += 1  # the deque drops its oldest frame: the writer ran ahead of real time
        self._out.append(frame)

    async def send_mark(self, name: str) -> None:
        return None

    async def send_clear(self) -> None:
        self._out.clear()
        self._playing = False

    @property
    def queued_frames(self) -> int:
        return len(self._out)

    def _deliver(self, payload: bytes) -> None:
        if self.bridge is not None and not self.closed:
            self.bridge.receive(payload)

    # -- media clock thread side
    def _pull(self) -> bytes | None:
        out = self._out
        if not self._playing:
            if not out:
                return None
            self._waited += 1
            if len(out) < PREBUFFER_FRAMES and self._waited < PREBUFFER_FRAMES:
                return None
            self._playing = True
            self._waited = 0
        try:
            payload = out.popleft()
        except IndexError:
            self._playing = False
            self.underruns += 1
            return None
        self.frames_out += 1
        return payload

    def _push(self, payload: bytes) -> None:
        if self.closed:
            return
        if self.first_audio_at is None:
            now = time.monotonic()
            if self.first_rx_at is None:
                self.first_rx_at = now
            if payload != self._silence:
                self.first_audio_at = now
        self.frames_in += 1
        try:
            self._loop.call_soon_threadsafe(self._deliver, payload)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.closed = True


if pj is not None:

    class _AudioPort(pj.AudioMediaPort):
        """Conference-bridge port between a call's stream and its SipMediaTransport."""

        def __init__(self, transport: SipMediaTransport) -> None:
            super().__init__()
            self.transport = transport
            self._frame_bytes = transport.format.frame_bytes
            self._silence = pj.ByteVector(b"\x00" * self._frame_bytes)

        def onFrameRequested(self, frame: Any) -> None:
            try:
                payload = self.transport._pull()
                frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
                if payload is None:
                    frame.buf = self._silence
                else:
                    frame.buf = pj.ByteVector(payload)
                frame.size = self._frame_bytes
            except Exception:
                log.exception("sip: frame request failed")

        def onFrameReceived(self, frame: Any) -> None:
            try:
                if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and frame.size:
                    payload = _read_vector(frame.buf)[: frame.size]
                    if len(payload) != self._frame_bytes:
                        payload = (payload + bytes(self._frame_bytes))[: self._frame_bytes]
                else:
                    payload = bytes(self._frame_bytes)
                self.transport._push(payload)
            except Exception:
                log.exception("sip: frame receive failed")


# ----------------------------------------------------------------------------- the SIP thread

Notify = Callable[[str, str, dict[str, Any]], None]
_running: set[_UserAgent] = set()


@atexit.register
def _stop_at_exit() -> None:
    """Safety net for a process that exits without close(): destroying pjsua2 objects during
    interpreter teardown, in no particular order, can crash; stop the library cleanly instead."""
    for ua in list(_running):
        ua.request_stop()
        ua.join(SHUTDOWN_GRACE_S + 2)


class _UserAgent(threading.Thread):
    """Owns pjsua2. Only this thread (and pjsua2's own media thread) ever touches the library."""

    def __init__(self, settings: SipSettings, notify: Notify, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name="voicecall-sip", daemon=True)
        self.settings = settings
        self.notify = notify
        self.loop = loop
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._stopping = False
        self.calls: dict[str, _PjCall] = {}
        # Media ports to delete later, on this thread, once the conference bridge has applied the
        # removal of the call's stream (queued to its clock thread): then nothing calls them any more.
        self._graveyard: list[tuple[float, Any]] = []
        self.ep: Any = None
        self.transport_id = -1
        self.account: Any = None
        self._log_writer: Any = None
        self.audio_format = AudioFormat(AudioEncoding.L16, settings.clockRate)

    # -- called from the loop
    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self._stopping or self.finished.done():
            fut.set_exception(CarrierError("sip: the SIP stack is stopped"))
            return fut
        self._commands.put((fn, fut))
        return fut

    def request_stop(self) -> None:
        self._stopping = True

    # -- the thread
    def run(self) -> None:
        try:
            self._setup()
        except Exception as exc:
            log.error("sip: start failed: %s", _pj_error_text(exc))
            self._teardown()
            self.ready.set_exception(CarrierError(f"sip: start failed: {_pj_error_text(exc)}"))
            self.finished.set_result(None)
            return
        self.ready.set_result(None)
        _running.add(self)
        try:
            while not self._stopping:
                self.ep.libHandleEvents(POLL_MS)
                self._run_commands()
                if self._graveyard:
                    self._reap(time.monotonic())
            self._shutdown_calls()
        except Exception:
            log.exception("sip: SIP thread crashed")
        finally:
            self._teardown()
            self._fail_pending()
            _running.discard(self)
            self.finished.set_result(None)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc if isinstance(exc, CarrierError) else CarrierError(_pj_error_text(exc)))

    def _fail_pending(self) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(CarrierError("sip: the SIP stack is stopped"))

    def _setup(self) -> None:
        s = self.settings
        self.ep = pj.Endpoint()
        self.ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.maxCalls = s.maxCalls
        cfg.uaConfig.userAgent = s.userAgent
        cfg.medConfig.clockRate = s.clockRate
        cfg.medConfig.sndClockRate = s.clockRate
        cfg.medConfig.channelCount = 1
        cfg.medConfig.audioFramePtime = FRAME_MS
        cfg.medConfig.noVad = True
        cfg.medConfig.ecTailLen = 0
        self._log_writer = _LogWriter()
        cfg.logConfig.writer = self._log_writer
        cfg.logConfig.level = s.logLevel
        cfg.logConfig.consoleLevel = s.logLevel
        cfg.logConfig.msgLogging = s.logLevel >= 4
        self.ep.libInit(cfg)
        self.ep.audDevManager().setNullDev()

        tcfg = pj.TransportConfig()
        tcfg.port = s.port
        tcfg.boundAddress = s.bindAddress if s.bindAddress not in ("0.0.0.0", "") else ""
        if s.publicAddress:
            tcfg.publicAddress = s.publicAddress
        kind = pj.PJSIP_TRANSPORT_TCP if s.transport == "tcp" else pj.PJSIP_TRANSPORT_UDP
        self.transport_id = self.ep.transportCreate(kind, tcfg)
        self._set_codecs()
        self.ep.libStart()

        acfg = pj.AccountConfig()
        acct = s.account
        acfg.idUri = f"sip:{acct.username}@{acct.domain}" if acct else s.local_uri()
        if acct is not None:
            if acct.registrar:
                acfg.regConfig.registrarUri = acct.registrar
                acfg.regConfig.timeoutSec = acct.registerTimeoutSec
            cred = pj.AuthCredInfo("digest", acct.realm, acct.username, 0, acct.password.get_secret_value())
            acfg.sipConfig.authCreds.append(cred)
            if acct.outboundProxy:
                acfg.sipConfig.proxies.append(acct.outboundProxy)
        acfg.regConfig.registerOnAdd = bool(acct and acct.registrar)
        # Bound to our one transport: Contact/Via use it even when the peer's URIs name no transport.
        acfg.sipConfig.transportId = self.transport_id
        mt = acfg.mediaConfig.transportConfig
        mt.port = s.rtpPortStart
        mt.portRange = s.rtpPortRange
        mt.boundAddress = tcfg.boundAddress
        if s.publicAddress:
            mt.publicAddress = s.publicAddress
        self.account = _PjAccount(self)
        self.account.create(acfg, True)
        log.info(
            "sip: listening on %s:%d/%s as %s (codecs %s, %d Hz)",
            s.bindAddress, s.port, s.transport, acfg.idUri, ",".join(s.codecs), s.clockRate,
        )

    def _set_codecs(self) -> None:
        wanted = [_CODEC_IDS[c] for c in self.settings.codecs]
        for info in self.ep.codecEnum2():
            cid = info.codecId
            prio = 0
            for rank, prefix in enumerate(wanted):
                if cid.upper().startswith(prefix.upper()):
                    prio = 250 - rank * 10
            self.ep.codecSetPriority(cid, prio)

    def _shutdown_calls(self) -> None:
        """BYE/CANCEL every live call, then give the transactions a moment to complete."""
        live = [c for c in self.calls.values() if not c.disconnected]
        for call in live:
            call.local_hangup = True
            with contextlib.suppress(Exception):
                call.hangup(pj.CallOpParam(True))
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while time.monotonic() < deadline and any(not c.disconnected for c in self.calls.values()):
            self.ep.libHandleEvents(POLL_MS)
        # Let the final ACK/200 for BYE go out.
        end = time.monotonic() + 0.05
        while time.monotonic() < end:
            self.ep.libHandleEvents(POLL_MS)

    def _teardown(self) -> None:
        for call in list(self.calls.values()):
            call.release_media()
        self.calls.clear()
        if self._graveyard and self.ep is not None:
            end = time.monotonic() + GRAVE_DELAY_S
            while time.monotonic() < end:
                self.ep.libHandleEvents(POLL_MS)
        self._reap(float("inf"))
        if self.account is not None:
            with contextlib.suppress(Exception):
                self.account.shutdown()
            self.account = None
        if self.ep is not None:
            # Our BYEs are done by now; only an un-REGISTER is worth pjsua's 1 s network grace.
            registered = bool(self.settings.account and self.settings.account.registrar)
            try:
                self.ep.libDestroy(0 if registered else pj.PJSUA_DESTROY_NO_NETWORK)
            except Exception:
                log.exception("sip: libDestroy failed")
            self.ep = None

    # -- helpers used inside the thread
    def bury(self, obj: Any) -> None:
        self._graveyard.append((time.monotonic() + GRAVE_DELAY_S, obj))

    def _reap(self, now: float) -> None:
        keep = [(due, obj) for due, obj in self._graveyard if due > now]
        if len(keep) != len(self._graveyard):
            self._graveyard = keep  # dropping the last references deletes the C++ objects here

    def forget(self, call: _PjCall) -> None:
        """Drop a disconnected call. Called from its own DISCONNECTED callback, so the C++ Call is
        deleted as that callback returns, the one moment pjsua2 allows it: a Call deleted later
        still holds its slot number, and would clear (and hang up) the next call in that slot."""
        if self.calls.get(call.pid) is call:
            del self.calls[call.pid]


if pj is not None:

    class _LogWriter(pj.LogWriter):
        def write(self, entry: Any) -> None:
            try:
                level = logging.WARNING if entry.level <= 2 else logging.DEBUG
                log.log(level, "pjsip: %s", entry.msg.rstrip())
            except Exception:
                pass

    class _PjAccount(pj.Account):
        def __init__(self, ua: _UserAgent) -> None:
            super().__init__()
            self.ua = ua

        def onIncomingCall(self, prm: Any) -> None:
            received_at = time.monotonic()
            try:
                call = _PjCall(self.ua, self, call_id=prm.callId)
                info = call.getInfo()
                call.pid = info.callIdString
                call.direction = Direction.INBOUND
                self.ua.calls[call.pid] = call
                ring = pj.CallOpParam()
                ring.statusCode = 180
                call.answer(ring)
                self.ua.notify(
                    "incoming",
                    call.pid,
                    {
                        "from": caller_id(info.remoteUri),
                        "to": caller_id(info.localUri),
                        "remote": info.remoteUri,
                        "at": received_at,
                    },
                )
            except Exception:
                log.exception("sip: incoming call failed")

        def onRegState(self, prm: Any) -> None:
            try:
                info = self.getInfo()
                self.ua.notify(
                    "registration",
                    "",
                    {"code": int(prm.code), "reason": str(prm.reason), "active": bool(info.regIsActive),
                     "expires": int(info.regExpiresSec)},
                )
            except Exception:
                log.exception("sip: registration callback failed")

    class _PjCall(pj.Call):
        def __init__(self, ua: _UserAgent, account: Any, call_id: int = pj.PJSUA_INVALID_ID) -> None:
            super().__init__(account, call_id)
            self.ua = ua
            self.pid = ""
            self.direction = Direction.OUTBOUND
            self.local_hangup = False
            self.confirmed = False
            self.disconnected = False
            self.port: _AudioPort | None = None
            self.transport: SipMediaTransport | None = None
            self.media_sent = False

        def onCallState(self, prm: Any) -> None:
            try:
                info = self.getInfo()
                state = info.state
                if state == pj.PJSIP_INV_STATE_EARLY and self.direction is Direction.OUTBOUND:
                    self.ua.notify("early", self.pid, {"code": info.lastStatusCode})
                elif state == pj.PJSIP_INV_STATE_CONFIRMED and not self.confirmed:
                    self.confirmed = True
                    self.ua.notify("confirmed", self.pid, {})
                elif state == pj.PJSIP_INV_STATE_DISCONNECTED and not self.disconnected:
                    self.disconnected = True
                    self.release_media()
                    self.ua.notify(
                        "disconnected",
                        self.pid,
                        {
                            "code": info.lastStatusCode,
                            "reason": info.lastReason,
                            "local": self.local_hangup,
                            "answered": self.confirmed,
                        },
                    )
                    self.ua.forget(self)
            except Exception:
                log.exception("sip: call state callback failed")

        def onCallMediaState(self, prm: Any) -> None:
            try:
                info = self.getInfo()
                for mi in info.media:
                    if mi.type != pj.PJMEDIA_TYPE_AUDIO or mi.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                        continue
                    aud = self.getAudioMedia(mi.index)
                    if self.port is None:
                        self.transport = SipMediaTransport(self.ua.audio_format, self.ua.loop)
                        self.port = _AudioPort(self.transport)
                        fmt = pj.MediaFormatAudio()
                        fmt.init(pj.PJMEDIA_FORMAT_PCM, self.ua.settings.clockRate, 1, FRAME_MS * 1000, 16)
                        self.port.createPort(f"vc-{self.getId()}", fmt)
                    aud.startTransmit(self.port)
                    self.port.startTransmit(aud)
                    if not self.media_sent:
                        self.media_sent = True
                        codec = ""
                        with contextlib.suppress(Exception):
                            codec = self.getStreamInfo(mi.index).codecName
                        self.ua.notify("media", self.pid, {"transport": self.transport, "codec": codec})
                    break
            except Exception:
                log.exception("sip: media state callback failed")

        def onDtmfDigit(self, prm: Any) -> None:
            try:
                method = "info" if prm.method == pj.PJSUA_DTMF_METHOD_SIP_INFO else "rfc4733"
                self.ua.notify("dtmf", self.pid, {"digit": prm.digit, "method": method})
            except Exception:
                log.exception("sip: dtmf callback failed")

        def release_media(self) -> None:
            if self.transport is not None:
                self.transport.closed = True
            if self.port is not None:
                self.ua.bury(self.port)
                self.port = None


def _pj_error_text(exc: BaseException) -> str:
    info = getattr(exc, "info", None)
    if callable(info):
        try:
            return str(info()).strip()
        except Exception:
            pass
    reason = getattr(exc, "reason", None)
    return str(reason or exc)


# ----------------------------------------------------------------------------- the carrier


@dataclass(slots=True)
class _Leg:
    """Loop-side state of one SIP dialog."""

    pid: str
    direction: Direction
    call_id: str | None = None
    from_: str = ""
    to: str = ""
    started_at: float = field(default_factory=time.monotonic)
    transport: SipMediaTransport | None = None
    codec: str = ""
    confirmed: bool = False
    attached: bool = False
    answered_sent: bool = False
    ringing_sent: bool = False
    decided: bool = False  # inbound: answer or reject requested
    ring_timeout: bool = False
    local_reason: CallState | None = None
    ended: bool = False
    timer: Any = None
    dtmf_seq: int = 0


class SipCarrier(Carrier):
    """Direct SIP: softphones and trunks call the bridge, and the bridge calls SIP URIs."""

    name: ClassVar[str] = "sip"
    streams_media: ClassVar[bool] = True

    def __init__(self, settings: SipSettings | None = None) -> None:
        """`settings` is the config's `sip` section; None = take `host.settings.sip` at start."""
        self._settings = settings
        self._ua: _UserAgent | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._legs: dict[str, _Leg] = {}
        self._by_call: dict[str, str] = {}
        self.ended_legs: dict[str, dict[str, Any]] = {}  # pid -> figures of finished calls (bounded)
        self.registration: dict[str, Any] | None = None  # last REGISTER outcome (code, reason, active)
        self._registration_changed = asyncio.Event()
        self._tasks: set[asyncio.Future[Any]] = set()

    @property
    def settings(self) -> SipSettings:
        if self._settings is None:
            raise CarrierError("sip: not started")
        return self._settings

    # -- lifecycle
    async def start(self, host: CarrierHost) -> None:
        if pj is None:
            raise CarrierError("sip: pjsua2 is not installed (install the `sip` extra; no wheel for Python 3.13+)")
        await super().start(host)
        if self._settings is None:
            self._settings = getattr(host.settings, "sip", None) or SipSettings()
        self._loop = asyncio.get_running_loop()
        self._ua = _UserAgent(self.settings, self._post, self._loop)
        self._ua.start()
        await asyncio.wrap_future(self._ua.ready)

    async def close(self) -> None:
        ua = self._ua
        if ua is None:
            return
        ua.request_stop()
        await asyncio.wrap_future(ua.finished)
        await asyncio.get_running_loop().run_in_executor(None, ua.join, 5.0)
        # Drain the notifications the thread posted while stopping.
        for _ in range(3):
            await asyncio.sleep(0)
        for leg in list(self._legs.values()):
            self._end(leg, leg.local_reason or CallState.HANGUP_BOT)
        self._ua = None

    async def _run(self, fn: Callable[[], Any]) -> Any:
        if self._ua is None:
            raise CarrierError("sip: not started")
        return await asyncio.wrap_future(self._ua.submit(fn))

    # -- manager -> carrier
    async def initiate_call(self, call: CallRecord, request: OutboundRequest) -> str:
        ua = self._require_ua()
        uri = dial_uri(request.to, self.settings)
        pid = f"vc-{uuid.uuid4().hex}"
        leg = _Leg(pid=pid, direction=Direction.OUTBOUND, call_id=call.callId, from_=request.from_number, to=uri)
        self._legs[pid] = leg
        self._by_call[call.callId] = pid

        def dial() -> None:
            pjcall = _PjCall(ua, ua.account)
            pjcall.pid = pid
            prm = pj.CallOpParam(True)
            prm.opt.customCallId = pid
            ua.calls[pid] = pjcall
            try:
                pjcall.makeCall(uri, prm)
            except Exception:
                ua.calls.pop(pid, None)  # never got a slot: safe to delete whenever
                raise

        try:
            await self._run(dial)
        except CarrierError as exc:
            self._forget(leg)
            raise CarrierError(f"sip: call to {uri} failed: {exc}") from None
        leg.timer = self.host.clock.call_later(self.settings.ringTimeoutSec, lambda: self._ring_timeout(pid))
        return pid

    async def answer_call(self, call: CallRecord) -> None:
        leg = self._leg_for(call)
        if leg is None or leg.ended:
            return
        leg.call_id = call.callId
        self._by_call[call.callId] = leg.pid
        leg.decided = True
        self._cancel_timer(leg)
        if self.settings.answerDelayMs:
            await self.host.clock.sleep(self.settings.answerDelayMs / 1000)
        await self._call_op(leg.pid, "answer", 200)

    async def reject_call(self, call: CallRecord) -> None:
        leg = self._leg_for(call)
        if leg is None or leg.ended:
            return
        leg.decided = True
        leg.local_reason = CallState.HANGUP_BOT
        self._cancel_timer(leg)
        await self._call_op(leg.pid, "hangup", self.settings.rejectCode)

    async def hangup_call(self, call: CallRecord, reason: CallState) -> None:
        leg = self._leg_for(call)
        if leg is None or leg.ended:
            return
        leg.local_reason = reason
        self._cancel_timer(leg)
        # Inbound not yet answered: a final error response; otherwise BYE (or CANCEL while ringing).
        code = 603 if leg.direction is Direction.INBOUND and not leg.confirmed else 0
        await self._call_op(leg.pid, "hangup", code)

    async def send_dtmf(self, call: CallRecord, digits: str) -> None:
        leg = self._leg_for(call)
        if leg is None or leg.ended:
            raise CarrierError("sip: no such active call")
        if not re.fullmatch(r"[0-9A-Da-d*#]+", digits):
            raise CarrierError("sip: DTMF digits must be 0-9, A-D, * or #")
        ua = self._require_ua()
        pid = leg.pid

        def dial() -> None:
            pjcall = ua.calls.get(pid)
            if pjcall is None:
                raise CarrierError("sip: call is gone")
            pjcall.dialDtmf(digits)

        await self._run(dial)

    async def get_call_status(self, call: CallRecord) -> ProviderStatus | None:
        # SIP dialogs live only in this process: a call we do not hold has ended.
        leg = self._leg_for(call)
        if leg is None or leg.ended:
            return ProviderStatus(terminal=True)
        return ProviderStatus(terminal=False)

    def describe(self) -> dict[str, Any]:
        s = self._settings
        info: dict[str, Any] = {"name": self.name, "activeCalls": len(self._legs)}
        if s is not None:
            info.update(
                {"listen": f"{s.bindAddress}:{s.port}/{s.transport}", "codecs": s.codecs, "clockRate": s.clockRate}
            )
            if s.account is not None:
                info["account"] = {"username": s.account.username, "domain": s.account.domain}
            if self.registration is not None:
                info["registration"] = dict(self.registration)
        return info

    def leg_stats(self, provider_call_id: str) -> dict[str, Any] | None:
        """Figures of a live or recently ended dialog (setup time, frame counters, codec)."""
        leg = self._legs.get(provider_call_id)
        if leg is None:
            return self.ended_legs.get(provider_call_id)
        return self._stats(leg)

    # -- internals
    def _require_ua(self) -> _UserAgent:
        if self._ua is None:
            raise CarrierError("sip: not started")
        return self._ua

    def _leg_for(self, call: CallRecord) -> _Leg | None:
        pid = call.providerCallId or self._by_call.get(call.callId)
        return self._legs.get(pid) if pid else None

    async def _call_op(self, pid: str, op: str, code: int) -> None:
        ua = self._require_ua()

        def run() -> None:
            pjcall = ua.calls.get(pid)
            if pjcall is None or pjcall.disconnected:
                return  # already ended: success
            prm = pj.CallOpParam(True)
            if code:
                prm.statusCode = code
            if op == "answer":
                pjcall.answer(prm)
            else:
                pjcall.local_hangup = True
                pjcall.hangup(prm)

        await self._run(run)

    def _post(self, kind: str, pid: str, data: dict[str, Any]) -> None:
        """Called on the SIP thread: hand a notification to the loop, in order."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed (process exit without close())
            loop.call_soon_threadsafe(self._on_notify, kind, pid, data)

    def _on_notify(self, kind: str, pid: str, data: dict[str, Any]) -> None:
        try:
            handler = getattr(self, f"_on_{kind}")
            handler(pid, data)
        except Exception:
            log.exception("sip: handling %s for %s failed", kind, pid)

    def _emit(self, leg: _Leg, etype: EventType, key: str | None = None, **fields: Any) -> None:
        event = CallEvent(
            type=etype,
            call_id=leg.call_id,
            provider_call_id=leg.pid,
            dedupe_key=f"sip:{leg.pid}:{key or etype.value}",
            timestamp=self.host.clock.time(),
            **fields,
        )
        self.host.emit(event)

    def _on_registration(self, pid: str, data: dict[str, Any]) -> None:
        self.registration = data
        self._registration_changed.set()
        level = logging.INFO if 200 <= data["code"] < 300 else logging.WARNING
        log.log(level, "sip: registration %s %s (active=%s)", data["code"], data["reason"], data["active"])

    async def wait_registered(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for a REGISTER outcome: returns it on 2xx, raises CarrierError on a final failure."""

        async def outcome() -> dict[str, Any]:
            while True:
                reg = self.registration
                if reg is not None and reg["code"] >= 200 and (reg["code"] >= 300 or reg["active"]):
                    return reg
                self._registration_changed.clear()
                await self._registration_changed.wait()

        reg = await asyncio.wait_for(outcome(), timeout)
        if reg["code"] >= 300:
            raise CarrierError(f"sip: registration failed: {reg['code']} {reg['reason']}")
        return reg

    def _on_incoming(self, pid: str, data: dict[str, Any]) -> None:
        leg = _Leg(pid=pid, direction=Direction.INBOUND, from_=data["from"], to=data["to"], started_at=data["at"])
        self._legs[pid] = leg
        log.info("sip: incoming call %s from %s to %s", pid, leg.from_, leg.to)
        # Nobody decided within the ring timeout: 480, so the caller is not left ringing forever.
        leg.timer = self.host.clock.call_later(self.settings.ringTimeoutSec, lambda: self._ring_timeout(pid))
        self._emit(
            leg,
            EventType.INITIATED,
            direction=Direction.INBOUND,
            from_number=leg.from_,
            to_number=leg.to,
        )

    def _on_early(self, pid: str, data: dict[str, Any]) -> None:
        leg = self._legs.get(pid)
        if leg is None or leg.ringing_sent or leg.ended:
            return
        leg.ringing_sent = True
        self._emit(leg, EventType.RINGING)

    def _on_media(self, pid: str, data: dict[str, Any]) -> None:
        leg = self._legs.get(pid)
        if leg is None or leg.ended:
            return
        leg.transport = data["transport"]
        leg.codec = data.get("codec", "")
        self._maybe_attach(leg)

    def _on_confirmed(self, pid: str, data: dict[str, Any]) -> None:
        leg = self._legs.get(pid)
        if leg is None or leg.ended:
            return
        leg.confirmed = True
        self._cancel_timer(leg)
        self._maybe_attach(leg)

    def _maybe_attach(self, leg: _Leg) -> None:
        """On a confirmed dialog, attach the audio leg BEFORE call.answered, so the manager's
        greeting (spoken on answered) has somewhere to go. A dialog without audio yet (no SDP
        answer, or audio refused) is answered now and attached when its media comes up."""
        if not leg.confirmed or leg.attached:
            return
        if leg.transport is not None and leg.call_id is not None:
            leg.transport.bridge = self.host.attach_media(leg.call_id, leg.transport)
            leg.attached = True
        if not leg.answered_sent:
            leg.answered_sent = True
            self._emit(leg, EventType.ANSWERED)
        if leg.attached:
            self._emit(leg, EventType.ACTIVE)

    def _on_dtmf(self, pid: str, data: dict[str, Any]) -> None:
        leg = self._legs.get(pid)
        if leg is None or leg.ended:
            return
        leg.dtmf_seq += 1
        self._emit(leg, EventType.DTMF, key=f"dtmf:{leg.dtmf_seq}", digits=str(data["digit"]))

    def _on_disconnected(self, pid: str, data: dict[str, Any]) -> None:
        leg = self._legs.get(pid)
        if leg is None or leg.ended:
            return
        answered = bool(data.get("answered"))
        local = bool(data.get("local")) or leg.local_reason is not None
        code = int(data.get("code") or 0)
        if leg.direction is Direction.OUTBOUND:
            reason = outbound_end_reason(code, answered=answered, local=local, ring_timeout=leg.ring_timeout)
        elif leg.ring_timeout and not answered:
            reason = CallState.NO_ANSWER
        else:
            reason = inbound_end_reason(local=local)
        if leg.local_reason is not None:  # we hung up (or rejected): say why the manager asked to
            reason = leg.local_reason
        log.info("sip: call %s ended (%s %s) -> %s", pid, code, data.get("reason", ""), reason)
        self._end(leg, reason, sip_code=code)

    def _end(self, leg: _Leg, reason: CallState, sip_code: int = 0) -> None:
        if leg.ended:
            return
        leg.ended = True
        self._cancel_timer(leg)
        if leg.transport is not None:
            leg.transport.closed = True
        if leg.attached and leg.call_id is not None:
            self.host.detach_media(leg.call_id)
        stats = self._stats(leg)
        stats["sipCode"] = sip_code
        stats["reason"] = str(reason)
        self.ended_legs[leg.pid] = stats
        while len(self.ended_legs) > 256:
            self.ended_legs.pop(next(iter(self.ended_legs)))
        self._forget(leg)
        self._emit(leg, EventType.ENDED, reason=reason)

    def _forget(self, leg: _Leg) -> None:
        self._legs.pop(leg.pid, None)
        if leg.call_id and self._by_call.get(leg.call_id) == leg.pid:
            del self._by_call[leg.call_id]

    def _ring_timeout(self, pid: str) -> None:
        leg = self._legs.get(pid)
        if leg is None or leg.ended or leg.confirmed:
            return
        if leg.direction is Direction.INBOUND and leg.decided:
            return
        leg.ring_timeout = True
        code = 480 if leg.direction is Direction.INBOUND else 0
        task = asyncio.ensure_future(self._call_op(pid, "hangup", code))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("sip: background operation failed: %s", task.exception())

    @staticmethod
    def _cancel_timer(leg: _Leg) -> None:
        if leg.timer is not None:
            leg.timer.cancel()
            leg.timer = None

    @staticmethod
    def _stats(leg: _Leg) -> dict[str, Any]:
        t = leg.transport
        def since_start(at: float | None) -> float | None:
            return None if at is None else round((at - leg.started_at) * 1000, 1)

        setup_ms = since_start(t.first_audio_at) if t else None
        media_ms = since_start(t.first_rx_at) if t else None
        return {
            "providerCallId": leg.pid,
            "callId": leg.call_id,
            "direction": str(leg.direction),
            "codec": leg.codec,
            "setupMs": setup_ms,  # INVITE (sent or received) -> first non-silent frame from the far end
            "mediaMs": media_ms,  # INVITE -> media port running
            "framesIn": t.frames_in if t else 0,
            "framesOut": t.frames_out if t else 0,
            "underruns": t.underruns if t else 0,
            "framesDropped": t.frames_dropped if t else 0,
        }


def from_settings(settings: Any) -> SipCarrier:
    """Registry factory: the carrier for `provider: sip`, configured by the `sip` section."""
    return SipCarrier(settings.sip)
