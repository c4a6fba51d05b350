"""Bad input at the listener: truncated streams, unsafe UIDs, duplicates. No networks needed.

The non-radiograph SOP class case (a CT acknowledged, discarded, not kept) is
``tests/integration/test_scp.py::test_any_storage_class_is_acknowledged_and_an_off_target_one_is_discarded_unkept``.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian

from node.dicom import Status
from tests.dicom_factory import dataset_bytes, make_dx, montgomery_case, part10_bytes
from tests.robustness.harness import LocalNode
from tests.robustness.wire import Cut, cut_store, garbage_connection
from tests.servers import wait_until

IMAGE, _ = montgomery_case()


def small_dx(**kwargs: object):  # type: ignore[no-untyped-def]
    return make_dx(IMAGE, size=(512, 512), **kwargs)  # type: ignore[arg-type]


def settled(node: LocalNode) -> None:
    """Wait until the node has no association left open."""
    wait_until(lambda: not node.ae.active_associations, 15, 0.05, what="associations closed")


@pytest.mark.parametrize("cut", list(Cut), ids=lambda c: c.name.lower())
def test_truncated_stream_stores_nothing(listener: LocalNode, cut: Cut) -> None:
    ds = small_dx()
    assoc = listener.associate()
    assert cut_store(assoc, ds, cut) > 0
    settled(listener)
    assert listener.jobs() == []
    assert listener.received_files() == []
    assert listener.leftovers() == []
    assert listener.echo()
    # and the same object, sent whole afterwards, is stored normally
    assert listener.send(ds) == Status.SUCCESS
    assert len(listener.jobs()) == 1


@pytest.mark.parametrize("payload", [b"", b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096),
                                     b"\x01\x00\xff\xff\xff\xff"],
                         ids=["empty", "http", "random", "huge-length-pdu"])
def test_garbage_connection_is_dropped(listener: LocalNode, payload: bytes) -> None:
    garbage_connection(listener.port, payload)
    assert listener.echo()  # answered at once, while the garbage connection may still linger
    assert listener.jobs() == [] and listener.received_files() == []


@pytest.mark.parametrize("bad_uid", ["1.2.3/../../../../tmp/escape", "../..", "1.2.3.abc",
                                     "1.2.3..4"])
def test_unsafe_sop_instance_uid_is_refused(listener: LocalNode, tmp_path: Path,
                                            bad_uid: str) -> None:
    ds = small_dx()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = bad_uid
    assert listener.send(ds) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert listener.jobs() == [] and listener.received_files() == []
    naive = listener.archive.root / "received" / str(ds.StudyInstanceUID) / f"{bad_uid}.dcm"
    assert not naive.resolve().exists()  # where a path built from the UID would have led
    assert [p for p in tmp_path.rglob("*") if p.is_file() and "escape" in p.name] == []
    assert listener.echo()


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_unsafe_study_or_series_uid_is_refused(listener: LocalNode, keyword: str) -> None:
    ds = small_dx()
    setattr(ds, keyword, "1.2/../../x")
    assert listener.send(ds) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    del ds[keyword]
    assert listener.send(ds) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert listener.jobs() == [] and listener.received_files() == []


def test_sop_instance_uid_differing_from_the_request_is_refused(listener: LocalNode,
                                                                tmp_path: Path) -> None:
    ds = small_dx()
    meta = ds.file_meta
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"  # the request says another UID
    path = tmp_path / "mismatch.dcm"
    path.write_bytes(part10_bytes(meta, dataset_bytes(ds)))
    assert listener.send(path) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert listener.jobs() == [] and listener.received_files() == []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_identical_duplicate_only_adds_an_event(listener: LocalNode) -> None:
    ds = small_dx()
    assert listener.send(ds) == Status.SUCCESS
    assert listener.send(ds) == Status.SUCCESS
    job = listener.job(str(ds.SOPInstanceUID))
    assert [(e.step, e.outcome) for e in job.events] == [("receive", "ok"), ("receive", "duplicate")]
    assert listener.received_files() == [listener.archive.path(job.instance.path)]


def test_duplicate_with_different_content_is_kept_as_a_version(listener: LocalNode) -> None:
    first = small_dx()
    uids = {k: getattr(first, k) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    changed = small_dx(photometric="MONOCHROME1", sop_instance_uid=uids["SOPInstanceUID"],
                       study_instance_uid=uids["StudyInstanceUID"],
                       series_instance_uid=uids["SeriesInstanceUID"])
    assert listener.send(first) == Status.SUCCESS
    original = listener.archive.path(listener.job(uids["SOPInstanceUID"]).instance.path)
    before = sha256(original)
    assert listener.send(changed) == Status.SUCCESS
    assert listener.send(changed) == Status.SUCCESS  # the same new content again: no v3
    changed.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # different bytes again: v3
    assert listener.send(changed) == Status.SUCCESS

    job = listener.job(uids["SOPInstanceUID"])
    assert len(listener.jobs()) == 1 and job.status == "queued"  # not processed again
    v2, v3 = original.with_name(f"{original.stem}.v2.dcm"), original.with_name(f"{original.stem}.v3.dcm")
    assert listener.received_files() == sorted([original, v2, v3])
    assert sha256(original) == before  # the first object is untouched
    assert dcmread(v2).PhotometricInterpretation == "MONOCHROME1"
    assert v2.stat().st_mode & 0o777 == 0o600
    steps = [(e.outcome, e.message) for e in job.events if e.step == "receive"]
    different = [m for o, m in steps if o == "duplicate-different"]
    assert [o for o, _ in steps] == ["ok"] + ["duplicate", "duplicate-different"] * 3
    assert [v2.name in m for m in different] == [True, True, False]
    assert v3.name in different[2]
    assert listener.leftovers() == []
    assert listener.echo()


def test_concurrent_senders_of_one_uid_lose_nothing(listener: LocalNode) -> None:
    first = small_dx()
    other = small_dx(photometric="MONOCHROME1", sop_instance_uid=first.SOPInstanceUID,
                     study_instance_uid=first.StudyInstanceUID,
                     series_instance_uid=first.SeriesInstanceUID)
    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(listener.send, [first, other, first, other]))
    assert statuses == [Status.SUCCESS] * 4
    (job,) = listener.jobs()
    original = listener.archive.path(job.instance.path)
    assert listener.received_files() == [original, original.with_name(f"{original.stem}.v2.dcm")]
    kept = {dcmread(p).PhotometricInterpretation for p in listener.received_files()}
    assert kept == {"MONOCHROME1", "MONOCHROME2"}
