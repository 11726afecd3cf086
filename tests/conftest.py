"""Shared fixtures. What tests import lives in tests/helpers/ (images, models, settings, apps,
daemons, waits); this file holds fixtures only."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

# Re-exported for the test files that still write `from conftest import ...`; new code imports
# from helpers.images and helpers.models.
from helpers.images import png_bytes
from helpers.models import LABELS, make_model_dir
from helpers.settings import make_settings

from app.settings import Settings

__all__ = ["LABELS", "make_model_dir", "png_bytes"]

# The app serves gRPC on IMGREC_GRPC_PORT (default 8001): tests never listen on a fixed port,
# so every `imgrec serve` a test starts has gRPC off unless the test gives it a free port
# (make_settings does the same for in-process apps; tests/api/test_oip.py turns it on).
os.environ.setdefault("IMGREC_GRPC_PORT", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight `fashion-small` model directory (10 Fashion-MNIST labels)."""
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def served_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its inference graph (model.onnx), as `imgrec export` leaves a
    directory: what a CPU server is given in production. An app of it starts in milliseconds;
    one of tiny_model_dir exports the graph first (seconds; tests/nn/test_graph.py tests that)."""
    from app.nn.export import export_model_dir

    served = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("models") / "served"))
    export_model_dir(served)
    return served


@pytest.fixture(scope="session")
def calibrated_model_dir(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                         ) -> Path:
    """The served tiny model after `imgrec calibrate` (temperature, unknown threshold, class
    map baseline), fitted on seeded random pictures: a second or two."""
    from helpers.models import calibrate_tiny

    return calibrate_tiny(Path(shutil.copytree(
        served_model_dir, tmp_path_factory.mktemp("models") / "calibrated")))


@pytest.fixture()
def tiny_settings(served_model_dir: Path, tmp_path: Path) -> Callable[..., Settings]:
    """make_settings for the served tiny model and this test's tmp_path, as in
    ``create_app(tiny_settings(max_queue=2))``."""
    return partial(make_settings, served_model_dir, tmp_path)
