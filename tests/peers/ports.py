"""Distinct free localhost ports per test, so real-peer tests never collide.

Each role has its own block of ports, all on 127.0.0.1 and below Linux's ephemeral range
(32768+), so nothing the OS hands out to other sockets lands in them: the bridge's SIP port
5100-5139, softphones' 5200-5239, sipp's 5300-5339 (UAC) and 5400-5439 (UAS), Kamailio's
5500-5539 and the bridge nodes behind it 5600-5639, baresip's control socket 4400-4439, and RTP
ranges from 20000 up (a test's own RTP listener: 30000-30079). Under pytest-xdist each worker takes
every n-th block of a role (worker i of n: blocks i, i+n, ...), so workers never share a port.
"""

from __future__ import annotations

import socket
from collections import defaultdict

from tests.workers import slot

_WINDOW = 40  # blocks per role before wrapping around
_next: defaultdict[tuple[int, int], int] = defaultdict(int)


def _free(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port(base: int, span: int = 1) -> int:
    """A port in [base, base + 40 * span) where `span` consecutive ports are free (UDP and TCP);
    each call moves on to the next block, so consecutive tests do not reuse each other's ports."""
    worker, workers = slot()
    blocks = range(worker % _WINDOW, _WINDOW, workers)
    for _ in blocks:
        index = blocks[_next[(base, span)] % len(blocks)]
        _next[(base, span)] += 1
        port = base + index * span
        if all(_free(p) for p in range(port, port + span)):
            return port
    raise RuntimeError(f"no {span} free ports from {base}")


def bridge_sip() -> int:
    return free_port(5100)


def bridge_rtp() -> int:
    """Start of the bridge's RTP range (pjsua takes ports from here up, 2 per call)."""
    return free_port(20000, 100)


def phone_sip() -> int:
    return free_port(5200)


def phone_ctrl() -> int:
    return free_port(4400)


def phone_rtp() -> int:
    return free_port(24000, 50)


def sipp_uac() -> int:
    return free_port(5300)


def sipp_uas() -> int:
    return free_port(5400)


def proxy_sip() -> int:
    """A SIP proxy (Kamailio) in front of bridge nodes."""
    return free_port(5500)


def node_sip() -> int:
    """A bridge node's SIP port behind a proxy (its own block: the nodes restart on their port)."""
    return free_port(5600)


def sipp_media() -> int:
    return free_port(26000, 100)


def rtp_listener() -> int:
    """An even port (RTP, with RTCP above it) where a test itself receives a call's media."""
    return free_port(30000, 2)
