"""C-STORE SCU: send result files to one destination and classify what went wrong.

The archived files are sent as they are: pynetdicom streams a file's data set from disk
(``STORE_SEND_CHUNKED_DATASET``) when the peer accepted the file's own transfer syntax, so
nothing is parsed or re-encoded per destination; only a peer that accepted another transfer
syntax gets the object read and converted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from node import faults
from node.dicom import no_delay
from node.errors import PermanentSendError, TransientSendError
from node.settings import Destination

log = logging.getLogger(__name__)

# A path given to send_c_store is streamed from the file as it is, not decoded (pynetdicom's
# switch is process-wide; the node passes paths only here).
_config.STORE_SEND_CHUNKED_DATASET = True

#: Failure statuses worth retrying (PS3.4 B.2.3, PS3.7 C): Out of Resources (the whole 0xA7xx
#: range), the unspecified Processing Failure and Resource Limitation. Any other failure is permanent.
_TRANSIENT = {0x0110, 0x0213}


def _stored(code: int) -> bool:
    """Success, or a warning (0xBxxx coercion / elements discarded, 0x0001, 0x0107, 0x0116): the
    peer stored the object (PS3.7 C: warnings complete the operation)."""
    return code_to_category(code) in ("Success", "Warning")


def _transient(code: int) -> bool:
    return code in _TRANSIENT or 0xA700 <= code <= 0xA7FF


def _ae(calling_ae_title: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.maximum_pdu_size = 1_048_576
    return ae


def echo(dest: Destination, calling_ae_title: str, timeout_s: float = 10.0) -> int:
    """C-ECHO ``dest``; returns the status, raises TransientSendError if it cannot associate."""
    ae = _ae(calling_ae_title, timeout_s)
    ae.add_requested_context(Verification)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise TransientSendError(f"no association with {dest.name} ({dest.host}:{dest.port})")
    try:
        status = assoc.send_c_echo()
        if not status:
            raise TransientSendError(f"C-ECHO to {dest.name}: no response")
        return int(status.Status)
    finally:
        assoc.release()


@dataclass(frozen=True)
class ArchivedFile:
    """A result file to send, with what its file meta information says about it."""

    path: Path
    sop_class_uid: UID
    sop_instance_uid: UID
    transfer_syntax_uid: UID

    @classmethod
    def read(cls, path: Path) -> ArchivedFile:
        meta = read_file_meta_info(path)
        return cls(path, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID)


def _send_one(assoc: Association, obj: ArchivedFile) -> object:
    """C-STORE ``obj``: its bytes as archived when the peer accepted its transfer syntax for its
    SOP class, else read and converted by pynetdicom. Raises ValueError when no context fits."""
    as_archived = any(cx.abstract_syntax == obj.sop_class_uid and cx.transfer_syntax[0] == obj.transfer_syntax_uid
                      for cx in assoc.accepted_contexts)
    return assoc.send_c_store(obj.path if as_archived else dcmread(obj.path))


def store(dest: Destination, files: list[Path], calling_ae_title: str, timeout_s: float) -> None:
    """C-STORE every file to ``dest`` on one association.

    Raises:
        TransientSendError: the peer cannot be reached, refuses the association, or answers
            a retryable status.
        PermanentSendError: the peer refuses the SOP class or the object.
    """
    faults.fire("scu")
    objects = [ArchivedFile.read(f) for f in files]
    ae = _ae(calling_ae_title, timeout_s)
    for sop_class in sorted({str(obj.sop_class_uid) for obj in objects}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "refused"
        raise TransientSendError(f"association with {dest.name} ({dest.host}:{dest.port}) {reason}")
    try:
        if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
            no_delay(assoc.dul.socket.socket)
        for index, obj in enumerate(objects):
            if index:
                faults.pause("send")
            try:
                status = _send_one(assoc, obj)
            except ValueError as exc:  # no accepted presentation context for this SOP class
                raise PermanentSendError(f"{dest.name} does not accept {obj.sop_class_uid}: {exc}") from None
            if not status:
                raise TransientSendError(f"{dest.name}: no C-STORE response (timeout or abort)")
            code = int(status.Status)  # type: ignore[attr-defined]
            if _stored(code):
                if code:
                    log.info("%s stored %s with warning status 0x%04X", dest.name, obj.sop_instance_uid, code)
                continue
            message = f"{dest.name} answered C-STORE with status 0x{code:04X}"
            raise (TransientSendError if _transient(code) else PermanentSendError)(message)
    finally:
        if assoc.is_established:
            assoc.release()
