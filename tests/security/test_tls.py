"""Optional DICOM TLS: a client with a certificate from the configured CA gets in, nobody else.

The PKI is made fresh with the ``openssl`` tool (:mod:`tests.security.certs`); the peers are a
pynetdicom SCU with ``tls_args`` and dcmtk's ``echoscu +tls``.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.dicom import DX_FOR_PRESENTATION
from node.queue import repository
from tests.dicom_factory import make_dx
from tests.security.certs import Pki
from tests.security.conftest import Listener, scu, start_listener
from tests.servers import dcmtk

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def tls_listener(tmp_path: Path, pki: Pki):
    yield from start_listener(
        tmp_path, CXRNODE_TLS_ENABLED="true", CXRNODE_TLS_CERTIFICATE=str(pki.server_cert),
        CXRNODE_TLS_PRIVATE_KEY=str(pki.server_key), CXRNODE_TLS_CA_CERTIFICATES=str(pki.ca),
        CXRNODE_TLS_REQUIRE_CLIENT_CERTIFICATE="true")


def test_client_with_certificate_can_echo_and_store(tls_listener: Listener, pki: Pki) -> None:
    ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(256, 256))
    assoc = scu("MODALITY1", DX_FOR_PRESENTATION, Verification).associate(
        "127.0.0.1", tls_listener.port, ae_title="CXRNODE",
        tls_args=(pki.client_context(), "localhost"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    (job,) = repository.list_jobs(tls_listener.db)
    assert job.instance.sop_instance_uid == ds.SOPInstanceUID
    (row,) = tls_listener.wait_for_record("released")
    assert row.tls is True and row.tls_peer == "commonName=MODALITY-1"
    assert (row.calling_ae_title, row.c_store, row.c_echo) == ("MODALITY1", 1, 1)


def test_dcmtk_echoscu_over_tls(tls_listener: Listener, pki: Pki) -> None:
    echo = subprocess.run(
        [dcmtk("echoscu"), "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca),
         "-aet", "DCMTKSCU", "-aec", "CXRNODE", "127.0.0.1", str(tls_listener.port)],
        capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    (row,) = tls_listener.wait_for_record("released")
    assert row.tls and row.calling_ae_title == "DCMTKSCU" and row.c_echo == 1


def _refused(tls_listener: Listener, tls_args: tuple[ssl.SSLContext, str] | None) -> str:
    """Try to associate; assert it fails; return the audited reason."""
    try:
        assoc = scu("MODALITY1").associate("127.0.0.1", tls_listener.port, ae_title="CXRNODE",
                                           tls_args=tls_args)
        established = assoc.is_established and assoc.send_c_echo().Status == 0x0000
    except (OSError, ssl.SSLError):
        established = False
    assert not established
    (row,) = tls_listener.wait_for_record("rejected")
    assert row.tls is True and row.peer_address == "127.0.0.1"
    assert not [r for r in tls_listener.records() if r.result != "rejected"]
    return row.reason


def test_client_without_certificate_is_refused(tls_listener: Listener, pki: Pki) -> None:
    reason = _refused(tls_listener, (pki.client_context(with_certificate=False), "localhost"))
    assert "TLS handshake failed" in reason and "CERTIFICATE" in reason.upper()


def test_client_certificate_from_another_ca_is_refused(tls_listener: Listener, pki: Pki) -> None:
    reason = _refused(tls_listener, (pki.client_context(stranger=True), "localhost"))
    assert "TLS handshake failed" in reason


def test_plain_client_cannot_associate(tls_listener: Listener) -> None:
    reason = _refused(tls_listener, None)
    assert "TLS handshake failed" in reason


def test_silent_connection_does_not_hold_the_listener(tls_listener: Listener, pki: Pki) -> None:
    """A peer that connects and sends nothing must not block the TLS handshake of others."""
    with socket.create_connection(("127.0.0.1", tls_listener.port)):
        time.sleep(0.2)
        started = time.monotonic()
        assoc = scu("MODALITY1").associate("127.0.0.1", tls_listener.port, ae_title="CXRNODE",
                                           tls_args=(pki.client_context(), "localhost"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert time.monotonic() - started < 5


def test_unreadable_certificate_stops_start_up_naming_the_key(tmp_path: Path, pki: Pki) -> None:
    from node.errors import SettingsError

    with pytest.raises(SettingsError, match="tls.certificate"):
        next(start_listener(
            tmp_path, CXRNODE_TLS_ENABLED="true", CXRNODE_TLS_CERTIFICATE=str(tmp_path / "none.pem"),
            CXRNODE_TLS_PRIVATE_KEY=str(pki.server_key), CXRNODE_TLS_CA_CERTIFICATES=str(pki.ca)))
    with pytest.raises(SettingsError, match="tls.ca_certificates"):
        next(start_listener(
            tmp_path, CXRNODE_TLS_ENABLED="true", CXRNODE_TLS_CERTIFICATE=str(pki.server_cert),
            CXRNODE_TLS_PRIVATE_KEY=str(pki.server_key), CXRNODE_TLS_CA_CERTIFICATES=str(pki.server_key)))
