"""Migration: the wire protocol, the source (warm and live), the destination, convergence and
statistics. Speaks to a guest only through the guest-handle protocol (``state.handle.GuestHandle``,
passed as ``adapter``) and to state only through ``vmmpy.state``; knows nothing of snapshots nor of
the runtime. See docs/migration-protocol.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names
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

if TYPE_CHECKING:  # what type checkers see; at run time these come from _LAZY on first use
    from ..state.handle import spec_mismatches
    from .convergence import COMPRESS_MODES, POLICIES, Estimate, MigrationParams, estimate, estimate_warm
    from .destination import Destination, receive, serve_connection
    from .digest import VERIFY_MODES
    from .net import DEFAULT_PORT, format_address, parse_address
    from .source import MigrationHandle, migrate
    from .stats import MigrationStats, RoundStats
    from .tls import TlsConfig, wrap_tls

#: Names offered here: (module, name), imported on first use, so that a tool which only needs the
#: parameters or the protocol's constants (vmmctl) loads neither the engines nor numpy.
_LAZY = {
    "spec_mismatches": ("..state.handle", "spec_mismatches"),
    "COMPRESS_MODES": (".convergence", "COMPRESS_MODES"),
    "POLICIES": (".convergence", "POLICIES"),
    "Estimate": (".convergence", "Estimate"),
    "MigrationParams": (".convergence", "MigrationParams"),
    "estimate": (".convergence", "estimate"),
    "estimate_warm": (".convergence", "estimate_warm"),
    "Destination": (".destination", "Destination"),
    "receive": (".destination", "receive"),
    "serve_connection": (".destination", "serve_connection"),
    "VERIFY_MODES": (".digest", "VERIFY_MODES"),
    "DEFAULT_PORT": (".net", "DEFAULT_PORT"),
    "format_address": (".net", "format_address"),
    "parse_address": (".net", "parse_address"),
    "MigrationHandle": (".source", "MigrationHandle"),
    "migrate": (".source", "migrate"),
    "MigrationStats": (".stats", "MigrationStats"),
    "RoundStats": (".stats", "RoundStats"),
    "TlsConfig": (".tls", "TlsConfig"),
    "wrap_tls": (".tls", "wrap_tls"),
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())

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
