"""Build and start the listener: contexts, allow-list, TLS, and the handler list in one place."""

from __future__ import annotations

import logging
import ssl
import threading

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from node.archive import Archive
from node.dicom import ACCEPTED_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES, VERIFICATION
from node.queue.db import Database
from node.scp import handlers
from node.scp.associations import AssociationAudit, AuditedAssociationServer, NodeRequestHandler
from node.errors import SettingsError
from node.http import metrics
from node.settings import Settings, TlsSettings
from node.wakeups import Wakeups

log = logging.getLogger(__name__)


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """Server-side TLS context from the settings; client certificates checked against the CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"tls.certificate/tls.private_key: cannot load "
                            f"{tls.certificate} with {tls.private_key}: {exc}") from None
    if tls.ca_certificates:
        try:
            context.load_verify_locations(tls.ca_certificates)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"tls.ca_certificates: cannot load {tls.ca_certificates}: "
                                f"{exc}") from None
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def build_ae(settings: Settings) -> AE:
    """The application entity: Verification and every storage SOP class, in any transfer syntax it can decode."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.maximum_pdu_size = settings.node.max_pdu_size
    ae.network_timeout = settings.node.network_timeout_s
    ae.acse_timeout = settings.node.network_timeout_s
    ae.dimse_timeout = settings.node.network_timeout_s
    if settings.node.allowed_calling_ae_titles:
        ae.require_calling_aet = list(settings.node.allowed_calling_ae_titles)
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
    return ae


def start(settings: Settings, db: Database, archive: Archive,
          wakeups: Wakeups | None = None) -> tuple[AE, ThreadedAssociationServer]:
    """Start listening (non-blocking); returns the AE and its server. Each job queued rings
    ``wakeups`` (the inference worker of this process starts it at once).

    Every association (accepted, rejected, released, aborted) and every failed TLS handshake is
    logged and written to the audit trail (:mod:`node.scp.associations`).
    """
    ae = build_ae(settings)
    ctx = handlers.StoreContext(db=db, archive=archive,
                                min_free_bytes=settings.node.min_free_disk_mb * 1024 * 1024,
                                wakeups=wakeups)
    associations = AssociationAudit(db)
    evt_handlers = [
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, metrics.instrument_store(handlers.handle_store), [ctx]),
        *associations.handlers(),
        *metrics.association_handlers(),
    ]
    ssl_context = tls_context(settings.tls) if settings.tls.enabled else None
    server = ae.make_server((settings.node.host, settings.node.port), ssl_context=ssl_context,
                            evt_handlers=evt_handlers, server_class=AuditedAssociationServer,
                            request_handler=NodeRequestHandler)
    server.audit = associations
    server.handshake_timeout_s = settings.node.network_timeout_s
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    thread.start()
    ae._servers.append(server)  # so that ae.shutdown() stops it, as ae.start_server does
    host, port = server.server_address[:2]
    log.info("listening as %s on %s:%d%s", settings.node.ae_title, host, port,
             " (TLS)" if ssl_context else "")
    return ae, server
