from pathlib import Path

import os

import pytest
import torch

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture
def reference() -> Path:
    if not REFERENCE.is_dir():
        if os.environ.get("CI"):  # CI has shared/ beside the clone: never skip these there
            pytest.fail(f"reference numbers not found at {REFERENCE}")
        pytest.skip(f"reference numbers not found at {REFERENCE}")
    return REFERENCE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
