"""Asterisk over ARI.

protocol.py (pure ARI facts), events.py (events WebSocket), rtp.py (ExternalMedia RTP leg), carrier.py, settings.py.
"""

from carriers import lazy_exports

__getattr__ = lazy_exports(__name__, "carrier")
