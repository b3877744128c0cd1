"""The one error of checkpoint files."""


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message names the file and what is wrong."""
