"""Migration: the wire protocol, the source (warm and live), the destination, convergence and
statistics. Speaks to a guest only through the guest-handle protocol (``state.handle.GuestHandle``,
passed as ``adapter``) and to state only through ``vmmpy.state``; knows nothing of snapshots nor of
the runtime. See docs/migration-protocol.md.
"""

from ..state.handle import spec_mismatches
from .convergence import COMPRESS_MODES, POLICIES, Estimate, MigrationParams, estimate, estimate_warm
from .destination import Destination, receive, serve_connection
from .digest import VERIFY_MODES
from .errors import (
    Aborted,
    AuthenticationError,
    Cancelled,
    ConnectionLost,
    MigrationError,
    MigrationTimeout,
    NotConverging,
    ProtocolError,
    Refused,
)
from .net import DEFAULT_PORT, format_address, parse_address
from .source import MigrationHandle, migrate
from .stats import MigrationStats, RoundStats
from .tls import TlsConfig, wrap_tls

__all__ = [
    "COMPRESS_MODES",
    "DEFAULT_PORT",
    "POLICIES",
    "VERIFY_MODES",
    "Aborted",
    "AuthenticationError",
    "Cancelled",
    "ConnectionLost",
    "Destination",
    "Estimate",
    "MigrationError",
    "MigrationHandle",
    "MigrationParams",
    "MigrationStats",
    "MigrationTimeout",
    "NotConverging",
    "ProtocolError",
    "Refused",
    "RoundStats",
    "TlsConfig",
    "estimate",
    "estimate_warm",
    "format_address",
    "migrate",
    "parse_address",
    "receive",
    "serve_connection",
    "spec_mismatches",
    "wrap_tls",
]
