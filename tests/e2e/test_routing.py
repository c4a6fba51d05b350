"""Routing from a real PACS: Orthanc's Lua ``OnStoredInstance`` rule forwards what it stores to a
real node, and the node's results come back into the study that was routed.

Two Orthancs share one node, each getting back only its own studies (``reply_to_caller``):

- PACS A runs the naive rule an admin writes first, "route everything" (no origin filter), so
  the CT, the old report and the node's own SEG and SR are forwarded to the node too;
- PACS B runs the rule the project ships, ``deploy/orthanc/route-to-cxrnode.lua``, loaded
  verbatim with the DICOM settings of ``deploy/orthanc/orthanc.json``.

One mixed delivery is stored into each PACS by a modality over DICOM: the NEMA chest CR (JPEG
2000), a DX PA with its lateral and an old report in one study, a chest film stored as Secondary
Capture with Modality DX, and a CT slice. Nothing here uses Orthanc's REST API to route or the
node's sender to deliver the sources.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from tests.dicom_factory import (
    make_ct_slice,
    make_dx,
    make_secondary_capture_film,
    make_text_report,
    nema_chest_cr_path,
)
from tests.servers import REPO, NodeProcess, Orthanc, c_store, free_port, wait_until
from tests.validation import dciodvfy_errors

pytestmark = pytest.mark.e2e

DATA = Path(__file__).resolve().parents[1] / "data"
DEPLOY = REPO / "deploy" / "orthanc"
ROUTE_EVERYTHING = "function OnStoredInstance(instanceId)\n  SendToModality(instanceId, 'cxrnode')\nend\n"
TIMEOUT_S = 300


def pacs_with_rule(work: Path, aet: str, lua: Path, node_port: int) -> Orthanc:
    """An Orthanc with the shipped DICOM settings, the node as modality ``cxrnode`` and ``lua``."""
    shipped = json.loads((DEPLOY / "orthanc.json").read_text())
    modalities = {name: {"AET": aet_, "Host": "127.0.0.1", "Port": node_port}
                  for name, (aet_, _host, _port) in shipped["DicomModalities"].items()}
    modalities["modality"] = {"AET": "MODALITY", "Host": "127.0.0.1", "Port": free_port()}
    return Orthanc(work, free_port(), free_port(), aet=aet, modalities=modalities, extra_config={
        "LuaScripts": [str(lua)],
        "JobsHistorySize": shipped["JobsHistorySize"],
        "DicomAlwaysAllowStore": shipped["DicomAlwaysAllowStore"],
        "DicomCheckModalityHost": shipped["DicomCheckModalityHost"],
    })


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("routing")
    naive_rule = work / "route-everything.lua"
    naive_rule.write_text(ROUTE_EVERYTHING)
    node_port = free_port()
    pacs_a = pacs_with_rule(work / "pacs_a", "PACSA", naive_rule, node_port)
    pacs_b = pacs_with_rule(work / "pacs_b", "PACSB", DEPLOY / "route-to-cxrnode.lua", node_port)
    node = NodeProcess(work / "node", node_port, destinations=[
        {"name": "pacs_a", "ae_title": "PACSA", "host": "127.0.0.1", "port": pacs_a.dicom_port,
         "reply_to_caller": True},
        {"name": "pacs_b", "ae_title": "PACSB", "host": "127.0.0.1", "port": pacs_b.dicom_port,
         "reply_to_caller": True}])
    try:
        pacs_a.start()
        pacs_b.start()
        node.start()
        yield pacs_a, pacs_b, node
    finally:
        if node.proc is not None:
            node.stop()
        pacs_a.stop()
        pacs_b.stop()


def mixed_delivery() -> dict[str, Dataset]:
    """Six objects, as a modality and a "route the whole study" rule deliver them."""
    nema = dcmread(nema_chest_cr_path())
    nema.StudyInstanceUID, nema.SeriesInstanceUID = generate_uid(), generate_uid()
    nema.SOPInstanceUID = nema.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    study = generate_uid()
    lateral = make_dx(DATA / "MCUCXR_0017_0.png", size=(1024, 1024), study_instance_uid=study,
                      view_position="LL", patient_orientation=("P", "F"))
    return {
        "nema_cr": nema,
        "dx_pa": make_dx(DATA / "MCUCXR_0017_0.png", size=(1024, 1024), study_instance_uid=study),
        "dx_lateral": lateral,
        "old_report": make_text_report(study),
        "sc_film": make_secondary_capture_film(DATA / "MCUCXR_0017_0.png"),
        "ct": make_ct_slice(),
    }


def store_as_modality(pacs: Orthanc, objects: dict[str, Dataset]) -> None:
    """C-STORE ``objects`` into ``pacs`` in one association, as the X-ray room would."""
    statuses = c_store(pacs.dicom_port, list(objects.values()), calling="MODALITY", called=pacs.aet)
    assert statuses == [0x0000] * len(objects), dict(zip(objects, statuses or []))


def node_jobs(node: NodeProcess) -> dict[str, dict]:
    listing = node.cli("jobs", "list", "--limit", "1000", "--json")
    assert listing.returncode == 0, listing.stderr
    return {j["sop_instance_uid"]: j for j in json.loads(listing.stdout)}


def results_in(pacs: Orthanc, study_uid: str) -> list[Dataset]:
    """Every SEG and SR instance ``pacs`` holds for ``study_uid``."""
    found = []
    for modality in ("SEG", "SR"):
        for series in pacs.series_of_study(study_uid, modality):
            found += [dcmread(io.BytesIO(b)) for b in pacs.instance_files(series)]
    return [ds for ds in found if ds.get("Manufacturer") == "cxrnode"]


def routing_jobs(pacs: Orthanc) -> list[dict]:
    """Orthanc's jobs (its Lua SendToModality calls), once none is pending or running."""
    def settled() -> list[dict] | None:
        jobs = pacs.get("/jobs?expand")
        return None if any(j["State"] in ("Pending", "Running", "Retry") for j in jobs) else jobs
    return wait_until(settled, TIMEOUT_S, what="Orthanc's routing jobs finished")


