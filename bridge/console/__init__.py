"""The web console at /console: static pages on top of the RPC WebSocket, one login with the RPC token."""
