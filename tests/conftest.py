from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
REPO = TESTS.parent
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def tiny_package_dir(tmp_path_factory) -> Path:
    """A real (tiny) model package; copy it before changing anything inside."""
    from tiny_package import build_tiny_package

    return build_tiny_package(tmp_path_factory.mktemp("pkg") / "model")


def require_data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    return path
