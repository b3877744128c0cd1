"""The one error of checkpoint files."""


from ..errors import VmmpyError


class CheckpointError(VmmpyError):
    """A checkpoint that cannot be written or read; the message names the file and what is wrong."""
