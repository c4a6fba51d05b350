"""The GPU data pack reproduces the network inputs of the original folder exactly."""

from __future__ import annotations

import numpy as np
import pytest

from models import data
from models.training.pack import pack


def test_pack_gives_identical_network_inputs(fixture_dir, tmp_path):
    from models.training.common import load_arrays

    assert pack(fixture_dir, tmp_path / "p", 128) == 6
    a, b = load_arrays(fixture_dir, None, 128), load_arrays(tmp_path / "p", None, 128)
    np.testing.assert_allclose(a.images, b.images, atol=1e-6)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert data.load_image(tmp_path / "p" / "images" / "MCUCXR_0017_0.png").shape == (128, 128)


def test_pack_refuses_inexact_size(fixture_dir, tmp_path):
    with pytest.raises(ValueError, match="cannot be packed exactly"):
        pack(fixture_dir, tmp_path / "p", 100)
