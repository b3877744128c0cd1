"""The command-line tools: ``vmmrun`` (like bhyve) and ``vmmctl`` (like bhyvectl): they parse
options, talk to the control socket and print; what the commands do lives in ``runtime``."""
