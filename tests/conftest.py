"""Shared fixtures: where the real frames live, and skipping rules for them."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """Path of a real data set in ../shared/data; skip the test only when it is absent outside CI."""
    path = SHARED_DATA / name
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI run without {path}: ../shared must sit beside the clone")
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture
def shared_data():
    return shared_dataset
