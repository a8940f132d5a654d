"""The cluster store for a config with a `cluster` section (imports redis only then)."""

from __future__ import annotations

from urllib.parse import urlsplit

from bridge.cluster.redis_store import TRANSIENT, RedisStore
from bridge.cluster.shared_log import SharedCallLog
from bridge.config import ClusterSettings
from media.clock import Clock


class ClusterUnavailable(Exception):
    """Redis did not answer at start; the message names the key and the host, never the password."""


def shared_log(cluster: ClusterSettings, clock: Clock | None = None) -> SharedCallLog:
    return SharedCallLog(RedisStore(cluster.redisUrl, prefix=cluster.keyPrefix), cluster.node_id, clock=clock)


def redis_host(url: str) -> str:
    parts = urlsplit(url)
    return parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"


async def check_reachable(log: SharedCallLog, url: str) -> None:
    try:
        await log.store.redis.ping()
    except TRANSIENT as exc:
        await log.store.close()
        raise ClusterUnavailable(f"cluster.redisUrl: cannot reach Redis at {redis_host(url)} ({type(exc).__name__})") from None
