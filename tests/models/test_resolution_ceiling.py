"""The resolution audit: what a network size costs a perfect segmenter, on the fixture's real masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models import data
from models.experiments import resolution_ceiling


def test_the_ceiling_falls_with_the_network_size(real_masks):
    masks = [("fixture", m) for m in real_masks]
    side = real_masks[0].shape[0]
    full = resolution_ceiling.ceiling(masks, side)  # no resampling: the reference itself
    assert full["all"]["dice_mean"] == full["all"]["dice_min"] == 1.0
    coarse, fine = resolution_ceiling.ceiling(masks, side // 8), resolution_ceiling.ceiling(masks, side // 2)
    assert coarse["all"]["dice_mean"] < fine["all"]["dice_mean"] < 1.0
    assert coarse["all"]["n"] == fine["all"]["n"] == len(masks) == fine["fixture"]["n"]
    # a checkerboard finer than a network pixel loses far more than lungs do: the audit measures geometry
    board = np.kron(np.indices((64, 64)).sum(0) % 2, np.ones((side // 64, side // 64))).astype(bool)
    assert resolution_ceiling.ceiling([("board", board)], side // 8)["all"]["dice_mean"] < 0.8 < coarse["all"]["dice_min"]
    with pytest.raises(ValueError, match="at least 8"):
        resolution_ceiling.ceiling(masks, 4)


def test_the_command_reports_each_size_and_source(fixture_dir, capsys):
    assert resolution_ceiling.main(["--data", str(fixture_dir), "--split", "val", "--sizes", "16,128", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    sources = {c.source for c in data.read_index(fixture_dir, "val") if c.mask_path is not None}
    assert set(result["sizes"]) == {"16", "128"}
    assert set(result["sizes"]["128"]) == {"all", *sources}
    assert result["sizes"]["16"]["all"]["dice_mean"] < result["sizes"]["128"]["all"]["dice_mean"]
    assert resolution_ceiling.main(["--data", str(fixture_dir), "--split", "train"]) == 2  # no such split
    assert "resolution_ceiling: error: " in capsys.readouterr().err
    assert resolution_ceiling.main(["--data", str(fixture_dir), "--sizes", "4"]) == 2
    assert "at least 8" in capsys.readouterr().err
