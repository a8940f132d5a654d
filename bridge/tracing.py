"""OpenTelemetry spans for calls, turns, webhooks and carrier REST requests.

Off by default and then free: nothing of OpenTelemetry is imported and every method returns at
once. On when `telemetry.otlpEndpoint` is set (the `telemetry` extra: SDK + OTLP/HTTP exporter),
or when a test hands in its own TracerProvider (e.g. with an InMemorySpanExporter).

Turn spans are made after the fact from the turn's milestones (monotonic clock readings), so the
turn pipeline only records times and never holds a span open across awaits.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from bridge.turnmarks import MILESTONES, PARTS, Turn

log = logging.getLogger(__name__)


class _NoSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        return None


NO_SPAN = _NoSpan()


class Tracing:
    def __init__(self, provider: Any = None, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("voicecall") if provider is not None else None
        self._monotonic = monotonic
        self._calls: dict[str, Any] = {}
        self._owns_provider = False

    @classmethod
    def from_settings(cls, endpoint: str | None, service_name: str, *,
                      monotonic: Callable[[], float] = time.monotonic) -> Tracing:
        if not endpoint:
            return cls(None, monotonic=monotonic)
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise RuntimeError("telemetry.otlpEndpoint is set but the OpenTelemetry SDK is not installed "
                               "(pip install 'voicecall[telemetry]')") from None
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=_traces_url(endpoint))))
        tracing = cls(provider, monotonic=monotonic)
        tracing._owns_provider = True
        return tracing

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def _to_ns(self) -> Callable[[float], int]:
        """Monotonic clock readings -> wall-clock nanoseconds (what spans carry), on one anchor so
        back-to-back parts share their boundaries exactly."""
        offset = time.time_ns() - int(self._monotonic() * 1e9)
        return lambda mono: offset + int(mono * 1e9)

    # ------------------------------------------------------------ calls and turns
    def call_started(self, call_id: str, attributes: dict[str, Any]) -> None:
        if self._tracer is None or call_id in self._calls:
            return
        self._calls[call_id] = self._tracer.start_span("call", attributes={"voicecall.call_id": call_id,
                                                                            **attributes})

    def call_ended(self, call_id: str, state: str) -> None:
        span = self._calls.pop(call_id, None)
        if span is not None:
            span.set_attribute("voicecall.end_state", state)
            span.end()

    def _parent(self, call_id: str | None) -> Any:
        from opentelemetry import trace

        span = self._calls.get(call_id or "")
        return trace.set_span_in_context(span) if span is not None else None

    def turn(self, turn: Turn) -> None:
        """A `turn` span under the call's span, one child span per part that has both ends."""
        if self._tracer is None:
            return
        from opentelemetry import trace

        marks = turn.marks
        known = [m for m in MILESTONES if m in marks]
        if len(known) < 2:
            return
        parts = turn.parts
        ns = self._to_ns()
        span = self._tracer.start_span(
            "turn", context=self._parent(turn.call_id), start_time=ns(marks[known[0]]),
            attributes={"voicecall.call_id": turn.call_id, "voicecall.turn": turn.number,
                        **{f"voicecall.latency_ms.{k}": v for k, v in parts.items()}})
        context = trace.set_span_in_context(span)
        for name, (a, b) in PARTS.items():
            if a in marks and b in marks:
                child = self._tracer.start_span(name, context=context, start_time=ns(marks[a]))
                child.end(end_time=ns(marks[b]))
        span.end(end_time=ns(marks[known[-1]]))

    # ------------------------------------------------------------ HTTP in and out
    @contextlib.contextmanager
    def span(self, name: str, attributes: dict[str, Any], call_id: str | None = None) -> Iterator[Any]:
        if self._tracer is None:
            yield NO_SPAN
            return
        with self._tracer.start_as_current_span(name, context=self._parent(call_id), attributes=attributes) as span:
            yield span

    def request(self, carrier: str, method: str, path: str, status: int | None, start_ns: int,
                end_ns: int, call_id: str | None) -> None:
        """A carrier REST request that already happened (wall-clock nanoseconds)."""
        if self._tracer is None:
            return
        span = self._tracer.start_span(f"{carrier} {method}", context=self._parent(call_id), start_time=start_ns,
                                       attributes={"http.request.method": method, "url.path": path,
                                                   "voicecall.carrier": carrier})
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        for call_id in list(self._calls):
            self.call_ended(call_id, "shutdown")
        if self._owns_provider:
            self._provider.shutdown()


def _traces_url(endpoint: str) -> str:
    """An OTLP/HTTP collector base (http://host:4318) or its full traces URL."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"
