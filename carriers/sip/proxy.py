"""A stateless, record-routing SIP proxy core (RFC 3261 16.11, loose routing, RFC 3581 rport), sans-I/O.

One public UDP SIP port fronts several pjsua2 worker processes (each capped at 4 calls by the
wheel's PJSUA_MAX_CALLS). `SipFrontCore.datagram` takes one received datagram and returns the
datagrams to send; it keeps no transactions, only a Call-ID -> worker table for requests addressed
to the front itself (new calls, CANCEL, non-2xx ACK). Everything else is routed by Via, Route and
Request-URI, so retransmissions take the same path as the originals.

When the workers reach the front at an internal address other than the advertised one (a NAT or
elastic IP may not hairpin), dialog-creating INVITEs get two Record-Route values (RFC 5658): each
side of the dialog is handed the address it can reach, the workers the internal one.

The front is not an open relay: a request from outside goes to a worker (its Request-URI names
one, or the Call-ID table / `pick_worker` places it), never to a third party its Route or
Request-URI names; only requests from workers are routed outwards.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

Addr = tuple[str, int]

BRANCH_PREFIX = "z9hG4bK-vcf-"
MAX_DIALOGS = 10_000
_COOKIE = "z9hG4bK"

_COMPACT = {
    "v": "via",
    "i": "call-id",
    "f": "from",
    "t": "to",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
    "e": "content-encoding",
    "k": "supported",
    "s": "subject",
    "o": "event",
    "u": "allow-events",
    "r": "refer-to",
    "b": "referred-by",
    "x": "session-expires",
    "j": "reject-contact",
    "a": "accept-contact",
    "d": "request-disposition",
    "y": "identity",
}
_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+\Z")
_REQUEST_LINE = re.compile(r"([A-Za-z0-9.!%*_+`'~-]+) (\S+) (SIP/2\.0)\Z", re.IGNORECASE)
_STATUS_LINE = re.compile(r"SIP/2\.0 ([1-6][0-9][0-9]) (.*)\Z", re.IGNORECASE | re.DOTALL)
_VIA = re.compile(
    r"\s*SIP\s*/\s*2\.0\s*/\s*([A-Za-z0-9.!%*_+`'~-]+)\s+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)"
    r"(?:\s*:\s*([0-9]{1,5}))?\s*(;.*)?\Z",
    re.DOTALL,
)
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)\Z")
_DIGITS = re.compile(r"[0-9]{1,10}\Z")
_CSEQ = re.compile(r"\s*([0-9]{1,10})\s+([A-Za-z0-9.!%*_+`'~-]+)\s*\Z")


class _Malformed(ValueError):
    """The datagram is not a SIP message we can proxy."""


@dataclass(frozen=True, slots=True)
class Forward:
    """One datagram to send. `to` host may be a DNS name or an IP literal (IPv6 without brackets)."""

    data: bytes
    to: Addr


# ---------------------------------------------------------------- message model


@dataclass(slots=True)
class _Header:
    name: str  # as received (may be a compact form)
    key: str  # canonical lower-case long form
    value: str  # unfolded
    raw: str | None  # the received line(s), re-emitted verbatim; None once edited or for new headers

    def line(self) -> str:
        return self.raw if self.raw is not None else f"{self.name}: {self.value}"


@dataclass(slots=True)
class _Message:
    start: str
    headers: list[_Header]
    body: bytes
    method: str = ""  # requests
    uri: str = ""  # requests
    status: int = 0  # responses

    @property
    def is_request(self) -> bool:
        return self.status == 0

    def first(self, key: str) -> _Header | None:
        return next((h for h in self.headers if h.key == key), None)

    def text(self, key: str) -> str:
        header = self.first(key)
        if header is None:
            raise _Malformed(f"missing {key}")
        return header.value

    def values(self, key: str) -> list[str]:
        return [v.strip() for h in self.headers if h.key == key for v in _split_commas(h.value)]

    def replace_first_value(self, key: str, new: str | None) -> None:
        """Replace (or with None, remove) the first value of a possibly comma-joined header,
        leaving its other values as received."""
        for index, header in enumerate(self.headers):
            if header.key != key:
                continue
            parts = _split_commas(header.value)
            if not parts:
                continue
            rest = parts[1:]
            if new is not None:
                rest = [new, *rest]
            if rest:
                header.value = ",".join(rest).strip()
                header.raw = None
            else:
                del self.headers[index]
            return

    def insert_before(self, key: str, header: _Header) -> None:
        """Insert above the first `key` header, or after the Via block when there is none."""
        for index, existing in enumerate(self.headers):
            if existing.key == key:
                self.headers.insert(index, header)
                return
        last_via = max((i for i, h in enumerate(self.headers) if h.key == "via"), default=-1)
        self.headers.insert(last_via + 1, header)

    def serialize(self) -> bytes:
        lines = [self.start, *(h.line() for h in self.headers)]
        head = "\r\n".join(lines) + "\r\n\r\n"
        return head.encode("utf-8", "surrogateescape") + self.body


def _outside_quotes(value: str) -> Iterator[tuple[int, str]]:
    """(index, character) of every character of `value` outside quoted strings (escapes honoured)."""
    quoted = escaped = False
    for i, ch in enumerate(value):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        else:
            yield i, ch


def _split_commas(value: str) -> list[str]:
    """Split on commas outside <...> and quoted strings; keeps each part's text (and its spacing)."""
    parts: list[str] = []
    start, depth = 0, 0
    for i, ch in _outside_quotes(value):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return [p for p in parts if p.strip()]


