"""``--key-file FILE``: the shared secret of a migration or a keyed checkpoint.

The file holds the key's bytes; surrounding whitespace is dropped (a key written by
``openssl rand -hex 32 > mig.key`` works). A key shorter than 16 bytes is refused: both the
migration handshake and the checkpoint MAC need at least that much secret.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

MIN_KEY_BYTES = 16


def read_key(path: Path | None) -> bytes | None:
    """The key in ``path`` (None when no --key-file was given); ValueError naming the file."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            key = f.read().strip()
    except OSError as err:
        raise ValueError(f"--key-file {path}: {err.strerror}") from None
    if mode & 0o077:
        # As ssh does for a private key, but a warning: the key still works (a shared secret copied
        # between hosts often lands with the umask's mode), and the fix is one command.
        print(f"warning: --key-file {path} can be read by others (mode {stat.S_IMODE(mode):04o}): "
              f"anyone who can read it can migrate guests to or from here; chmod 600 {path}", file=sys.stderr)
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"--key-file {path}: a key needs at least {MIN_KEY_BYTES} bytes, this has {len(key)}")
    return key
