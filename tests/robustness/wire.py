"""Raw bytes on an established association: a sender that dies or aborts mid-transfer.

pynetdicom negotiates the association (so the node sees a normal peer); then the C-STORE
request is encoded into P-DATA-TF PDUs by pynetdicom's own DIMSE encoder and written to the
socket directly, so the test can stop at any byte.
"""

from __future__ import annotations

import socket
from enum import Enum
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

#: A-ABORT-RQ PDU (PS3.8 9.3.8): type 7, length 4, source 0 (service user), reason 0.
A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])


class Cut(Enum):
    """How the sender stops."""

    HALF_PDU_THEN_CLOSE = "half a P-DATA-TF PDU, then the TCP connection closes"
    FRAGMENTS_THEN_ABORT = "complete PDUs up to half the dataset, then A-ABORT"
    HALF_PDU_THEN_ABORT = "half a P-DATA-TF PDU, then A-ABORT bytes (a garbled PDU)"


def store_pdus(assoc: Association, ds: Dataset, max_pdu: int = 16_384) -> list[bytes]:
    """The encoded P-DATA-TF PDUs of a C-STORE of ``ds`` (explicit VR little endian)."""
    sop_class = str(ds.SOPClassUID)
    (context,) = [c for c in assoc.accepted_contexts
                  if c.abstract_syntax == sop_class and c.transfer_syntax[0] == "1.2.840.10008.1.2.1"]
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = str(ds.SOPInstanceUID)
    request.Priority = 2
    request.DataSet = BytesIO(buffer.getvalue())
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(context.context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


def cut_store(assoc: Association, ds: Dataset, cut: Cut) -> int:
    """Send a C-STORE of ``ds`` that stops as ``cut`` says; returns the bytes written."""
    pdus = store_pdus(assoc, ds)
    assert len(pdus) >= 4, "dataset too small to cut mid-transfer"
    middle = len(pdus) // 2
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    raw: socket.socket = assoc.dul.socket.socket
    head = b"".join(pdus[:middle])
    if cut is Cut.FRAGMENTS_THEN_ABORT:
        tail = A_ABORT
    else:
        tail = pdus[middle][: len(pdus[middle]) // 2]
        if cut is Cut.HALF_PDU_THEN_ABORT:
            tail += A_ABORT
    raw.sendall(head + tail)
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    assoc.kill()
    return len(head) + len(tail)


def garbage_connection(port: int, payload: bytes) -> None:
    """Connect, write ``payload`` (not a valid PDU stream) and close."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        try:
            sock.recv(1024)  # the node answers with an A-ABORT or just closes
        except OSError:
            pass
