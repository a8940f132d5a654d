"""Speech-to-speech sessions: the call's audio straight to a realtime model and its audio back.

`events` holds what every provider's protocol reports, `openai` and `gemini` the sans-I/O wire
logic of each provider, `connection` the one asyncio edge (WebSocket, reconnect, goAway hand-over).
"""
