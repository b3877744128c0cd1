"""The command-line tools: ``vmmrun`` (like bhyve) and ``vmmctl`` (like bhyvectl): they parse
options, talk to the control socket and print; what the commands do lives in ``runtime``."""

import os


def tool_environment() -> None:
    """Called by vmmrun and vmmctl before anything they do loads numpy (their imports do not),
    never by the library. The tools never multiply matrices, but numpy's BLAS (OpenBLAS) starts a
    thread per CPU when numpy loads: about 0.1 s of CPU at every start, which a busy host pays in
    wall time (`vmmrun --help`, 9 runs each: 385 -> 285 ms of CPU). A value the user set is kept."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
