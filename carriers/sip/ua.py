"""The thread that owns pjsua2: library lifecycle, transports, account, calls; commands in, events out.

Only this thread (and pjsua2's own media thread) ever touches the library. The asyncio side queues
commands (`_UserAgent.submit`) and awaits their results as futures; everything the SIP stack reports
is posted to the loop as `(kind, provider_call_id, data)`.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.calls import Direction
from carriers.base import CarrierError
from carriers.sip.settings import SipSettings
from media.formats import FRAME_MS, AudioEncoding, AudioFormat

try:  # the `sip` extra; absent on Python 3.13 (no wheel)
    import pjsua2 as pj
except ImportError:  # pragma: no cover - exercised only without the extra
    pj = None

log = logging.getLogger("voicecall.sip")

from carriers.sip.media import SipMediaTransport, _AudioPort  # noqa: E402
from carriers.sip.protocol import caller_id  # noqa: E402

POLL_MS = 5  # libHandleEvents timeout: bounds command latency
SHUTDOWN_GRACE_S = 2.0  # how long close() waits for BYE transactions before destroying the library
GRAVE_DELAY_S = 0.2  # a finished call's media port is deleted this long (10 conference ticks) later

_CODEC_IDS = {"PCMU": "PCMU/8000", "PCMA": "PCMA/8000", "G722": "G722/16000"}


# ----------------------------------------------------------------------------- the SIP thread

Notify = Callable[[str, str, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """How a user agent runs as one worker of a pool behind the SIP front (`sip_pool`): SIP on a
    private loopback port, every request routed through the front, and (for the worker that
    registers) the front's address as the registered Contact, so the trunk's INVITEs reach the front."""

    proxy: tuple[str, int]  # where this worker reaches the front (its outbound proxy)
    contact: tuple[str, int]  # where the world reaches the front (the registered Contact)
    register: bool  # this worker sends the account's REGISTER
    sip_bind: str = "127.0.0.1"


def library_call_cap(requested: int) -> int:
    """How many calls pjsua really allows after libInit: it silently clamps `maxCalls` to its
    compile-time PJSUA_MAX_CALLS (4 in the pjsua2-python wheel). Call on the SIP thread."""
    try:
        lib = ctypes.CDLL(pj._pjsua2.__file__)
        return int(lib.pjsua_call_get_max_count())
    except Exception:  # a build without the symbol exported: trust the request
        return requested


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

    def __init__(
        self, settings: SipSettings, notify: Notify, loop: asyncio.AbstractEventLoop, role: WorkerRole | None = None
    ) -> None:
        super().__init__(name="voicecall-sip", daemon=True)
        self.settings = settings
        self.role = role
        self.sip_address: tuple[str, int] = (settings.bindAddress, settings.port)  # as bound, set by _setup
        self.call_cap = settings.maxCalls  # the library's real call table, set by _setup
        self.notify = notify
        self.loop = loop
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._stopping = False
        self.calls: dict[str, Any] = {}  # pid -> _PjCall
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

        self.call_cap = library_call_cap(s.maxCalls)
        if self.call_cap < s.maxCalls:
            raise CarrierError(
                f"sip.maxCalls={s.maxCalls} but this pjsua2 build allows {self.call_cap} calls per process "
                f"(PJSUA_MAX_CALLS); set sip.maxCalls <= {self.call_cap} and scale with sip.workers"
            )
        role = self.role
        media_bind = s.bindAddress if s.bindAddress not in ("0.0.0.0", "") else ""
        tcfg = pj.TransportConfig()
        if role is None:
            tcfg.port = s.port
            tcfg.boundAddress = media_bind
            if s.publicAddress:
                tcfg.publicAddress = s.publicAddress
        else:  # a pool worker: SIP on a private port the OS picks; only the front talks to it
            tcfg.port = 0
            tcfg.boundAddress = role.sip_bind
        kind = pj.PJSIP_TRANSPORT_TCP if s.transport == "tcp" else pj.PJSIP_TRANSPORT_UDP
        self.transport_id = self.ep.transportCreate(kind, tcfg)
        host, _, port = self.ep.transportGetInfo(self.transport_id).localName.rpartition(":")
        self.sip_address = (host.strip("[]"), int(port))
        self._set_codecs()
        self.ep.libStart()

        acfg = pj.AccountConfig()
        acct = s.account
        acfg.idUri = f"sip:{acct.username}@{acct.domain}" if acct else s.local_uri()
        registers = bool(acct and acct.registrar) and (role is None or role.register)
        if role is not None:  # every request leaves through the front, which Record-Routes dialogs
            acfg.sipConfig.proxies.append(f"sip:{role.proxy[0]}:{role.proxy[1]};lr")
        if acct is not None:
            if acct.registrar and registers:
                acfg.regConfig.registrarUri = acct.registrar
                acfg.regConfig.timeoutSec = acct.registerTimeoutSec
                if role is not None:  # the trunk sends its INVITEs to the front, which spreads them
                    acfg.sipConfig.contactForced = f"<sip:{acct.username}@{role.contact[0]}:{role.contact[1]}>"
            cred = pj.AuthCredInfo("digest", acct.realm, acct.username, 0, acct.password.get_secret_value())
            acfg.sipConfig.authCreds.append(cred)
            if acct.outboundProxy:
                acfg.sipConfig.proxies.append(acct.outboundProxy)
        # A pool worker registers only when told (`start_registration`): the front must know it first.
        acfg.regConfig.registerOnAdd = registers and role is None
        # Bound to our one transport: Contact/Via use it even when the peer's URIs name no transport.
        acfg.sipConfig.transportId = self.transport_id
        mt = acfg.mediaConfig.transportConfig
        mt.port = s.rtpPortStart
        mt.portRange = s.rtpPortRange
        mt.boundAddress = media_bind
        if s.publicAddress:
            mt.publicAddress = s.publicAddress
        self.account = _PjAccount(self)
        self.account.create(acfg, True)
        log.info(
            "sip: listening on %s:%d/%s as %s (codecs %s, %d Hz, %d calls)",
            *self.sip_address, s.transport, acfg.idUri, ",".join(s.codecs), s.clockRate, self.call_cap,
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

    # -- commands: run on this thread (queue them with `submit`)
    def dial(self, pid: str, uri: str) -> None:
        pjcall = _PjCall(self, self.account)
        pjcall.pid = pid
        prm = pj.CallOpParam(True)
        prm.opt.customCallId = pid
        self.calls[pid] = pjcall
        try:
            pjcall.makeCall(uri, prm)
        except Exception:
            self.calls.pop(pid, None)  # never got a slot: safe to delete whenever
            raise

    def call_op(self, pid: str, op: str, code: int) -> None:
        """`answer` with a status code, or `hangup` (a final response, CANCEL or BYE as the state needs)."""
        pjcall = self.calls.get(pid)
        if pjcall is None or pjcall.disconnected:
            return  # already ended: success
        prm = pj.CallOpParam(True)
        if code:
            prm.statusCode = code
        if op == "answer":
            pjcall.answer(prm)
        elif not pjcall.local_hangup:  # a second hang-up of a call already leaving is a no-op
            pjcall.local_hangup = True
            pjcall.hangup(prm)

    def start_registration(self) -> None:
        self.account.setRegistration(True)

    def dial_dtmf(self, pid: str, digits: str) -> None:
        pjcall = self.calls.get(pid)
        if pjcall is None:
            raise CarrierError("sip: call is gone")
        pjcall.dialDtmf(digits)

    def transfer(self, pid: str, uri: str) -> None:
        """Send REFER (Refer-To: uri); its progress comes back as "transfer" notes."""
        pjcall = self.calls.get(pid)
        if pjcall is None or pjcall.disconnected:
            raise CarrierError("sip: call is gone")
        try:
            pjcall.xfer(uri, pj.CallOpParam(True))
        except Exception as exc:  # pjsua refuses (no dialog yet, a REFER already pending, bad URI)
            raise CarrierError(f"sip: REFER not sent: {_pj_error_text(exc)}") from None

    # -- helpers used inside the thread
    def bury(self, obj: Any) -> None:
        self._graveyard.append((time.monotonic() + GRAVE_DELAY_S, obj))

    def _reap(self, now: float) -> None:
        keep = [(due, obj) for due, obj in self._graveyard if due > now]
        if len(keep) != len(self._graveyard):
            self._graveyard = keep  # dropping the last references deletes the C++ objects here

    def forget(self, call: Any) -> None:
        """Drop a disconnected call. Called from its own DISCONNECTED callback, so the C++ Call is
        deleted as that callback returns, the one moment pjsua2 allows it: a Call deleted later
        still holds its slot number, and would clear (and hang up) the next call in that slot."""
        pid = call.pid
        if self.calls.get(pid) is call:
            del self.calls[pid]


_PjCall: Any = None  # defined below when the `sip` extra is installed
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

    class _PjCall(pj.Call):  # type: ignore[no-redef]  # the real one, with pjsua2
        def __init__(self, ua: _UserAgent, account: Any, call_id: int = pj.PJSUA_INVALID_ID) -> None:
            super().__init__(account, call_id)
            self.ua = ua
            self.pid = ""
            self.direction = Direction.OUTBOUND
            self.local_hangup = False
            self.confirmed = False
            self.disconnected = False
            self.port: _AudioPort | None = None
            self.audio: Any = None  # the call's stream in the conference bridge, while connected to the port
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
                    self.audio = aud
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

        def onCallTransferStatus(self, prm: Any) -> None:
            try:
                code = int(prm.statusCode)
                self.ua.notify("transfer", self.pid,
                               {"code": code, "reason": str(prm.reason), "final": bool(prm.finalNotify)})
                if code >= 200:
                    prm.cont = False  # the outcome is known: no more NOTIFYs wanted
            except Exception:
                log.exception("sip: transfer status callback failed")

        def release_media(self) -> None:
            if self.transport is not None:
                self.transport.closed = True
            if self.port is not None:
                # no more callbacks from the media thread into it, and no conference connection left
                # when it is deleted (a port deleted while connected was called half-destroyed: segfault)
                self.port.closed = True
                if self.audio is not None:
                    with contextlib.suppress(Exception):
                        self.audio.stopTransmit(self.port)
                    with contextlib.suppress(Exception):
                        self.port.stopTransmit(self.audio)
                self.ua.bury(self.port)
                self.port = None
            self.audio = None


def _pj_error_text(exc: BaseException) -> str:
    info = getattr(exc, "info", None)
    if callable(info):
        try:
            return str(info()).strip()
        except Exception:
            pass
    reason = getattr(exc, "reason", None)
    return str(reason or exc)


class LocalUa:
    """A user agent on a thread of this process, as the carrier drives it (see `sip_pool.WorkerUa`
    for the same interface to a worker process)."""

    def __init__(self, settings: SipSettings, notify: Notify, loop: asyncio.AbstractEventLoop) -> None:
        self._thread = _UserAgent(settings, self._post, loop)
        self._notify = notify
        self._loop = loop

    @property
    def capacity(self) -> int:
        return self._thread.call_cap

    @property
    def sip_address(self) -> tuple[str, int]:
        return self._thread.sip_address

    async def start(self) -> None:
        self._thread.start()
        try:
            await asyncio.wrap_future(self._thread.ready)
        except BaseException:
            await self._loop.run_in_executor(None, self._thread.join, 5.0)
            raise

    async def close(self) -> None:
        ua = self._thread
        ua.request_stop()
        await asyncio.wrap_future(ua.finished)
        await self._loop.run_in_executor(None, ua.join, 5.0)

    async def dial(self, pid: str, uri: str) -> None:
        await self._run(lambda: self._thread.dial(pid, uri))

    async def call_op(self, pid: str, op: str, code: int) -> None:
        await self._run(lambda: self._thread.call_op(pid, op, code))

    async def dial_dtmf(self, pid: str, digits: str) -> None:
        await self._run(lambda: self._thread.dial_dtmf(pid, digits))

    async def transfer(self, pid: str, uri: str) -> None:
        await self._run(lambda: self._thread.transfer(pid, uri))

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self._thread.submit(fn))

    def _post(self, kind: str, pid: str, data: dict[str, Any]) -> None:
        """Called on the SIP thread: hand a notification to the loop, in order."""
        with contextlib.suppress(RuntimeError):  # loop closed (process exit without close())
            self._loop.call_soon_threadsafe(self._notify, kind, pid, data)
