"""TLS through the real service: `cxrnode serve` configured from its TOML file with [tls]."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.dicom import DX_FOR_PRESENTATION
from tests.dicom_factory import make_dx
from tests.security.certs import Pki
from tests.security.conftest import scu
from tests.servers import NodeProcess, free_port, wait_until

pytestmark = pytest.mark.e2e
DATA = Path(__file__).resolve().parents[1] / "data"


def test_served_node_with_tls_from_its_config(tmp_path: Path, pki: Pki) -> None:
    node = NodeProcess(tmp_path / "node", free_port(), destinations=[], extra={"tls": {
        "enabled": True, "certificate": str(pki.server_cert), "private_key": str(pki.server_key),
        "ca_certificates": str(pki.ca), "require_client_certificate": True}})
    node.start()
    try:
        plain = scu("MODALITY1", Verification).associate("127.0.0.1", node.port, ae_title="CXRNODE")
        assert not plain.is_established

        ds = make_dx(DATA / "MCUCXR_0017_0.png", size=(512, 512))
        assoc = scu("MODALITY1", DX_FOR_PRESENTATION).associate(
            "127.0.0.1", node.port, ae_title="CXRNODE", tls_args=(pki.client_context(), "localhost"))
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()

        def analysed() -> dict | None:
            jobs = json.loads(node.cli("jobs", "list", "--json").stdout)
            return jobs[0] if jobs and jobs[0]["status"] == "done" else None

        job = wait_until(analysed, 120, what="the TLS-received image analysed")
        assert job["sop_instance_uid"] == ds.SOPInstanceUID
        audit = node.cli("audit", "--json")
        assert audit.returncode == 0, audit.stderr
        associations = [e for e in json.loads(audit.stdout) if e["kind"] == "association"]
        (stored,) = [a for a in associations if a["c_store"] == 1]
        assert stored["tls"] is True and stored["result"] == "released"
        assert stored["calling_ae_title"] == "MODALITY1" and stored["tls_peer"]
    finally:
        node.stop()
