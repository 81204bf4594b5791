"""Shared fixtures. Real data lives in ../shared/data beside the checkout; tests that need it skip without it."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip that says why."""
    if not (SHARED_DATA / "wbcatt").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it sits beside the checkout in CI; see README)")
    return SHARED_DATA
