"""Shared fixtures: which dirty-tracking backends this machine offers; and the test matrix's
``covers`` mark and ``--matrix-results`` option (tests/matrix_plugin.py)."""

import pytest

from .kernel_probe import kernel_dirty_tracking_unavailable_reason
from .matrix_plugin import pytest_addoption as pytest_addoption
from .matrix_plugin import pytest_collection_finish as pytest_collection_finish
from .matrix_plugin import pytest_collection_modifyitems as pytest_collection_modifyitems
from .matrix_plugin import pytest_configure as pytest_configure
from .matrix_plugin import pytest_runtest_makereport as pytest_runtest_makereport
from .matrix_plugin import pytest_sessionfinish as pytest_sessionfinish

# Decided by asking the kernel, not vmmpy (see kernel_probe.py): where the kernel offers the
# features, the kernel-backend tests run, and a broken backend fails them instead of skipping.
KERNEL_UNAVAILABLE = kernel_dirty_tracking_unavailable_reason()


@pytest.fixture(params=["soft", "kernel"])
def tracking(request) -> str:
    """Run a test once per dirty-tracking backend (kernel skipped, with the reason, where unavailable)."""
    if request.param == "kernel" and KERNEL_UNAVAILABLE:
        pytest.skip(f"kernel dirty tracking unavailable here: {KERNEL_UNAVAILABLE}")
    return request.param


@pytest.fixture
def guests():
    """Make fake migration guests (tests/migration_guest.py) that are closed after the test."""
    from .migration_guest import FakeGuest

    made = []

    def make(*args, **kwargs):
        guest = FakeGuest(*args, **kwargs)
        made.append(guest)
        return guest

    yield make
    for guest in made:
        guest.close()
