"""Why a migration did not complete: one exception type per kind of failure, all MigrationError.

The engine turns every one of them into a failed or cancelled MigrationStats with the message as
``error``; callers that want to branch on the cause catch the subclass.
"""

from __future__ import annotations

import errno

from ..errors import VmmpyError


class MigrationError(VmmpyError):
    """A migration failed; the message says what and where. Raised by ``vmmpy.Vm.migrate`` and
    ``Vm.received`` with ``stats``: the :class:`~vmmpy.migration.MigrationStats` of the attempt
    (how far it got); None where no statistics exist."""

    stats = None


class ProtocolError(MigrationError):
    """The peer sent bytes that are not a valid frame or not the message expected now."""


class ConnectionLost(MigrationError):
    """The connection broke or the peer closed it. ``stream`` is the parallel data stream that
    broke (1 and up); None where it was the main connection, which then cannot carry an ABORT."""

    stream: int | None = None


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


def peer_stalled(role: str, peer: str | None, seconds: float | None, *, sending: bool, during: str) -> str:
    """How a timeout reads: which peer stopped, after how long, and during what, e.g. ``timed
    out: the source (10.0.0.1:40022) sent nothing for 30 s during round 2's page batches``."""
    who = f"the {role} ({peer})" if peer else f"the {role}"
    did = "took" if sending else "sent"
    how_long = f" for {seconds:g} s" if seconds else ""
    return f"timed out: {who} {did} nothing{how_long} during {during}"


def receive_error(err: OSError, what: str, *, stream: int | None = None) -> MigrationError:
    """A page batch receive from the source that failed (``PageBatchError``, an OSError with
    errno; a timeout carries ``timeout`` and ``peer``), as the migration error that says why:
    timed out, connection lost, or a bad stream. ``what`` names the round (``round 2``),
    ``stream`` the parallel stream it came on."""
    on = f", stream {stream}" if stream is not None else ""
    if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        during = f"{what}'s page batches" + (f" (stream {stream})" if stream is not None else "")
        return MigrationTimeout(peer_stalled("source", getattr(err, "peer", None), getattr(err, "timeout", None),
                                             sending=False, during=during))
    text = f"{what}{on}: {err.strerror or err}"
    if err.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN):
        lost = ConnectionLost(text)
        lost.stream = stream or None  # stream 0 is the main connection
        return lost
    return ProtocolError(text)
