"""Plivo Voice API.

protocol.py (pure XML, callbacks, stream codec, signatures), carrier.py (REST + streams), settings.py.
"""

from carriers import lazy_exports

__getattr__ = lazy_exports(__name__, "carrier", "protocol")
