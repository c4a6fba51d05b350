"""C-STORE SCU: send result files to one destination and classify what went wrong."""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from node import faults
from node.errors import PermanentSendError, TransientSendError
from node.settings import Destination

log = logging.getLogger(__name__)

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


def store(dest: Destination, files: list[Path], calling_ae_title: str, timeout_s: float) -> None:
    """C-STORE every file to ``dest`` on one association.

    Raises:
        TransientSendError: the peer cannot be reached, refuses the association, or answers
            a retryable status.
        PermanentSendError: the peer refuses the SOP class or the object.
    """
    faults.fire("scu")
    datasets = [dcmread(f) for f in files]
    ae = _ae(calling_ae_title, timeout_s)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "refused"
        raise TransientSendError(f"association with {dest.name} ({dest.host}:{dest.port}) {reason}")
    try:
        for index, ds in enumerate(datasets):
            if index:
                faults.pause("send")
            try:
                status = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context for this SOP class
                raise PermanentSendError(f"{dest.name} does not accept {ds.SOPClassUID}: {exc}") from None
            if not status:
                raise TransientSendError(f"{dest.name}: no C-STORE response (timeout or abort)")
            code = int(status.Status)
            if _stored(code):
                if code:
                    log.info("%s stored %s with warning status 0x%04X", dest.name, ds.SOPInstanceUID, code)
                continue
            message = f"{dest.name} answered C-STORE with status 0x{code:04X}"
            raise (TransientSendError if _transient(code) else PermanentSendError)(message)
    finally:
        if assoc.is_established:
            assoc.release()
