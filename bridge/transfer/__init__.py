"""Transfer of a caller to a person: cold (the carrier hands the call over) and warm (the bridge
calls the person, briefs them, then joins the two). `rules.py` is pure; `controller.py` does the I/O
through the manager's public surface (`TransferHost`); `summary.py` writes the briefing."""