def _parse_message(data: bytes) -> _Message:
    """Parse one UDP datagram; raises _Malformed."""
    data = data.lstrip(b"\r\n")
    end, sep = data.find(b"\r\n\r\n"), 4
    lf_end = data.find(b"\n\n")
    if end < 0 or (0 <= lf_end < end):
        end, sep = lf_end, 2
    if end < 0:
        raise _Malformed("no end of headers")
    head = data[:end].decode("utf-8", "surrogateescape").rstrip("\r")
    body = data[end + sep :]
    lines = re.split(r"\r?\n", head)
    msg = _parse_start(lines[0])
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            if not msg.headers:
                raise _Malformed("continuation before any header")
            prev = msg.headers[-1]
            prev.value = f"{prev.value} {line.strip()}".strip()
            prev.raw = f"{prev.raw}\r\n{line}"
            continue
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")
        if not colon or not _TOKEN.match(name):
            raise _Malformed("bad header line")
        key = name.lower()
        msg.headers.append(_Header(name, _COMPACT.get(key, key), value.strip(), line))
    length = msg.first("content-length")
    if length is not None:
        if not _DIGITS.match(length.value):
            raise _Malformed("bad Content-Length")
        size = int(length.value)
        if size > len(body):
            raise _Malformed("truncated body")
        msg.body = body[:size]  # bytes past Content-Length are discarded (RFC 3261 18.3)
    else:
        msg.body = body
    for key in ("via", "call-id", "cseq", "from", "to"):
        if not msg.text(key):
            raise _Malformed(f"empty {key}")
    if not msg.values("via"):
        raise _Malformed("no Via")
    _cseq(msg)
    return msg


def _parse_start(line: str) -> _Message:
    if m := _STATUS_LINE.match(line):
        return _Message(line, [], b"", status=int(m.group(1)))
    if m := _REQUEST_LINE.match(line):
        return _Message(line, [], b"", method=m.group(1), uri=m.group(2))
    raise _Malformed("bad start line")


def _cseq(msg: _Message) -> tuple[int, str]:
    m = _CSEQ.match(msg.text("cseq"))
    if m is None:
        raise _Malformed("bad CSeq")
    return int(m.group(1)), m.group(2)


# ---------------------------------------------------------------- Via, URIs, name-addr


@dataclass(slots=True)
class _Via:
    transport: str
    host: str  # as written (IPv6 in brackets)
    port: int | None
    params: list[tuple[str, str | None]]

    def param(self, name: str) -> str | None:
        return next((v if v is not None else "" for k, v in self.params if k.lower() == name), None)

    def set_param(self, name: str, value: str) -> None:
        for i, (k, _) in enumerate(self.params):
            if k.lower() == name:
                self.params[i] = (k, value)
                return
        self.params.append((name, value))

    def text(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        params = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params)
        return f"SIP/2.0/{self.transport} {self.host}{port}{params}"


