"""The closed loop's last step, for real: a model promoted with the CLI while the node serves is the
one that analyses the next radiograph (its SEG and SR in Orthanc name it), and a rollback restores
the previous one, without restarting the node.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from models import registry
from tests.dicom_factory import make_dx, new_instance
from tests.models.catalog_helpers import (
    clone_version,
    later_version,
    shipped_ref,
    shipped_version,
    small_reference_set,
)
from tests.servers import (
    NodeProcess,
    Orthanc,
    c_store,
    orthanc_and_node,
    wait_until,
)
from tests.unit.test_results import find_items

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "tests" / "data" / "MCUCXR_0017_0.png"
RESULT_TIMEOUT_S = 240
SHA = registry.read_meta("lung-unet")["sha256"]
UNET, TB = shipped_ref("lung-unet"), shipped_ref("tb-scorer")


def sr_versions(*versions: str) -> str:
    """The SR's algorithm versions as :func:`send_radiograph` gives them: distinct, sorted, joined."""
    return ",".join(sorted(set(versions)))


def results_in_pacs(orthanc: Orthanc, study_uid: str) -> tuple[hd.seg.Segmentation, pydicom.Dataset]:
    (seg_series,), (sr_series,) = orthanc.wait_for_result_series(study_uid, RESULT_TIMEOUT_S)
    (seg,), (sr,) = orthanc.instance_files(seg_series), orthanc.instance_files(sr_series)
    return hd.seg.segread(io.BytesIO(seg)), pydicom.dcmread(io.BytesIO(sr))


def send_radiograph(node: NodeProcess, orthanc: Orthanc, tmp_path: Path, name: str) -> tuple[str, str]:
    """A new DX through the node; (segmenter version in its SEG, the SR's algorithm versions)."""
    ds = new_instance(make_dx(IMAGE, size=(1024, 1024)))
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    orthanc.upload(path)
    assert c_store(node.port, [ds]) == [0]
    seg, sr = results_in_pacs(orthanc, ds.StudyInstanceUID)
    algorithm = seg.get_segment_description(1).algorithm_identification[0]
    assert algorithm.AlgorithmName == "cxrnode-lung-unet"
    assert algorithm.AlgorithmParameters == f"weights_sha256={SHA}"
    assert f"weights_sha256={SHA}" in {i.TextValue for i in find_items(sr, "111002")}
    return str(algorithm.AlgorithmVersion), sr_versions(*(i.TextValue for i in find_items(sr, "111003")))


def test_promote_and_roll_back_while_the_node_serves(tmp_path: Path) -> None:
    with orthanc_and_node(tmp_path) as (orthanc, node):
        shipped, tb = shipped_version("lung-unet"), shipped_version("tb-scorer")
        assert send_radiograph(node, orthanc, tmp_path, "before") == (shipped, sr_versions(shipped, tb))

        # a retrained model arrives (here: the shipped weights under a new version) and passes the gate
        retrained = later_version("lung-unet")
        run = clone_version("lung-unet", retrained, tmp_path / "run")
        registered = node.cli("models", "register", str(run), "lung-unet")
        assert registered.returncode == 0, registered.stderr
        reference = small_reference_set(tmp_path / "reference")  # 4 fixture cases: the gate's reference set
        promoted = node.cli("models", "promote", f"lung-unet@{retrained}", "--data", str(reference), "--device", "cpu",
                            "--why", "e2e: retrained", "--by", "e2e")
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        assert "gate: passed" in promoted.stdout
        assert f"segmenter: now lung-unet@{retrained} (was {UNET})" in promoted.stdout

        assert send_radiograph(node, orthanc, tmp_path, "promoted") == (retrained, sr_versions(retrained, tb))
        assert f"models: now lung-unet@{retrained} (was {UNET})".encode() in node.log_bytes()
        listed = node.cli("models", "list", "--json")
        assert {e["ref"] for e in json.loads(listed.stdout) if e["in_service"]} == {f"lung-unet@{retrained}", TB}

        rolled = node.cli("models", "rollback", "segmenter", "--why", "e2e: back", "--by", "e2e")
        assert rolled.returncode == 0, rolled.stderr
        assert send_radiograph(node, orthanc, tmp_path, "rolled-back") == (shipped, sr_versions(shipped, tb))
        assert f"models: now {UNET} (was lung-unet@{retrained})".encode() in node.log_bytes()

        def all_done() -> bool:
            jobs = json.loads(node.cli("jobs", "list", "--json").stdout)
            return len(jobs) == 3 and {j["status"] for j in jobs} == {"done"}

        wait_until(all_done, 60, interval_s=1, what="three jobs done")  # no job lost to a switch