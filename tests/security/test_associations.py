"""The calling-AE allow-list and the association audit trail, against a real listener."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from sqlalchemy import text

from node.dicom import DX_FOR_PRESENTATION
from tests.dicom_factory import make_dx
from tests.security.conftest import Listener, scu, start_listener
from tests.servers import wait_until

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def listener(tmp_path: Path):
    yield from start_listener(tmp_path, CXRNODE_NODE_ALLOWED_CALLING_AE_TITLES="GOODSCU")


def test_stranger_is_rejected_logged_and_audited(listener: Listener, caplog) -> None:
    caplog.set_level(logging.INFO, logger="node")
    assoc = scu("STRANGER").associate("127.0.0.1", listener.port, ae_title="CXRNODE")
    assert assoc.is_rejected
    (row,) = listener.wait_for_record("rejected")
    assert (row.calling_ae_title, row.called_ae_title, row.peer_address) == \
        ("STRANGER", "CXRNODE", "127.0.0.1")
    assert row.peer_port > 0 and row.tls is False and row.ended_at is not None
    assert "calling AE title not recognised" in row.reason and "permanent" in row.reason
    (record,) = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "STRANGER@127.0.0.1" in record.getMessage()
    assert "calling AE title not recognised" in record.getMessage()


def test_accepted_association_is_audited_with_counts(listener: Listener) -> None:
    ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(256, 256))
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    assoc = scu("GOODSCU", DX_FOR_PRESENTATION, Verification).associate(
        "127.0.0.1", listener.port, ae_title="CXRNODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assert assoc.send_c_store(ds).Status == 0x0000
    bad = make_dx(DATA / "MCUCXR_0017_0.png", size=(256, 256))
    del bad.StudyInstanceUID
    assert assoc.send_c_store(bad).Status != 0x0000
    assoc.release()
    (row,) = listener.wait_for_record("released")
    assert (row.calling_ae_title, row.called_ae_title, row.tls) == ("GOODSCU", "CXRNODE", False)
    assert (row.c_store, row.c_store_failed, row.c_echo) == (2, 1, 1)
    assert row.ended_at is not None and row.ended_at >= row.started_at
    kinds = [(e.kind, e.what) for e in listener.trail()]
    assert ("association", "released") in kinds and ("job", "receive ok") in kinds


def test_abort_is_audited(listener: Listener) -> None:
    assoc = scu("GOODSCU").associate("127.0.0.1", listener.port, ae_title="CXRNODE")
    assert assoc.is_established
    assoc.abort()
    (row,) = listener.wait_for_record("aborted")
    assert row.calling_ae_title == "GOODSCU" and row.ended_at is not None


def test_dropped_connection_is_audited_as_aborted(listener: Listener) -> None:
    assoc = scu("GOODSCU").associate("127.0.0.1", listener.port, ae_title="CXRNODE")
    assert assoc.is_established
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)  # TCP gone, no A-RELEASE / A-ABORT
    (row,) = listener.wait_for_record("aborted")
    assert row.calling_ae_title == "GOODSCU"
    assoc.kill()


def test_audit_failure_never_breaks_an_association(listener: Listener, caplog) -> None:
    with listener.db.engine.begin() as conn:
        conn.execute(text("DROP TABLE associations"))
    caplog.set_level(logging.ERROR, logger="node")
    assoc = scu("GOODSCU").associate("127.0.0.1", listener.port, ae_title="CXRNODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert scu("STRANGER").associate("127.0.0.1", listener.port, ae_title="CXRNODE").is_rejected
    wait_until(lambda: sum("audit trail: cannot record" in r.getMessage()
                           for r in caplog.records) >= 3, 10, what="audit failures logged")


def test_requests_during_a_slow_audit_write_are_counted(listener: Listener, monkeypatch) -> None:
    """The peer may send its first request before the accepted row is committed."""
    import time

    from node.queue import audit

    record = audit.record

    def slow_record(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.5)  # a busy database
        return record(*args, **kwargs)

    monkeypatch.setattr(audit, "record", slow_record)
    assoc = scu("GOODSCU").associate("127.0.0.1", listener.port, ae_title="CXRNODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    (row,) = listener.wait_for_record("released")
    assert row.c_echo == 1
