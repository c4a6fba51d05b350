"""The listener against real pynetdicom and dcmtk peers on loopback (no models involved)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import BasicTextSRStorage, CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.archive import open_archive
from node.dicom import CR_IMAGE_STORAGE, DX_FOR_PRESENTATION
from node.queue import repository
from node.queue.db import Database
from node.scp import server as scp_server
from node.settings import load_settings
from tests.dicom_factory import make_dx, nema_chest_cr_path
from tests.servers import dcmtk, free_port

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def listener(tmp_path: Path):
    port = free_port()
    settings = load_settings(None, env={
        "CXRNODE_NODE_HOST": "127.0.0.1", "CXRNODE_NODE_PORT": str(port),
        "CXRNODE_NODE_DATA_DIR": str(tmp_path / "var"), "CXRNODE_NODE_MIN_FREE_DISK_MB": "1",
        "CXRNODE_NODE_ALLOWED_CALLING_AE_TITLES": "GOODSCU,DCMTKSCU"})
    db, archive = Database(settings.data_path), open_archive(settings)
    ae, server = scp_server.start(settings, db, archive)
    yield settings, db, port
    ae.shutdown()
    db.dispose()


def associate(port: int, *contexts: str, calling: str = "GOODSCU"):
    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title="CXRNODE")


def test_store_archives_and_queues_before_success(listener, tmp_path: Path) -> None:
    settings, db, port = listener
    ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(1024, 1024))
    assoc = associate(port, DX_FOR_PRESENTATION)
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0000
    assert assoc.send_c_store(ds).Status == 0x0000  # duplicate: acknowledged, not queued twice
    assoc.release()
    (job,) = repository.list_jobs(db)
    assert job.status == "queued"
    stored = dcmread(settings.data_path / "archive" / job.instance.path)
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert (stored.pixel_array == ds.pixel_array).all()
    assert (settings.data_path / "archive" / job.instance.path).stat().st_mode & 0o777 == 0o600
    assert [e.outcome for e in repository.get_job(db, job.id).events] == ["ok", "duplicate"]
    assert not list((settings.data_path / "archive" / "tmp").iterdir())


def test_echo_and_compressed_cr_from_dcmtk(listener) -> None:
    settings, db, port = listener
    echo = subprocess.run([dcmtk("echoscu"), "-aet", "DCMTKSCU", "-aec", "CXRNODE", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    cr = nema_chest_cr_path()
    sent = subprocess.run([dcmtk("storescu"), "-xw", "-aet", "DCMTKSCU", "-aec", "CXRNODE", "127.0.0.1", str(port),
                           str(cr)], capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (job,) = repository.list_jobs(db)
    assert job.instance.sop_class_uid == CR_IMAGE_STORAGE
    assert job.instance.transfer_syntax_uid == "1.2.840.10008.1.2.4.91"  # kept as sent (JPEG 2000)
    assert (settings.data_path / "archive" / job.instance.path).read_bytes()[128:132] == b"DICM"


def test_any_storage_class_is_acknowledged_and_an_off_target_one_is_discarded_unkept(listener) -> None:
    """A PACS that routes a whole study never fails on its CT or report: Success, a discarded job
    with the reason, and no bytes of it on disk."""
    settings, db, port = listener
    ct = make_dx(DATA / "MCUCXR_0017_0.png", size=(256, 256))
    ct.SOPClassUID, ct.Modality = CTImageStorage, "CT"
    ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    assoc = associate(port, CTImageStorage, BasicTextSRStorage, Verification)
    assert assoc.is_established
    accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
    assert {CTImageStorage, BasicTextSRStorage, Verification} <= accepted
    assert assoc.send_c_store(ct).Status == 0x0000
    assert assoc.send_c_store(ct).Status == 0x0000  # again: one job, an event
    assoc.release()
    (job,) = repository.list_jobs(db)
    assert job.status == "discarded" and "CT Image Storage" in job.discard_reason
    assert "bytes not kept" in job.discard_reason and job.instance.path == ""
    assert not any(p.is_file() for p in (settings.data_path / "archive").rglob("*"))
    steps = [(e.step, e.outcome) for e in repository.get_job(db, job.id).events]
    assert steps == [("receive", "ok"), ("select", "discarded"), ("receive", "duplicate")]


def test_secondary_capture_is_kept_for_the_acceptance_rules(listener) -> None:
    settings, db, port = listener
    ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(256, 256))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    assoc = associate(port, SecondaryCaptureImageStorage)
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    (job,) = repository.list_jobs(db)
    assert job.status == "queued" and (settings.data_path / "archive" / job.instance.path).is_file()


def test_calling_ae_not_on_the_allow_list_is_rejected(listener) -> None:
    _, _, port = listener
    assoc = associate(port, Verification, calling="STRANGER")
    assert assoc.is_rejected