def _parse_via(value: str) -> _Via:
    m = _VIA.match(value)
    if m is None:
        raise _Malformed("bad Via")
    params: list[tuple[str, str | None]] = []
    for part in (m.group(4) or "").split(";")[1:]:
        name, eq, val = part.partition("=")
        name = name.strip()
        if not _TOKEN.match(name):
            raise _Malformed("bad Via parameter")
        params.append((name, val.strip() if eq else None))
    return _Via(m.group(1), m.group(2), _port(m.group(3)), params)


def _port(text: str | None) -> int | None:
    if text is None:
        return None
    port = int(text)
    if not 0 < port < 65536:
        raise _Malformed("bad port")
    return port


def _bare(host: str) -> str:
    """Host as used in an Addr: lower case, IPv6 without brackets."""
    return host.strip("[]").lower()


def _same_host(a: str, b: str) -> bool:
    a, b = _bare(a), _bare(b)
    if a == b:
        return True
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True, slots=True)
class _Uri:
    host: str  # bare
    port: int | None
    params: dict[str, str]
    secure: bool

    @property
    def addr(self) -> Addr:
        """Where to send: `maddr` wins over the host; `transport=` is ignored (UDP only)."""
        host = self.params.get("maddr") or self.host
        return _bare(host), self.port or (5061 if self.secure else 5060)


def _parse_uri(text: str) -> _Uri | None:
    """The host, port and parameters of a sip:/sips: URI; None for other schemes or nonsense."""
    scheme, colon, rest = text.strip().partition(":")
    if not colon or scheme.lower() not in ("sip", "sips"):
        return None
    at = rest.find("@")  # the user part may hold ';' and '?', never an unescaped '@'
    hostpart = rest[at + 1 :] if at >= 0 else rest
    hostpart = hostpart.split("?", 1)[0]
    hostport, *raw_params = hostpart.split(";")
    if hostport.startswith("["):
        close = hostport.find("]")
        host, tail = hostport[: close + 1], hostport[close + 1 :]
        if close < 0 or (tail and not tail.startswith(":")):
            return None
        port_text = tail[1:]
    else:
        host, _, port_text = hostport.partition(":")
    if not _HOST.match(host):
        return None
    if port_text and not _DIGITS.match(port_text):
        return None
    try:
        port = _port(port_text) if port_text else None
    except _Malformed:
        return None
    params: dict[str, str] = {}
    for raw in raw_params:
        name, _, val = raw.partition("=")
        params[name.strip().lower()] = val.strip()
    maddr = params.get("maddr")
    if maddr is not None and not _HOST.match(maddr):
        return None
    return _Uri(_bare(host), port, params, scheme.lower() == "sips")


def _name_addr_uri(value: str) -> tuple[str, str]:
    """(URI, header parameters) of a name-addr / addr-spec header value."""
    for i, ch in _outside_quotes(value):
        if ch == "<":
            end = value.find(">", i)
            if end < 0:
                raise _Malformed("unclosed <")
            return value[i + 1 : end], value[end + 1 :]
    uri, _, params = value.partition(";")  # addr-spec: everything after ';' is a header parameter
    return uri, ";" + params if params else ""


def _tag(value: str) -> str:
    _, params = _name_addr_uri(value)
    for part in params.split(";"):
        name, _, val = part.partition("=")
        if name.strip().lower() == "tag":
            return val.strip()
    return ""


# ---------------------------------------------------------------- the proxy


def _new_stats() -> dict[str, int]:
    keys = (
        "requests", "responses", "forwarded", "replied", "dropped", "malformed", "keepalive",
        "not_ours", "rejected_busy", "too_many_hops", "no_transaction", "absorbed", "loops",
        "unroutable", "expired", "relay_refused", "no_workers",
    )  # fmt: skip
    return dict.fromkeys(keys, 0)


