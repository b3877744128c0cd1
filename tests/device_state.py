"""Device state as a section carries it: the payload dict a test can inspect or damage, and back."""

from __future__ import annotations

from typing import Any

from vmmpy.state import persist


def payload_of(device: Any) -> dict[str, Any]:
    """The device's section payload (``state.kernel.save_sections`` writes exactly this)."""
    return persist.dump(device.save())


def restore_payload(device: Any, payload: dict[str, Any], version: int | None = None) -> None:
    """Restore a payload as ``state.kernel.restore_sections`` does: read at the section's
    version against the device's declaration, then handed to the device."""
    state = persist.load(device.STATE, payload, device.STATE.VERSION if version is None else version, where=device.name)
    device.restore(state)
