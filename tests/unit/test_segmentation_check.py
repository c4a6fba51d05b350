"""The worker checks every lung segmentation for anatomical plausibility (models.plausibility) and says
when one fails: in the job's ``infer`` step, in a warning naming the job, and in
``cxrnode_lung_segmentations_total{plausibility}``. The results are still made and kept (nothing is
lost), so a person can look at what went wrong.

The real Pipeline and networks on the CPU, on a 512 x 512 DX from the repository's Montgomery case,
once as stored and once with its pixels inverted under a MONOCHROME2 header (a wrong header, the way
inverted polarity reaches a node: the segmentation then fails, as the stress test shows).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from node.archive import open_archive
from node.queue.db import Database
from node.settings import load_settings
from node.worker.pipeline import EncodedObject, Outcome, Pipeline
from node.worker.runner import InferenceWorker
from tests.dicom_factory import make_dx
from tests.unit.test_runner_faults import SEG_CLASS, queued_job, steps

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "tests" / "data" / "MCUCXR_0017_0.png"
METRIC = "cxrnode_lung_segmentations_total"


def counted(label: str) -> float:
    return REGISTRY.get_sample_value(METRIC, {"plausibility": label}) or 0.0


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    data_dir = tmp_path_factory.mktemp("var")
    return Pipeline.load(load_settings(REPO / "config" / "cxrnode.toml",
                                       env={"CXRNODE_NODE_DATA_DIR": str(data_dir), "CXRNODE_WORKER_DEVICE": "cpu"}))


def radiograph(tmp_path: Path, invert: bool) -> Path:
    pixels = np.asarray(Image.open(IMAGE).convert("L"))
    path = tmp_path / ("inverted.dcm" if invert else "dx.dcm")
    make_dx(255 - pixels if invert else pixels, size=(512, 512)).save_as(path, enforce_file_format=True)
    return path


def test_a_normal_radiograph_is_plausible(pipeline: Pipeline, tmp_path: Path) -> None:
    before = counted("plausible"), counted("implausible")
    outcome = pipeline.run(radiograph(tmp_path, invert=False))
    assert outcome.plausibility is not None and outcome.plausibility >= 0.9
    assert f"lung plausibility {outcome.plausibility:.3f};" in outcome.summary and "IMPLAUSIBLE" not in outcome.summary
    assert (counted("plausible"), counted("implausible")) == (before[0] + 1, before[1])


def test_an_inverted_radiograph_is_flagged_and_its_results_are_still_made(pipeline: Pipeline, tmp_path: Path) -> None:
    before = counted("plausible"), counted("implausible")
    outcome = pipeline.run(radiograph(tmp_path, invert=True))
    assert outcome.plausibility is not None and outcome.plausibility < 0.5
    assert f"lung plausibility {outcome.plausibility:.3f} < 0.5: IMPLAUSIBLE, check the overlay" in outcome.summary
    assert (counted("plausible"), counted("implausible")) == (before[0], before[1] + 1)
    assert {r.kind for r in outcome.results} >= {"seg", "sr"}  # made and kept for a person to look at


class _Flagged:
    """A stand-in pipeline whose segmentation failed the check (the networks are tested above)."""

    def run(self, path: Path) -> Outcome:
        return Outcome((EncodedObject("seg", SEG_CLASS, "1.2.9.1.1", b"seg bytes"),), tb_score=0.9,
                       summary="TB score 0.900 (threshold 0.500); lung plausibility 0.020 < 0.5: IMPLAUSIBLE",
                       plausibility=0.02)


def test_the_worker_warns_with_the_job_and_records_the_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')
    settings = load_settings(config, env={})
    db = Database.for_settings(settings)
    try:
        archive = open_archive(settings)
        job_id = queued_job(db, archive)
        worker = InferenceWorker(settings, db, archive, _Flagged(), threading.Event())  # type: ignore[arg-type]
        caplog.set_level(logging.WARNING, logger="node.worker.runner")
        assert worker.run_once() is True
        assert f"job {job_id}: implausible lung segmentation (plausibility 0.020 < 0.5)" in caplog.text
        assert ("infer", "ok", "TB score 0.900 (threshold 0.500); lung plausibility 0.020 < 0.5: IMPLAUSIBLE") \
            in steps(db, job_id)
    finally:
        db.dispose()
