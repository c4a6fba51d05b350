"""The worker checks every lung segmentation for anatomical plausibility (models.plausibility) and says
when one fails: to the radiologist in the SR (the TB score's Comment goes on with "Quality check: ...",
the one Comment OHIF v3 shows, tests/viewer/test_ohif_quality_check.py) and in the burned-in
caption of the SC and of the admin preview (an amber line), and to the admin in the job's ``infer``
step, in a warning naming the job, and in ``cxrnode_lung_segmentations_total{plausibility}``. The
results are still made and kept (nothing is lost), so a person can look at what went wrong.

The real Pipeline and networks on the CPU, on a 512 x 512 DX from the repository's Montgomery case,
once as stored and once with its pixels inverted under a MONOCHROME2 header (a wrong header, the way
inverted polarity reaches a node: the segmentation then fails, as the stress test shows).
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from node.archive import open_archive
from node.queue.db import Database
from node.results.preview import result_preview
from node.settings import load_settings
from node.worker.pipeline import EncodedObject, Outcome, Pipeline
from node.worker.runner import InferenceWorker
from tests.dicom_factory import make_dx
from tests.unit.test_results import find_items
from tests.unit.test_runner_faults import SEG_CLASS, queued_job, steps
from tests.validation import dciodvfy_errors

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "tests" / "data" / "MCUCXR_0017_0.png"
METRIC = "cxrnode_lung_segmentations_total"


def counted(label: str) -> float:
    return REGISTRY.get_sample_value(METRIC, {"plausibility": label}) or 0.0


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    folder = tmp_path_factory.mktemp("node")
    config = folder / "cxrnode.toml"
    config.write_text(f'[node]\ndata_dir = "{folder / "var"}"\n[worker]\ndevice = "cpu"\n'
                      '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n'
                      'outputs = ["seg", "sr", "sc"]\n')
    return Pipeline.load(load_settings(config, env={}))


def radiograph(tmp_path: Path, invert: bool) -> Path:
    pixels = np.asarray(Image.open(IMAGE).convert("L"))
    path = tmp_path / ("inverted.dcm" if invert else "dx.dcm")
    make_dx(255 - pixels if invert else pixels, size=(512, 512)).save_as(path, enforce_file_format=True)
    return path


def comments(outcome: Outcome) -> list[str]:
    sr = pydicom.dcmread(io.BytesIO(outcome.result("sr").data))
    return [str(item.TextValue) for item in find_items(sr, "121106")]  # DCM Comment


def amber(picture: np.ndarray, band: int) -> int:
    """Pixels of the caption band drawn in the warning's amber (255, 191, 0)."""
    rgb = picture[:band].astype(int)
    return int(((rgb[..., 0] > 220) & (rgb[..., 1] > 150) & (rgb[..., 1] < 225) & (rgb[..., 2] < 70)).sum())


def pictures(outcome: Outcome, source: Path, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The SC's pixels and the admin preview of the source with the SEG and SR, as RGB arrays."""
    sc = pydicom.dcmread(io.BytesIO(outcome.result("sc").data)).pixel_array
    paths = {}
    for kind in ("seg", "sr"):
        paths[kind] = tmp_path / f"{kind}.dcm"
        paths[kind].write_bytes(outcome.result(kind).data)
    preview = np.asarray(result_preview(source, paths["seg"], paths["sr"]).convert("RGB"))
    return sc, preview


def test_a_normal_radiograph_is_plausible(pipeline: Pipeline, tmp_path: Path) -> None:
    before = counted("plausible"), counted("implausible")
    source = radiograph(tmp_path, invert=False)
    outcome = pipeline.run(source)
    assert outcome.plausibility is not None and outcome.plausibility >= 0.9
    assert f"lung plausibility {outcome.plausibility:.3f};" in outcome.summary and "IMPLAUSIBLE" not in outcome.summary
    assert (counted("plausible"), counted("implausible")) == (before[0] + 1, before[1])
    assert not [c for c in comments(outcome) if "Quality check" in c]
    for picture in pictures(outcome, source, tmp_path):
        assert amber(picture, picture.shape[0] - picture.shape[1]) == 0  # no warning line in the caption


def test_an_inverted_radiograph_is_flagged_and_its_results_are_still_made(pipeline: Pipeline, tmp_path: Path) -> None:
    before = counted("plausible"), counted("implausible")
    source = radiograph(tmp_path, invert=True)
    outcome = pipeline.run(source)
    assert outcome.plausibility is not None and outcome.plausibility < 0.5
    assert f"lung plausibility {outcome.plausibility:.3f} < 0.5: IMPLAUSIBLE, check the overlay" in outcome.summary
    assert (counted("plausible"), counted("implausible")) == (before[0], before[1] + 1)
    assert {r.kind for r in outcome.results} == {"seg", "sr", "sc"}  # made and kept for a person to look at
    # the radiologist is told, in the SR's TB score Comment (after the score) and burned into the pictures
    warning = (f"Quality check: lung segmentation implausible (plausibility {outcome.plausibility:.2f} < 0.5: a lung "
               "missing, much smaller than the other, fragmented or misplaced): check the lung outlines before "
               "relying on them or on the TB score")
    (tb_comment,) = [c for c in comments(outcome) if c.startswith("TB score ")]
    assert tb_comment.endswith((f"): Abnormal. {warning}", f"): Normal. {warning}")), tb_comment
    assert [c for c in comments(outcome) if "Quality check" in c] == [tb_comment]  # said once
    assert dciodvfy_errors(outcome.result("sr").data) == []
    for picture in pictures(outcome, source, tmp_path):
        assert amber(picture, picture.shape[0] - picture.shape[1]) > 200  # the warning, in amber, in the caption


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
