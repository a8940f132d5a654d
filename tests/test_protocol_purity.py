"""Each carrier's protocol module is sans-I/O: it imports with aiohttp refused (issue 9)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROTOCOL_MODULES = [
    "carriers.twilio",  # the package itself re-exports lazily
    "carriers.twilio.protocol",
    "carriers.telnyx.protocol",
    "carriers.plivo.protocol",
    "carriers.sip.protocol",
    "carriers.sip.proxy",
    "carriers.asterisk.protocol",
    "carriers.wire",
    "carriers.signatures",
    "carriers.registry",
]

# A meta-path finder that refuses aiohttp (and anything below it), as if it were not installed.
BLOCKER = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "aiohttp" or name.startswith("aiohttp."):
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Refuse())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("module", PROTOCOL_MODULES)
def test_protocol_module_imports_without_aiohttp(module: str) -> None:
    result = _run(f"import {module}\nassert 'aiohttp' not in sys.modules")
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_blocker_really_refuses_aiohttp() -> None:
    """The I/O module of a carrier needs aiohttp, so under the blocker it must fail to import."""
    result = _run("import carriers.twilio.carrier")
    assert result.returncode != 0
    assert "blocked: aiohttp" in result.stderr


@pytest.mark.parametrize("module", ["bridge.conversation.segmenter", "bridge.conversation.sse",
                                    "bridge.conversation.messages", "bridge.conversation.tools"])
def test_conversation_wire_logic_imports_without_aiohttp(module: str) -> None:
    result = _run(f"import {module}\nassert 'aiohttp' not in sys.modules")
    assert result.returncode == 0, result.stderr[-2000:]
