"""Prometheus metrics through prometheus-client, one registry per running bridge.

Counters and histograms are updated where things happen; what is a snapshot of live state (calls
by state, live media streams, late/lost frames of live bridges) is read at scrape time by a
collector, so the media path pays nothing per frame for metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# No `*_created` timestamp series next to every counter and histogram: noise for this exporter.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Voice-to-voice parts are tens of ms to a few seconds.
TURN_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
WEBHOOK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REDIS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
MEDIA_COUNTERS = ("frames_in", "frames_out", "late_frames", "lost_frames", "underruns")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls_started = Counter("voicecall_calls", "Calls created", ["carrier", "direction"], registry=r)
        self.calls_ended = Counter("voicecall_calls_ended", "Calls ended, by final state",
                                   ["carrier", "state"], registry=r)
        self.turn_latency = Histogram("voicecall_turn_latency_seconds",
                                      "Voice-to-voice turn latency (part=total) and its parts",
                                      ["part"], buckets=TURN_BUCKETS, registry=r)
        self.webhook_latency = Histogram("voicecall_webhook_duration_seconds", "Webhook handling time",
                                         ["carrier"], buckets=WEBHOOK_BUCKETS, registry=r)
        self.webhooks = Counter("voicecall_webhooks", "Webhook answers by status", ["carrier", "status"], registry=r)
        self.webhook_replays = Counter("voicecall_webhook_replays", "Replayed webhooks acknowledged without effect",
                                       ["carrier"], registry=r)
        self.carrier_requests = Counter("voicecall_carrier_requests", "Carrier REST requests by status",
                                        ["carrier", "status"], registry=r)
        self.carrier_request_latency = Histogram("voicecall_carrier_request_duration_seconds",
                                                 "Carrier REST request time (all attempts)", ["carrier"],
                                                 buckets=WEBHOOK_BUCKETS[3:] + (5.0, 10.0), registry=r)
        self.engine_errors = Counter("voicecall_engine_errors", "Speech/model engine errors", ["engine"], registry=r)
        self.stream_refused = Counter("voicecall_stream_refused", "Media-stream sockets refused", ["reason"],
                                      registry=r)
        self.streams_started = Counter("voicecall_streams_started", "Media-stream sockets started", registry=r)
        self.stream_frames_in = Counter("voicecall_stream_frames_in", "Media frames received on stream sockets",
                                        registry=r)
        # Cluster only: Redis commands by operation (command name, or the Lua script's name)
        self.redis_operations = Counter("voicecall_redis_operations", "Redis commands run", ["op"], registry=r)
        self.redis_errors = Counter("voicecall_redis_errors", "Redis commands that failed (after retries)",
                                    ["op"], registry=r)
        self.redis_latency = Histogram("voicecall_redis_operation_duration_seconds", "Redis command time",
                                       ["op"], buckets=REDIS_BUCKETS, registry=r)
        self._media = _MediaCollector()
        r.register(self._media)
        self._gauges: dict[str, tuple[str, Callable[[], Any]]] = {}
        self._counters: dict[str, tuple[str, Callable[[], float]]] = {}
        r.register(_CallbackCollector(self._gauges, self._counters))

    # ------------------------------------------------------------ updates from the application
    def track_media(self, bridge: Any) -> None:
        """A call's MediaPipeline: its stats count into the media counters, live and after it closes."""
        self._media.track(bridge)

    def gauge(self, name: str, help_text: str, read: Callable[[], Any]) -> None:
        """A value read at scrape time: a number, or a mapping of label tuple -> number (`labels` in help)."""
        self._gauges[name] = (help_text, read)

    def counter(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere (e.g. by the call store), read at scrape time (`name` without _total)."""
        self._counters[name] = (help_text, read)

    def observe_turn(self, parts_ms: dict[str, float]) -> None:
        for part, ms in parts_ms.items():
            self.turn_latency.labels(part=part).observe(max(0.0, ms) / 1000)

    def observe_webhook(self, carrier: str, status: int, seconds: float) -> None:
        self.webhooks.labels(carrier=carrier, status=str(status)).inc()
        self.webhook_latency.labels(carrier=carrier).observe(seconds)

    def observe_redis(self, op: str, seconds: float, ok: bool) -> None:
        self.redis_operations.labels(op=op).inc()
        self.redis_latency.labels(op=op).observe(seconds)
        if not ok:
            self.redis_errors.labels(op=op).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent), e.g. `value("voicecall_webhooks_total", carrier=..., status=...)`."""
        return self.registry.get_sample_value(name, labels) or 0.0


class _MediaCollector(Collector):
    """Frame counters summed over live MediaPipelines plus those already closed."""

    def __init__(self) -> None:
        self._live: list[Any] = []
        self._done = dict.fromkeys(MEDIA_COUNTERS, 0)

    def track(self, bridge: Any) -> None:
        self._fold_closed()
        self._live.append(bridge)

    def _fold_closed(self) -> None:
        still: list[Any] = []
        for bridge in self._live:
            if bridge.closed:
                for key in MEDIA_COUNTERS:
                    self._done[key] += getattr(bridge.stats, key)
            else:
                still.append(bridge)
        self._live = still

    def collect(self) -> Iterable[Any]:
        self._fold_closed()
        totals = dict(self._done)
        for bridge in self._live:
            for key in MEDIA_COUNTERS:
                totals[key] += getattr(bridge.stats, key)
        yield GaugeMetricFamily("voicecall_media_streams_active", "Calls with live audio (MediaPipelines)",
                                value=len(self._live))
        frames = CounterMetricFamily("voicecall_media_frames", "Media frames through the bridge",
                                     labels=["direction"])
        frames.add_metric(["in"], totals["frames_in"])
        frames.add_metric(["out"], totals["frames_out"])
        yield frames
        yield CounterMetricFamily("voicecall_media_frames_late", "Inbound frames that arrived too late (dropped)",
                                  value=totals["late_frames"])
        yield CounterMetricFamily("voicecall_media_frames_lost", "Inbound frames never received",
                                  value=totals["lost_frames"])
        yield CounterMetricFamily("voicecall_media_underruns", "Outbound underruns (engine slower than real time)",
                                  value=totals["underruns"])


class _CallbackCollector(Collector):
    def __init__(self, gauges: dict[str, tuple[str, Callable[[], Any]]],
                 counters: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._gauges = gauges
        self._counters = counters

    def collect(self) -> Iterable[Any]:
        for name, (help_text, read_count) in sorted(self._counters.items()):
            yield CounterMetricFamily(name, help_text, value=read_count())
        for name, (help_text, read) in sorted(self._gauges.items()):
            value = read()
            if isinstance(value, tuple):  # (label names, {label values: number})
                label_names, samples = value
                family = GaugeMetricFamily(name, help_text, labels=list(label_names))
                for label_values, number in sorted(samples.items()):
                    family.add_metric(list(label_values), number)
                yield family
            else:
                yield GaugeMetricFamily(name, help_text, value=value)
