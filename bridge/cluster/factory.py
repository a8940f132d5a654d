"""The cluster store for a config with a `cluster` section (imports redis only then)."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

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
    """One PING without the store client's retries: a wrong URL fails at start within seconds."""
    probe: aioredis.Redis = aioredis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3,
                                                     retry=Retry(NoBackoff(), 0))
    try:
        await probe.ping()
    except TRANSIENT as exc:
        await log.store.close()
        raise ClusterUnavailable(f"cluster.redisUrl: cannot reach Redis at {redis_host(url)} ({type(exc).__name__})") from None
    finally:
        await probe.aclose()
