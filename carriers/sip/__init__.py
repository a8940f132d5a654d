"""Direct SIP on pjsua2.

protocol.py (pure), proxy.py + front.py (the SIP front), ua.py / worker.py / pool.py (user
agents), media.py, carrier.py, settings.py.
"""

from carriers import lazy_exports

__getattr__ = lazy_exports(__name__, "carrier")
