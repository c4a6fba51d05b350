"""The pipeline's orientation handling: the networks always see the standard view (patient's left on
the image's right), and the masks land back on the stored pixel grid with the right labels."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from models.identity import ModelIdentity
from models.inference import LungAnalysis
from node.worker.pipeline import patient_sides, standard_view

IDENTITY = ModelIdentity("test", "0", "0" * 64)


def header(orientation: list[str] | None) -> Dataset:
    ds = Dataset()
    if orientation is not None:
        ds.PatientOrientation = orientation
    return ds


def analysis_of(view: np.ndarray) -> LungAnalysis:
    """What a segmenter would say about ``view``: the lung on each image half (a stand-in for the network)."""
    lung = view > 0
    middle = view.shape[1] // 2
    image_left, image_right = lung.copy(), lung.copy()
    image_left[:, middle:], image_right[:, :middle] = False, False
    return LungAnalysis(lung_mask=lung, image_left=image_left, image_right=image_right, tb_score=0.1,
                        segmenter=IDENTITY, tb_model=IDENTITY)


@pytest.mark.parametrize(("orientation", "mirrored"), [(["L", "F"], False), (None, False), (["R", "F"], True),
                                                        (["RH", "F"], True), (["P", "F"], False)])
def test_networks_see_the_standard_view_and_masks_return_to_the_stored_grid(orientation, mirrored) -> None:
    # Stored pixels: the patient's left lung (value 2) on the image's right, or on its left if mirrored.
    standard = np.zeros((8, 10), dtype=np.uint8)
    standard[2:6, 6:9] = 2  # patient's left lung, standard view
    standard[2:6, 1:4] = 1  # patient's right lung
    stored = standard[:, ::-1] if mirrored else standard
    ds = header(orientation)

    view = standard_view(ds, stored)
    assert np.array_equal(view, standard)  # what the networks get, whatever the stored layout
    left, right = patient_sides(ds, analysis_of(view))
    assert np.array_equal(left, stored == 2) and np.array_equal(right, stored == 1)
    assert left.flags.c_contiguous and right.flags.c_contiguous
