"""An in-process listener (real pynetdicom server, real SQLite) for the security tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE

from node.archive import open_archive
from node.queue import audit
from node.queue.db import Database
from node.queue.tables import AssociationRecord
from node.scp import server as scp_server
from node.settings import Settings, load_settings
from tests.security.certs import Pki, make_pki
from tests.servers import free_port, wait_until


@dataclass
class Listener:
    settings: Settings
    db: Database
    port: int

    def records(self) -> list[AssociationRecord]:
        with self.db.session() as session:
            return list(session.query(AssociationRecord).order_by(AssociationRecord.id))

    def wait_for_record(self, result: str, count: int = 1) -> list[AssociationRecord]:
        """The association rows once ``count`` of them have ``result``."""
        def ready() -> list[AssociationRecord] | None:
            rows = self.records()
            return rows if sum(r.result == result for r in rows) >= count else None
        return wait_until(ready, 10, 0.05, what=f"{count} association(s) {result}")

    def trail(self) -> list[audit.AuditEntry]:
        return audit.trail(self.db)


def start_listener(tmp_path: Path, **env: str) -> Iterator[Listener]:
    port = free_port()
    settings = load_settings(None, env={
        "CXRNODE_NODE_HOST": "127.0.0.1", "CXRNODE_NODE_PORT": str(port),
        "CXRNODE_NODE_DATA_DIR": str(tmp_path / "var"), "CXRNODE_NODE_MIN_FREE_DISK_MB": "1",
        "CXRNODE_NODE_NETWORK_TIMEOUT_S": "10", **env})
    db, archive = Database(settings.data_path), open_archive(settings)
    try:
        ae, _server = scp_server.start(settings, db, archive)
    except BaseException:
        db.dispose()
        raise
    try:
        yield Listener(settings, db, port)
    finally:
        ae.shutdown()
        db.dispose()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def scu(calling: str = "GOODSCU", *contexts: str) -> AE:
    """A pynetdicom SCU with short timeouts, requesting ``contexts`` (Verification if none)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    for context in contexts or (Verification,):
        ae.add_requested_context(context, [ExplicitVRLittleEndian])
    return ae
