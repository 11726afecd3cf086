"""Data sets the tests read from this machine: the Debian package's Fashion-MNIST.

``needs_data`` follows ``require_binary``'s rule (helpers/daemons.py): a test that needs the
data skips on a workstation without it and fails in CI, where a missing package would
otherwise pass by testing nothing."""

from __future__ import annotations

import pytest

from app.training.data import DataError, find_fashion_mnist
from helpers.daemons import in_ci


def have_fashion_mnist() -> bool:
    try:
        find_fashion_mnist()
    except DataError:
        return False
    return True


needs_data = pytest.mark.skipif(
    not have_fashion_mnist() and not in_ci(),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist); CI has it")
