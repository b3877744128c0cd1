"""The root of the errors vmmpy raises on purpose, so a caller can catch them all in one clause.

Each layer keeps its own error (``ConfigError`` for options, ``SectionError`` for saved state,
``CheckpointError`` for checkpoint files, ``MigrationError`` and its kinds for migrations,
``ControlError`` for the control socket, ``ReportError`` for migration reports); every one of
them derives from :class:`VmmpyError` as well as from the built-in it always had (``ValueError``,
``OSError``), so code that catches those keeps working::

    try:
        vm.migrate("10.0.0.2", 24983)
    except vmmpy.MigrationError as err:     # what failed, and err.stats: how far it got
        ...
    except vmmpy.VmmpyError as err:         # anything else vmmpy refused, in the user's terms
        ...

Bugs stay bugs: an exception that is not a ``VmmpyError`` is not one vmmpy meant to raise.
"""


class VmmpyError(Exception):
    """Something vmmpy refused or could not do; the message says what, naming the option, file,
    field or peer, and the value."""
