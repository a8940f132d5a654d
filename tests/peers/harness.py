"""Start a SipCarrier on a TestHost for one test, and say clearly why real-peer tests skip."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from typing import cast

from carriers.base import CarrierHost
from carriers.sip.carrier import SipCarrier
from carriers.sip.settings import SipSettings
from tests.peers.host import TestHost

APT_HINT = "apt-get install -y baresip-core sip-tester espeak-ng sox"


def skip_reason(*binaries: str) -> str | None:
    """None when pjsua2 imports and every binary is on PATH; else the reason to skip."""
    try:
        import pjsua2  # noqa: F401
    except ImportError:
        return "pjsua2 is not importable: install the `sip` extra (pjsua2-python has no wheel for Python 3.13+)"
    for name in binaries:
        if shutil.which(name) is None:
            return f"{name} is not installed ({APT_HINT})"
    return None


@contextlib.asynccontextmanager
async def running_carrier(settings: SipSettings, policy: str = "answer") -> AsyncIterator[tuple[TestHost, SipCarrier]]:
    host = TestHost(settings, policy)
    carrier = SipCarrier(settings)
    host.carrier = carrier
    await carrier.start(cast(CarrierHost, host))
    try:
        yield host, carrier
    finally:
        await carrier.close()