def failed_sends(pacs: Orthanc) -> list[str]:
    """The PACS's own record of routes that failed. Orthanc's Lua job reports Success even when
    its sends fail (measured with a peer refusing the CT context); only its log says
    'Lua: Unable to send instance ... to modality'."""
    log = (pacs.workdir / "orthanc.log").read_text(errors="replace")
    return [line for line in log.splitlines() if "Unable to send" in line]


def deliver_and_settle(pacs: Orthanc, node: NodeProcess, expect_own_back: bool):
    objects = mixed_delivery()
    frontal = [objects[k] for k in ("nema_cr", "dx_pa", "sc_film")]
    store_as_modality(pacs, objects)

    def all_results_filed() -> bool:
        return all(len(results_in(pacs, ds.StudyInstanceUID)) >= 2 for ds in frontal)
    wait_until(all_results_filed, TIMEOUT_S, interval_s=1, what="SEG + SR for the three frontal films")
    own = [r.SOPInstanceUID for ds in frontal for r in results_in(pacs, ds.StudyInstanceUID)]

    def settled() -> dict[str, dict] | None:
        jobs = node_jobs(node)
        waiting = [j for j in jobs.values() if j["status"] not in ("done", "discarded", "failed")]
        own_back = all(uid in jobs for uid in own) if expect_own_back else True
        return jobs if own_back and not waiting else None
    wait_until(settled, TIMEOUT_S, interval_s=1, what="the node's jobs settled")
    time.sleep(2)  # anything still in flight from the PACS would arrive now
    jobs, orthanc_jobs = node_jobs(node), routing_jobs(pacs)
    mine = [jobs[ds.SOPInstanceUID] for ds in objects.values() if ds.SOPInstanceUID in jobs]
    mine += [jobs[uid] for uid in own if uid in jobs]
    print(f"{pacs.aet}: {len(objects)} objects stored; Orthanc routing jobs "
          f"{dict(Counter(j['State'] for j in orthanc_jobs))}; node jobs {dict(Counter(j['status'] for j in mine))}; "
          f"results in the PACS {sum(len(results_in(pacs, ds.StudyInstanceUID)) for ds in frontal)}")
    for job in mine:
        print(f"  {job['status']:9} {job.get('discard_reason') or ''}")
    return objects, frontal, own, jobs, orthanc_jobs


