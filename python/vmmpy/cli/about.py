"""``--version`` for both tools: the release and the formats it speaks, which decide what it can
restore and whom it can migrate to."""

from __future__ import annotations

from .. import __version__
from ..migration.protocol import PROTOCOL_VERSIONS
from ..snapshot.meta import FORMAT_VERSIONS


def version_line(prog: str) -> str:
    """e.g. ``vmmctl (vmmpy) 0.1.0: migration protocol 2-5, checkpoint format 1-2``."""
    def span(versions: tuple[int, ...]) -> str:
        return f"{min(versions)}-{max(versions)}" if len(versions) > 1 else str(versions[0])

    return f"{prog} (vmmpy) {__version__}: migration protocol {span(PROTOCOL_VERSIONS)}, checkpoint format {span(FORMAT_VERSIONS)}"
