"""HTTP side of the console: its static files, login/logout, session state, and recording playback.

Everything the console shows or does goes through the RPC WebSocket (`voicecall.subscribe`,
`voicecall.levels`, `voicecall.*`); these routes only get the browser a session and serve files.
"""

from __future__ import annotations

import hmac
import json
import re
from importlib import resources

from aiohttp import web

from bridge.console.sessions import COOKIE, ConsoleSessions, same_origin
from bridge.manager import CallManager
from bridge.rpc import RpcEndpoint

STATIC = {"app.js": "application/javascript", "style.css": "text/css", "index.html": "text/html"}
# Wrong tokens allowed per client address and window before login answers 429 for the rest of it.
MAX_LOGIN_FAILURES = 10
LOGIN_WINDOW_S = 60.0
CALL_ID = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
# The console's own files only: no inline scripts, nothing fetched from elsewhere.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def _static(name: str) -> bytes:
    return resources.files("bridge.console").joinpath("static", name).read_bytes()


def add_console(app: web.Application, manager: CallManager, rpc: RpcEndpoint, token: str | None) -> None:
    settings = manager.settings
    sessions = ConsoleSessions(settings.console.sessionHours * 3600, manager.clock.time)
    # A cookie alone is not enough: the request must come from our own page (Origin), which a
    # cross-site page cannot fake; SameSite=Strict keeps the cookie off cross-site requests too.
    rpc.browser_auth = lambda request: sessions.of(request) and same_origin(request)
    files = {name: _static(name) for name in STATIC}
    recordings = (settings.store_dir / "recordings").resolve()
    failures: dict[str, list[float]] = {}

    def throttled(ip: str) -> bool:
        now = manager.clock.monotonic()
        recent = [t for t in failures.get(ip, []) if now - t < LOGIN_WINDOW_S]
        if recent:
            failures[ip] = recent
        else:
            failures.pop(ip, None)
        return len(recent) >= MAX_LOGIN_FAILURES

    def signed_in(request: web.Request) -> bool:
        return not token or sessions.of(request) or _bearer_ok(request, token)

    async def page(_: web.Request) -> web.Response:
        return web.Response(body=files["index.html"], content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
                                     "Cache-Control": "no-store"})

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound(text="no such console file")
        return web.Response(body=files[name], content_type=STATIC[name], charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def session(request: web.Request) -> web.Response:
        return web.json_response({"authenticated": bool(signed_in(request)), "tokenRequired": bool(token),
                                  "provider": manager.carrier.name, "methods": rpc.dispatcher.methods})

    async def login(request: web.Request) -> web.Response:
        if not same_origin(request):
            return web.json_response({"error": "cross-origin login refused"}, status=403)
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            return web.json_response({"error": "expected JSON {\"token\": ...}"}, status=400)
        presented = body.get("token") if isinstance(body, dict) else None
        ip = request.remote or ""
        if token and throttled(ip):
            return web.json_response({"error": "too many wrong tokens; try again later"}, status=429)
        if token and not (isinstance(presented, str) and hmac.compare_digest(presented.encode(), token.encode())):
            if len(failures) < 10_000 or ip in failures:
                failures.setdefault(ip, []).append(manager.clock.monotonic())
            return web.json_response({"error": "wrong token"}, status=401)
        response = web.json_response({"authenticated": True})
        response.set_cookie(COOKIE, sessions.create(), httponly=True, samesite="Strict", path="/",
                            secure=request.secure or request.headers.get("X-Forwarded-Proto") == "https",
                            max_age=int(settings.console.sessionHours * 3600))
        return response

    async def logout(request: web.Request) -> web.Response:
        if not same_origin(request):
            return web.json_response({"error": "cross-origin logout refused"}, status=403)
        sessions.drop(request.cookies.get(COOKIE))
        response = web.json_response({"authenticated": False})
        response.del_cookie(COOKIE, path="/")
        return response

    async def recording(request: web.Request) -> web.StreamResponse:
        if not signed_in(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        call_id = request.match_info["call_id"]
        if not CALL_ID.match(call_id) or manager.status(call_id) is None:
            raise web.HTTPNotFound(text="no such call")
        path = (recordings / f"{call_id}.wav").resolve()
        if not path.is_relative_to(recordings) or not path.is_file():
            raise web.HTTPNotFound(text="no recording for this call")
        return web.FileResponse(path, headers={"Content-Type": "audio/wav", "Cache-Control": "no-store"})

    app.router.add_get("/console", page)
    app.router.add_get("/console/", page)
    app.router.add_get("/console/static/{name}", static)
    app.router.add_get("/console/session", session)
    app.router.add_post("/console/login", login)
    app.router.add_post("/console/logout", logout)
    app.router.add_get("/console/recordings/{call_id}", recording)


def _bearer_ok(request: web.Request, token: str) -> bool:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.encode(), token.encode())



