"""Shared fixtures for the models tests: the committed six-case fixture folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def real_masks() -> list[np.ndarray]:
    from models import data

    return [data.load_mask(c.mask_path) for c in data.read_index(FIXTURES) if c.mask_path is not None]
