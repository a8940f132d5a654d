"""Errors of the cluster layer that the RPC surface maps (importable without the redis package)."""

from __future__ import annotations


class RouteError(Exception):
    """A command for another node's call could not be carried out there (or the answer did not come)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NodeUnreachable(RouteError):
    """The node named as a call's owner is gone (no one listens on its channel), silent, or shutting down."""

    def __init__(self, message: str) -> None:
        super().__init__(-32000, message)