class SipFrontCore:
    """Route one received datagram at a time between outside peers and the pjsua2 workers.

    `advertised` goes into our Via and Record-Route towards outside peers. `internal`, when given
    and different, is where the workers reach the front (e.g. 127.0.0.1:5060 behind a NAT or
    elastic IP that does not hairpin): it goes into our Via towards workers and, next to
    `advertised`, into a double Record-Route (RFC 5658). A datagram whose source is one of the
    `workers` (see `set_workers`) is from a worker; anything else is from outside.
    `pick_worker(call_id)` places a new inbound INVITE and must answer one of the current workers
    (None: every worker is full, we answer 486). `local_hosts` are other names of this front, matched
    case-insensitively with the advertised or internal port, in Route and Request-URI.

    `dialog_ttl_s` is how long a Call-ID's routing entry outlives the last request or worker
    response that used it; it must cover a ringing call until its CANCEL, so the carrier passes
    `ringTimeoutSec + 64` (64 = 64*T1, the INVITE transaction timeout).
    """

    def __init__(
        self,
        advertised: Addr,
        workers: Sequence[Addr],
        pick_worker: Callable[[str], Addr | None],
        *,
        local_hosts: Iterable[str] = (),
        dialog_ttl_s: float = 64.0,
        internal: Addr | None = None,
    ) -> None:
        self.advertised: Addr = (_bare(advertised[0]), advertised[1])
        self.internal: Addr = (_bare(internal[0]), internal[1]) if internal is not None else self.advertised
        self.pick_worker = pick_worker
        self.local_hosts = {self.advertised[0], self.internal[0], *(_bare(h) for h in local_hosts)}
        self._self_ports = {self.advertised[1], self.internal[1]}
        self.dialog_ttl_s = dialog_ttl_s
        self._dialogs: OrderedDict[str, tuple[Addr, float]] = OrderedDict()  # oldest first
        self._rejected: OrderedDict[str, tuple[int, int, float]] = OrderedDict()  # Call-ID -> (CSeq, status, when)
        self.stats = _new_stats()
        self.workers: list[Addr] = []
        self._worker_set: set[Addr] = set()
        self._worker_ports: set[int] = set()
        self.set_workers(workers)

    # -- public

    def set_workers(self, workers: Sequence[Addr]) -> None:
        """Replace the worker set; routing entries for a worker no longer in it are dropped."""
        self.workers = list(dict.fromkeys((_bare(h), p) for h, p in workers))
        self._worker_set = set(self.workers)
        self._worker_ports = {p for _, p in self.workers}
        for call_id in [c for c, (worker, _) in self._dialogs.items() if worker not in self._worker_set]:
            del self._dialogs[call_id]

    def datagram(self, data: bytes, source: Addr, now: float) -> list[Forward]:
        """One received datagram -> the datagrams to send. Never raises on bad input."""
        self._expire(now)
        if not data.strip(b"\r\n"):
            self.stats["keepalive"] += 1  # RFC 5626 CRLF keep-alive
            return []
        source = (_bare(source[0]), source[1])
        try:
            msg = _parse_message(data)
            if msg.is_request:
                self.stats["requests"] += 1
                out = self._request(msg, source, now)
            else:
                self.stats["responses"] += 1
                out = self._response(msg, source, now)
        except _Malformed:
            self.stats["malformed"] += 1
            out = []
        if not out:
            self.stats["dropped"] += 1
        return out

    def forget(self, call_id: str) -> None:
        """Drop routing state for a Call-ID (the call has ended)."""
        self._dialogs.pop(call_id, None)
        self._rejected.pop(call_id, None)

    def worker_of(self, call_id: str) -> Addr | None:
        """The worker a Call-ID is routed to, if remembered."""
        entry = self._dialogs.get(call_id)
        return entry[0] if entry else None

    # -- requests

    def _request(self, msg: _Message, source: Addr, now: float) -> list[Forward]:
        call_id = msg.text("call-id")
        cseq, _ = _cseq(msg)
        top = _parse_via(msg.values("via")[0])
        self._stamp_via(msg, top, source)
        max_forwards = self._max_forwards(msg)
        if max_forwards == 0:
            if msg.method == "ACK":
                return []
            self.stats["too_many_hops"] += 1
            return self._reply(msg, 483, "Too Many Hops")
        self._strip_own_routes(msg)
        to_tag = _tag(msg.text("to"))
        dialog_creating = msg.method == "INVITE" and not to_tag
        from_worker = source in self._worker_set
        if from_worker:
            routed = self._from_worker(msg, source, call_id, dialog_creating, now)
        else:
            routed = self._from_outside(msg, call_id, cseq, dialog_creating, now)
        if isinstance(routed, list):  # our own reply, or nothing
            return routed
        dest = routed
        if self._is_self(dest):
            self.stats["loops"] += 1
            return []
        to_worker = dest in self._worker_set
        if dialog_creating:
            self._record_route(msg, from_worker, to_worker)
        self._decrement(msg, max_forwards)
        branch = self._branch(msg, top, call_id, cseq, to_tag)
        sent_by = _hostport(self.internal if to_worker else self.advertised)
        msg.insert_before("via", _Header("Via", "via", f"SIP/2.0/UDP {sent_by};branch={branch}", None))
        self.stats["forwarded"] += 1
        return [Forward(msg.serialize(), dest)]

    def _from_worker(
        self, msg: _Message, source: Addr, call_id: str, dialog_creating: bool, now: float
    ) -> Addr | list[Forward]:
        dest = self._next_hop(msg)
        if dest is None:
            self.stats["unroutable"] += 1
            return []
        if dialog_creating or self.worker_of(call_id) == source:
            self._remember(call_id, source, now)
        return dest

    def _from_outside(
        self, msg: _Message, call_id: str, cseq: int, dialog_creating: bool, now: float
    ) -> Addr | list[Forward]:
        worker = self._worker_for_uri(_parse_uri(msg.uri))
        if worker is None:
            if msg.values("route"):
                # Loose routing would follow it; from outside that makes us an open relay.
                self.stats["relay_refused"] += 1
            routed = self._to_bridge(msg, call_id, cseq, dialog_creating, now)
            if isinstance(routed, list):
                return routed
            worker = routed
        self._remember(call_id, worker, now)
        return worker

    def _to_bridge(
        self, msg: _Message, call_id: str, cseq: int, dialog_creating: bool, now: float
    ) -> Addr | list[Forward]:
        """The worker for a request from outside addressed to the front itself, or our reply."""
        rejected = self._rejected.get(call_id)
        if rejected is not None and rejected[0] == cseq and msg.method in ("INVITE", "ACK", "CANCEL"):
            return self._answer_rejected(msg, rejected[1])
        if (known := self.worker_of(call_id)) is not None:
            return known
        if dialog_creating:
            return self._place(msg, call_id, cseq, now)
        if msg.method == "ACK":
            return []
        if msg.method == "CANCEL":
            self.stats["no_transaction"] += 1
            return self._reply(msg, 481, "Call/Transaction Does Not Exist")
        if not self.workers:
            return self._reject_reply(msg, 503)
        return self.workers[0]  # it answers OPTIONS, or 481 for a dialog it does not know

    def _place(self, msg: _Message, call_id: str, cseq: int, now: float) -> Addr | list[Forward]:
        """A worker for a new inbound call, or a stateless 486 / 503 remembered for its retransmissions."""
        if not self.workers:
            return self._reject(msg, call_id, cseq, 503, now)
        picked = self.pick_worker(call_id)
        if picked is None:
            return self._reject(msg, call_id, cseq, 486, now)
        worker = (_bare(picked[0]), picked[1])
        if worker not in self._worker_set:
            # Its requests would count as from outside and never reach the callee: refuse the call.
            self.stats["unroutable"] += 1
            return self._reject(msg, call_id, cseq, 503, now)
        return worker

    def _record_route(self, msg: _Message, from_worker: bool, to_worker: bool) -> None:
        """RFC 5658: the top value is used by the callee (the UAS), the bottom one by the caller (the
        UAC reverses the list); each gets the address of ours it can reach."""
        top = _hostport(self.internal if to_worker else self.advertised)
        bottom = _hostport(self.internal if from_worker else self.advertised)
        for hostport in dict.fromkeys((bottom, top)):
            msg.insert_before("record-route", _Header("Record-Route", "record-route", f"<sip:{hostport};lr>", None))

    def _stamp_via(self, msg: _Message, top: _Via, source: Addr) -> None:
        """RFC 3261 18.2.1 `received`, RFC 3581 `rport`: where responses must go back to."""
        if top.param("rport") == "":
            top.set_param("rport", str(source[1]))
        elif _same_host(top.host, source[0]):
            return
        top.set_param("received", source[0])
        msg.replace_first_value("via", top.text())

    def _max_forwards(self, msg: _Message) -> int | None:
        header = msg.first("max-forwards")
        if header is None:
            return None
        if not _DIGITS.match(header.value):
            raise _Malformed("bad Max-Forwards")
        return int(header.value)

    def _decrement(self, msg: _Message, max_forwards: int | None) -> None:
        header = msg.first("max-forwards")
        if header is None or max_forwards is None:  # RFC 3261 16.6 step 3: add one, 70
            msg.headers.append(_Header("Max-Forwards", "max-forwards", "70", None))
        else:
            header.value = str(min(max_forwards, 256) - 1)
            header.raw = None

    def _strip_own_routes(self, msg: _Message) -> None:
        # Several in a row happen when a worker has us both as outbound proxy and in its route set,
        # and with a double Record-Route (advertised + internal).
        while (routes := msg.values("route")) and self._refers_to_us(routes[0]):
            msg.replace_first_value("route", None)

    def _refers_to_us(self, value: str) -> bool:
        uri = _parse_uri(_name_addr_uri(value)[0])
        return uri is not None and self._is_self((uri.host, uri.port or 5060))

    def _is_self(self, addr: Addr) -> bool:
        return addr[1] in self._self_ports and any(_same_host(addr[0], h) for h in self.local_hosts)

    def _next_hop(self, msg: _Message) -> Addr | None:
        routes = msg.values("route")
        uri = _parse_uri(_name_addr_uri(routes[0])[0]) if routes else _parse_uri(msg.uri)
        return uri.addr if uri is not None else None

    def _worker_for_uri(self, uri: _Uri | None) -> Addr | None:
        """A worker named by the Request-URI: its own address, or one of our names with its port."""
        if uri is None or "maddr" in uri.params:
            return None
        port = uri.port or 5060
        if (uri.host, port) in self._worker_set:
            return uri.host, port
        if port in self._worker_ports and any(_same_host(uri.host, h) for h in self.local_hosts):
            return next(w for w in self.workers if w[1] == port)
        return None

    def _branch(self, msg: _Message, top: _Via, call_id: str, cseq: int, to_tag: str) -> str:
        received = top.param("branch") or ""
        if received.startswith(_COOKIE):
            # INVITE, its CANCEL and its non-2xx ACK share the branch; a 2xx ACK has a new one.
            key = f"{received}\x00{top.host.lower()}:{top.port or ''}"
        else:  # RFC 2543 peer: no usable branch
            from_tag = _tag(msg.text("from"))
            key = f"{call_id}\x00{cseq}\x00{from_tag}\x00{to_tag}\x00{msg.uri}"
        digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return BRANCH_PREFIX + digest

    # -- responses

    def _response(self, msg: _Message, source: Addr, now: float) -> list[Forward]:
        vias = msg.values("via")
        top = _parse_via(vias[0])
        ours = self._sent_by_us(top) and (top.param("branch") or "").startswith(BRANCH_PREFIX)
        if not ours or len(vias) < 2:
            self.stats["not_ours"] += 1
            return []
        msg.replace_first_value("via", None)
        dest = _response_target(_parse_via(vias[1]))
        if dest is None:
            self.stats["unroutable"] += 1
            return []
        call_id = msg.text("call-id")
        if source in self._worker_set and self.worker_of(call_id) == source:
            # Keep a ringing call's entry alive so its CANCEL still finds the worker.
            self._remember(call_id, source, now)
        self.stats["forwarded"] += 1
        return [Forward(msg.serialize(), dest)]

    def _sent_by_us(self, via: _Via) -> bool:
        port = via.port or 5060
        return any(port == p and _same_host(via.host, h) for h, p in (self.advertised, self.internal))

    # -- our own (stateless) responses

    def _reply(self, msg: _Message, status: int, reason: str, extra: Sequence[str] = ()) -> list[Forward]:
        dest = _response_target(_parse_via(msg.values("via")[0]))
        if dest is None:
            return []
        lines = [f"SIP/2.0 {status} {reason}"]
        lines += [h.line() for h in msg.headers if h.key == "via"]
        frm, to, call_id, cseq = (msg.first(key) for key in ("from", "to", "call-id", "cseq"))
        assert frm and to and call_id and cseq  # _parse_message checked them
        # RFC 3261 8.2.6.2: a final response to a request without a To-tag gets one (ours: per Call-ID).
        to_line = to.line() if _tag(to.value) else f"{to.name}: {to.value};tag={_local_tag(call_id.value)}"
        lines += [frm.line(), to_line, call_id.line(), cseq.line(), *extra, "Content-Length: 0"]
        self.stats["replied"] += 1
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        return [Forward(data, dest)]

    def _reject(self, msg: _Message, call_id: str, cseq: int, status: int, now: float) -> list[Forward]:
        """Refuse a new INVITE; retransmissions, its ACK and its CANCEL are answered from memory."""
        self._rejected[call_id] = (cseq, status, now)
        self._rejected.move_to_end(call_id)
        self._bound(self._rejected)
        return self._reject_reply(msg, status)

    def _reject_reply(self, msg: _Message, status: int) -> list[Forward]:
        reason, stat, extra = _REJECTIONS[status]
        self.stats[stat] += 1
        return self._reply(msg, status, reason, extra)

    def _answer_rejected(self, msg: _Message, status: int) -> list[Forward]:
        if msg.method == "ACK":
            self.stats["absorbed"] += 1
            return []
        if msg.method == "CANCEL":  # the INVITE already has its final response: 200 for the CANCEL
            return self._reply(msg, 200, "OK")
        return self._reject_reply(msg, status)

    # -- routing state

    def _remember(self, call_id: str, worker: Addr, now: float) -> None:
        self._dialogs[call_id] = (worker, now)
        self._dialogs.move_to_end(call_id)
        self._bound(self._dialogs)

    def _bound(self, table: OrderedDict[str, Any]) -> None:
        while len(table) > MAX_DIALOGS:
            table.popitem(last=False)
            self.stats["expired"] += 1

    def _expire(self, now: float) -> None:
        deadline = now - self.dialog_ttl_s
        tables: tuple[OrderedDict[str, Any], ...] = (self._dialogs, self._rejected)
        for table in tables:
            while table:
                seen = next(iter(table.values()))[-1]  # every entry ends with its last use
                if seen > deadline:
                    break
                table.popitem(last=False)
                self.stats["expired"] += 1


# status -> (reason, stats key, extra header lines) of our stateless refusals of a new call
_REJECTIONS: dict[int, tuple[str, str, tuple[str, ...]]] = {
    486: ("Busy Here", "rejected_busy", ()),
    503: ("Service Unavailable", "no_workers", ("Retry-After: 1",)),
}


def _hostport(addr: Addr) -> str:
    return f"{_bracketed(addr[0])}:{addr[1]}"


def _response_target(via: _Via) -> Addr | None:
    """RFC 3261 18.2.2 / RFC 3581: `received` over sent-by host, numeric `rport` over sent-by port."""
    host = via.param("received") or via.host
    rport = via.param("rport") or ""
    port = int(rport) if _DIGITS.match(rport) and 0 < int(rport) < 65536 else via.port or 5060
    if not _HOST.match(_bracketed(_bare(host))):
        return None
    return _bare(host), port


def _local_tag(call_id: str) -> str:
    return hashlib.sha1(f"vcf-tag\x00{call_id}".encode("utf-8", "surrogateescape")).hexdigest()[:16]
