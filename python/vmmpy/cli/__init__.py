"""The command-line tools: ``vmmrun`` (like bhyve) and ``vmmctl`` (like bhyvectl)."""
