"""Run a source and a destination against each other on loopback, in threads of the test process."""

from __future__ import annotations

import threading

from vmmpy.migration import Destination, MigrationParams, migrate

KEY = b"k" * 32


class DestinationThread:
    """A Destination on an ephemeral loopback port, receiving in a thread."""

    def __init__(self, adapter, *, host: str = "127.0.0.1", key: bytes | None = None, params: MigrationParams | None = None,
                 cancel: threading.Event | None = None, accept_timeout: float = 30.0) -> None:
        self.dest = Destination(adapter, host, 0, key=key, params=params, cancel=cancel)
        self.host, self.port = self.dest.address[:2]
        self.stats = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.stats = self.dest.run(accept_timeout=accept_timeout)
            except BaseException as err:  # noqa: BLE001 - re-raised in join()
                self.error = err

        self.thread = threading.Thread(target=run, name="migration-destination", daemon=True)
        self.thread.start()

    def stop_waiting(self, timeout: float = 60.0):
        """A destination still waiting after its source failed before its SPEC was accepted (a
        stranger, to the destination) waits on: end the wait, then join."""
        self.dest.stop_waiting()
        return self.join(timeout)

    def join(self, timeout: float = 60.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "destination did not finish"
        if self.error is not None:
            raise self.error
        return self.stats


def migrate_pair(src, dst, *, live: bool, key: bytes | None = None, dst_key: bytes | None = None,
                 params: MigrationParams | None = None, dst_params: MigrationParams | None = None, **kwargs):
    d = DestinationThread(dst, key=dst_key, params=dst_params or params)
    stats = migrate(src, d.host, d.port, live=live, key=key, params=params, **kwargs)
    return stats, d.join()
