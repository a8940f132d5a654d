"""Carrier REST over aiohttp: one session per carrier, retries with backoff for idempotent requests only.

A POST that creates a call is not idempotent (a retry could dial twice), so it is sent once unless
the caller marks it idempotent (e.g. Telnyx commands carry a command_id the carrier dedupes).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from carriers.base import CarrierError, request_observers

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({500, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


@dataclass(slots=True)
class HttpResult:
    status: int
    body: Any  # parsed JSON when the reply is JSON, else text

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class CarrierHttp:
    def __init__(
        self,
        carrier: str,
        base_url: str,
        *,
        basic_auth: tuple[str, str] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 10,
        retries: int = 3,
        backoff_s: float = 0.25,
    ) -> None:
        self.carrier = carrier
        self.base_url = base_url.rstrip("/")
        self._headers = dict(headers or {})
        if basic_auth is not None:  # a header: aiohttp 3.14 deprecates BasicAuth / ClientSession(auth=)
            user, password = basic_auth
            self._headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retries = retries
        self._backoff = backoff_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        form: Any = None,
        idempotent: bool | None = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> HttpResult:
        """Send; return the result for 2xx or an `ok_statuses` code; raise CarrierError otherwise."""
        if not request_observers:
            return await self._request(method, path, json_body, form, idempotent, ok_statuses)
        started = time.time_ns()
        status: int | None = None
        try:
            result = await self._request(method, path, json_body, form, idempotent, ok_statuses)
            status = result.status
            return result
        except CarrierError as exc:
            status = exc.status
            raise
        finally:
            ended = time.time_ns()
            for observe in list(request_observers):
                try:
                    observe(self.carrier, method, path, status, started, ended)
                except Exception:  # noqa: BLE001 - monitoring must never break a carrier request
                    log.exception("request observer failed")

    async def _request(self, method: str, path: str, json_body: Any, form: Any, idempotent: bool | None,
                       ok_statuses: tuple[int, ...]) -> HttpResult:
        url = path if path.startswith(("http://", "https://")) else f"{self.base_url}{path}"
        retry = method.upper() in IDEMPOTENT_METHODS if idempotent is None else idempotent
        attempts = self._retries + 1 if retry else 1
        last_error = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
            try:
                async with self._client().request(method, url, json=json_body, data=form) as resp:
                    text = await resp.text()
                    body = _parse(text, resp.content_type)
                    if 200 <= resp.status < 300 or resp.status in ok_statuses:
                        return HttpResult(resp.status, body)
                    last_error = f"{self.carrier} {method} {path} answered HTTP {resp.status}{_detail(body)}"
                    if resp.status not in RETRY_STATUSES:
                        raise CarrierError(last_error, status=resp.status)
            except aiohttp.ClientError as exc:
                last_error = f"{self.carrier} {method} {path} failed: {type(exc).__name__}"
            except TimeoutError:
                last_error = f"{self.carrier} {method} {path} timed out"
            log.warning("%s (attempt %d/%d)", last_error, attempt + 1, attempts)
        raise CarrierError(last_error, retryable=True)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _parse(text: str, content_type: str) -> Any:
    if "json" in content_type or text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _detail(body: Any) -> str:
    """A short, secret-free reason from a carrier error body."""
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            if isinstance(body.get(key), str):
                return f": {body[key][:200]}"
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return f": {str(errors[0].get('detail') or errors[0].get('title') or '')[:200]}"
    return ""
