"""Why a migration did not complete: one exception type per kind of failure, all MigrationError.

The engine turns every one of them into a failed or cancelled MigrationStats with the message as
``error``; callers that want to branch on the cause catch the subclass.
"""

from __future__ import annotations

import errno


class MigrationError(Exception):
    """A migration failed; the message says what and where."""


class ProtocolError(MigrationError):
    """The peer sent bytes that are not a valid frame or not the message expected now."""


class ConnectionLost(MigrationError):
    """The connection broke or the peer closed it."""


class MigrationTimeout(MigrationError):
    """A blocking wait passed its deadline."""


class Refused(MigrationError):
    """The destination refused the migration (authentication, spec mismatch); the reason is its own."""


class Aborted(MigrationError):
    """The peer sent ABORT; the reason is its own."""


class Cancelled(MigrationError):
    """Cancelled locally (MigrationHandle.cancel or the cancel event)."""


class NotConverging(MigrationError):
    """Pre-copy would not converge and the policy is give-up."""


class AuthenticationError(MigrationError):
    """The source will not go on: the destination cannot prove it holds the key, or holds none."""


def receive_error(err: OSError, what: str) -> MigrationError:
    """A page batch receive that failed (``PageBatchError``, an OSError with errno), as the
    migration error that says why: timed out, connection lost, or a bad stream."""
    text = f"{what}: {err.strerror or err}"
    if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return MigrationTimeout(f"{text} (timed out waiting for the source)")
    if err.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN):
        return ConnectionLost(text)
    return ProtocolError(text)
