"""The conversation engine: streaming chat turns, in-call tools, consult, speakable text pieces."""
