"""Property: the worker's loader never crashes on damaged input (hypothesis, no network).

For any mutant of a valid radiograph (:mod:`tests.robustness.mutations`), written to a file:
``pipeline.load`` returns a dataset or raises :class:`RejectedInput`; ``rejection_reason``
returns None or a reason and never raises; ``display_pixels`` returns a finite float32
(Rows, Columns) image in [0, 1] or raises :class:`UnreadablePixels`; the spacing and
orientation readers never raise. So every job ends processed or discarded with a reason.

Examples are derandomized (CI is reproducible) with a per-example deadline; a hang beyond
:data:`HANG_S` dumps every thread's stack and ends the run instead of blocking CI.
"""

from __future__ import annotations

import faulthandler
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings

from node.errors import RejectedInput
from node.imaging import (
    PixelSpacing,
    UnreadablePixels,
    display_pixels,
    patient_left_on_image_right,
    pixel_spacing_mm,
)
from node.settings import AcceptanceSettings
from node.worker.pipeline import load
from node.worker.selection import rejection_reason
from tests.robustness.mutations import Mutant, mutants

pytestmark = pytest.mark.filterwarnings("ignore")

HANG_S = 60
RULES = AcceptanceSettings()
PROPERTY = settings(derandomize=True, deadline=3000, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_loader(path: Path, mutant: Mutant) -> None:
    path.write_bytes(mutant.file_bytes())
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        try:
            ds = load(path)
        except RejectedInput as exc:
            event("load: rejected")
            assert str(exc).startswith("cannot read the archived object")
            assert not mutant.is_unchanged
            return
        reason = rejection_reason(ds, RULES)
        assert reason is None or (isinstance(reason, str) and reason)
        try:
            pixels = display_pixels(ds)
        except UnreadablePixels as exc:
            event("pixels: unreadable")
            assert str(exc)
            assert not mutant.is_unchanged
        else:
            event("pixels: read")
            assert pixels.dtype == np.float32
            assert pixels.shape == (int(ds.Rows), int(ds.Columns))
            assert np.isfinite(pixels).all()
            assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
        spacing = pixel_spacing_mm(ds)
        assert spacing is None or (isinstance(spacing, PixelSpacing)
                                   and math.isfinite(spacing.pixel_area_mm2))
        assert patient_left_on_image_right(ds) in (True, False)
        if mutant.is_unchanged:
            assert reason is None or "ViewPosition" not in reason
    finally:
        faulthandler.cancel_dump_traceback_later()


@settings(PROPERTY, max_examples=450)
@given(mutant=mutants(with_bytes=False))
def test_loader_survives_element_mutations(tmp_path_factory: pytest.TempPathFactory,
                                           mutant: Mutant) -> None:
    check_loader(tmp_path_factory.getbasetemp() / "element-mutant.dcm", mutant)


@settings(PROPERTY, max_examples=350)
@given(mutant=mutants(with_bytes=True))
def test_loader_survives_byte_mutations(tmp_path_factory: pytest.TempPathFactory,
                                        mutant: Mutant) -> None:
    check_loader(tmp_path_factory.getbasetemp() / "byte-mutant.dcm", mutant)
