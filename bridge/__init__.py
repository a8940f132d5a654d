"""voicecall: phone calls for an AI agent."""

__version__ = "0.1.0"
