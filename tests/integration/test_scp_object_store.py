"""The listener archiving into a real S3-compatible object store (SeaweedFS on loopback): an
object is acknowledged only once the store holds it, the queue records its key (never a host
path), a different copy is kept as a version beside it, and a store that cannot be reached is
answered 0xA700 (Out of Resources) with nothing queued, the listener still answering."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from node.archive import open_archive
from node.dicom import DX_FOR_PRESENTATION, Status
from node.queue import repository
from node.queue.db import Database
from node.scp import server as scp_server
from node.settings import load_settings
from tests.dicom_factory import make_dx
from tests.servers import SeaweedFS, free_port

DATA = Path(__file__).resolve().parents[1] / "data"


def start_listener(tmp_path: Path, archive_config: str):  # type: ignore[no-untyped-def]
    port = free_port()
    config = tmp_path / "cxrnode.toml"
    config.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{tmp_path / "var"}"\n'
                      "min_free_disk_mb = 1\n" + archive_config)
    settings = load_settings(config, env={})
    db, archive = Database(settings.data_path), open_archive(settings)
    ae, _server = scp_server.start(settings, db, archive)
    return ae, db, port


def store(port: int, *datasets) -> list[int]:  # type: ignore[no-untyped-def]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DX_FOR_PRESENTATION, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


@pytest.fixture
def listener(tmp_path: Path, seaweedfs: SeaweedFS):  # type: ignore[no-untyped-def]
    prefix = seaweedfs.prefix()
    ae, db, port = start_listener(tmp_path, seaweedfs.archive_config(prefix))
    yield db, port, prefix
    ae.shutdown()
    db.dispose()


def test_an_acknowledged_object_is_in_the_store_under_its_key(listener, seaweedfs: SeaweedFS) -> None:  # type: ignore[no-untyped-def]
    db, port, prefix = listener
    ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(512, 512))
    other = make_dx(DATA / "MCUCXR_0017_0.png", size=(256, 256), sop_instance_uid=ds.SOPInstanceUID,
                    study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID)
    assert store(port, ds, ds, other) == [Status.SUCCESS] * 3
    (job,) = repository.list_jobs(db)
    key = f"received/{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"
    assert job.status == "queued" and job.instance.path == key
    client = seaweedfs.client()
    stored = dcmread(io.BytesIO(client.get_object(Bucket=seaweedfs.BUCKET, Key=f"{prefix}/{key}")["Body"].read()))
    assert stored.SOPInstanceUID == ds.SOPInstanceUID and (stored.pixel_array == ds.pixel_array).all()
    listed = sorted(o["Key"] for o in client.list_objects_v2(Bucket=seaweedfs.BUCKET, Prefix=prefix)["Contents"])
    assert listed == [f"{prefix}/{key}", f"{prefix}/{key.removesuffix('.dcm')}.v2.dcm"]
    steps = [(e.step, e.outcome) for e in repository.get_job(db, job.id).events]
    assert steps == [("receive", "ok"), ("receive", "duplicate"), ("receive", "duplicate"),
                     ("receive", "duplicate-different")]


def test_an_unreachable_store_is_answered_out_of_resources_and_nothing_is_queued(tmp_path: Path) -> None:
    config = (f'[archive]\nurl = "s3://cxrnode/x"\ns3_endpoint_url = "http://127.0.0.1:{free_port()}"\n'
              's3_access_key_id = "k"\ns3_secret_access_key = "s"\ns3_timeout_s = 1.0\n')
    ae, db, port = start_listener(tmp_path, config)
    try:
        ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(256, 256))
        assert store(port, ds) == [Status.OUT_OF_RESOURCES]
        assert repository.list_jobs(db) == []
        assert store(port, ds) == [Status.OUT_OF_RESOURCES]  # still listening, still nothing lost
    finally:
        ae.shutdown()
        db.dispose()
