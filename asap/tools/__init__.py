"""Developer tools (``python -m asap.tools.<name>``)."""
