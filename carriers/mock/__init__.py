"""The offline loopback carrier and its simulated callee."""

from carriers import lazy_exports

__getattr__ = lazy_exports(__name__, "carrier")