def assert_results(pacs: Orthanc, frontal: list[Dataset]) -> None:
    """Exactly one SEG and one SR per frontal film, filed in its study, dciodvfy-clean."""
    for ds in frontal:
        results = results_in(pacs, ds.StudyInstanceUID)
        assert Counter(r.Modality for r in results) == {"SEG": 1, "SR": 1}, ds.SOPClassUID.name
        for result in results:
            assert result.StudyInstanceUID == ds.StudyInstanceUID
            buffer = io.BytesIO()
            result.save_as(buffer, enforce_file_format=True)
            assert dciodvfy_errors(buffer.getvalue()) == [], (ds.SOPClassUID.name, result.Modality)


def assert_study_level(pacs: Orthanc, objects: dict[str, Dataset], jobs: dict[str, dict]) -> None:
    """The PA, lateral and old report share a study: results for the PA only, the rest explained."""
    study = objects["dx_pa"].StudyInstanceUID
    instances = pacs.find("Instance", {"StudyInstanceUID": study})
    assert len(instances) == 5  # PA, lateral, report, SEG, SR
    referenced = {r.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
                  for r in results_in(pacs, study) if r.Modality == "SEG"}
    assert referenced == {objects["dx_pa"].SOPInstanceUID}
    lateral = jobs[objects["dx_lateral"].SOPInstanceUID]
    assert lateral["status"] == "discarded" and "LL" in lateral["discard_reason"], lateral


def test_naive_route_everything_rule(site) -> None:
    """PACS A forwards everything, results included: no failed send, no loop, every object explained."""
    pacs_a, pacs_b, node = site
    objects, frontal, own, jobs, _ = deliver_and_settle(pacs_a, node, expect_own_back=True)

    assert failed_sends(pacs_a) == []
    assert_results(pacs_a, frontal)
    for ds in frontal:
        assert jobs[ds.SOPInstanceUID]["status"] == "done"
    assert_study_level(pacs_a, objects, jobs)
    for name in ("ct", "old_report"):
        job = jobs[objects[name].SOPInstanceUID]
        assert job["status"] == "discarded" and "bytes not kept" in job["discard_reason"], (name, job)
    assert "CT Image Storage" in jobs[objects["ct"].SOPInstanceUID]["discard_reason"]
    assert len(own) == 6
    for uid in own:  # routed back by the rule, recognised and dropped
        assert jobs[uid]["status"] == "discarded" and "made by this node" in jobs[uid]["discard_reason"]
    # reply_to_caller: PACS B never received PACS A's results
    for ds in frontal:
        assert pacs_b.find("Study", {"StudyInstanceUID": ds.StudyInstanceUID}) == []


def test_shipped_orthanc_rule(site) -> None:
    """PACS B runs deploy/orthanc's rule: only CR/DX (and DX films stored as SC) reach the node,
    and the node's results are never routed back."""
    pacs_a, pacs_b, node = site
    before = set(node_jobs(node))
    objects, frontal, own, jobs, _ = deliver_and_settle(pacs_b, node, expect_own_back=False)

    assert failed_sends(pacs_b) == []
    assert b"cxrnode routing rule loaded" in (pacs_b.workdir / "orthanc.log").read_bytes()
    assert_results(pacs_b, frontal)
    assert_study_level(pacs_b, objects, jobs)
    received = set(jobs) - before
    routed = {objects[k].SOPInstanceUID for k in ("nema_cr", "dx_pa", "dx_lateral", "sc_film")}
    assert received == routed  # no CT, no report, none of the node's own results
    assert not set(own) & set(jobs)
    for ds in frontal:
        assert pacs_a.find("Study", {"StudyInstanceUID": ds.StudyInstanceUID}) == []
