"""Endpoint URLs: a configured base URL (http(s) or ws(s)) -> the WebSocket URL of a path under it."""

from __future__ import annotations

from urllib.parse import urlencode


def websocket_url(base: str, path: str, query: dict[str, object] | None = None) -> str:
    """`base` with http->ws and https->wss, `/path` appended, and the query encoded (when given)."""
    url = base.rstrip("/")
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if url.startswith(http):
            url = ws + url[len(http):]
            break
    url = f"{url}/{path.lstrip('/')}"
    return f"{url}?{urlencode(query)}" if query else url
