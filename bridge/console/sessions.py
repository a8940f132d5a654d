"""Browser sessions of the console: a random id in an HttpOnly, SameSite=Strict cookie, kept in memory.

A restart logs everybody out, which is fine for an operator console and keeps no secret on disk.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import urlsplit

from aiohttp import web

COOKIE = "voicecall_console"
MAX_SESSIONS = 1000


class ConsoleSessions:
    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def create(self) -> str:
        sid = secrets.token_urlsafe(32)
        self._expiry[sid] = self._clock() + self._ttl
        while len(self._expiry) > MAX_SESSIONS:
            self._expiry.popitem(last=False)
        return sid

    def valid(self, sid: str | None) -> bool:
        if not sid:
            return False
        expiry = self._expiry.get(sid)
        if expiry is None:
            return False
        if expiry <= self._clock():
            del self._expiry[sid]
            return False
        return True

    def drop(self, sid: str | None) -> None:
        if sid:
            self._expiry.pop(sid, None)

    def of(self, request: web.Request) -> bool:
        return self.valid(request.cookies.get(COOKIE))


def same_origin(request: web.Request) -> bool:
    """The browser says the page that made this request is ours (Origin's host:port is our Host)."""
    origin = request.headers.get("Origin")
    if not origin:
        return False
    return urlsplit(origin).netloc.lower() == (request.host or "").lower()
