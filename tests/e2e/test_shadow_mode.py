"""Shadow mode, for real: a shadow set with the CLI while the node serves runs on the next radiograph
and is recorded (``shadow-report``), while Orthanc receives only the champion's SEG and SR.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from tests.dicom_factory import make_dx, new_instance
from tests.models.catalog_helpers import degraded_segmenter, shipped_version
from tests.servers import (
    c_store,
    orthanc_and_node,
    wait_until,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "tests" / "data" / "MCUCXR_0017_0.png"
RESULT_TIMEOUT_S = 240
DEGRADED = "lung-unet@1.0.1-degraded"


def test_a_shadow_set_while_the_node_serves_is_recorded_and_never_sent(tmp_path: Path) -> None:
    with orthanc_and_node(tmp_path) as (orthanc, node):
        degraded_segmenter(tmp_path / "run")
        registered = node.cli("models", "register", str(tmp_path / "run"), "lung-unet")
        assert registered.returncode == 0, registered.stderr
        shadowed = node.cli("models", "shadow", DEGRADED, "--why", "e2e: watch it", "--by", "e2e")
        assert shadowed.returncode == 0, shadowed.stderr
        assert f"segmenter: shadow {DEGRADED} (was none)" in shadowed.stdout
        listed = json.loads(node.cli("models", "list", "--json").stdout)
        assert {e["ref"]: (e["in_service"], e["shadow"]) for e in listed}[DEGRADED] == (False, True)

        ds = new_instance(make_dx(IMAGE, size=(1024, 1024)))
        path = tmp_path / "dx.dcm"
        ds.save_as(path, enforce_file_format=True)
        orthanc.upload(path)
        assert c_store(node.port, [ds]) == [0]

        def report() -> dict | None:
            done = node.cli("models", "shadow-report", "--since", "1h", "--json")
            assert done.returncode == 0, done.stderr
            groups = json.loads(done.stdout)["shadows"]
            return groups[0] if groups else None

        group = wait_until(report, RESULT_TIMEOUT_S, interval_s=1, what="a shadow row")
        assert group["shadow_ref"] == DEGRADED and group["jobs_compared"] == 1 and group["errors"] == 0
        assert 0.5 < group["dice_mean"] < 1.0

        def job_done() -> dict | None:
            jobs = json.loads(node.cli("jobs", "list", "--json").stdout)
            return jobs[0] if len(jobs) == 1 and jobs[0]["status"] == "done" else None

        job = wait_until(job_done, RESULT_TIMEOUT_S, interval_s=1, what="the job done")
        assert group["dice_lowest_jobs"] == [job["id"]]
        study = str(ds.StudyInstanceUID)
        series = orthanc.get(f"/studies/{orthanc.find('Study', {'StudyInstanceUID': study})[0]}/series")
        assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["DX", "SEG", "SR"]
        (seg_series,), (sr_series,) = orthanc.series_of_study(study, "SEG"), orthanc.series_of_study(study, "SR")
        (seg,), (sr,) = orthanc.instance_files(seg_series), orthanc.instance_files(sr_series)  # exactly one each
        algorithm = hd.seg.segread(io.BytesIO(seg)).get_segment_description(1).algorithm_identification[0]
        assert algorithm.AlgorithmVersion == shipped_version("lung-unet")  # the champion's, not the shadow's
        assert b"1.0.1-degraded" not in sr and pydicom.dcmread(io.BytesIO(sr)).Modality == "SR"
        assert b"models: " in node.log_bytes() and f"{DEGRADED} runs in shadow".encode() in node.log_bytes()