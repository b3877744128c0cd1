"""``--version`` for both tools: the release and the formats it speaks, which decide what it can
restore and whom it can migrate to."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import __version__


def version_line(prog: str) -> str:
    """e.g. ``vmmctl (vmmpy) 0.1.0: migration protocol 2-5, checkpoint format 1-2``."""
    # Imported here: the checkpoint format loads numpy, which no other vmmctl command needs.
    from ..migration.protocol import PROTOCOL_VERSIONS
    from ..snapshot.meta import FORMAT_VERSIONS

    def span(versions: tuple[int, ...]) -> str:
        return f"{min(versions)}-{max(versions)}" if len(versions) > 1 else str(versions[0])

    return f"{prog} (vmmpy) {__version__}: migration protocol {span(PROTOCOL_VERSIONS)}, checkpoint format {span(FORMAT_VERSIONS)}"


class VersionAction(argparse.Action):
    """argparse's ``--version``, with the line made only when it is asked for (making it loads the
    checkpoint format's modules, and numpy with them)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, default: Any = argparse.SUPPRESS,
                 help: str = "show the release and the formats it speaks, and exit") -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(version_line(parser.prog), file=sys.stdout)
        parser.exit()
