"""Shared test helpers: where the real workspaces live, and a marker for tests that need them."""

from pathlib import Path

import pytest

#: The shared data folder next to the repository (never copied into it).
SHARED = (Path(__file__).parents[1] / ".." / "shared" / "data" / "workspaces").resolve()
MISSING_SHARED = (
    "../shared/data/workspaces not found: real-workspace parity tests need the shared data folder"
)

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=MISSING_SHARED)


@pytest.fixture(scope="session")
def shared_workspaces() -> Path:
    """The real workspaces folder; skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(MISSING_SHARED)
    return SHARED
